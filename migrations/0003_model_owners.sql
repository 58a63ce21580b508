-- A model name belongs to one owner (a tenant, or null for the bundled models), claimed by the
-- first registration in the same transaction as the version: two tenants registering the same
-- new name at once cannot both get it, and activating a version never touches another tenant's.
create table model_owners (
    name      text primary key,
    tenant_id text
);

insert into model_owners (name, tenant_id)
select distinct on (name) name, tenant_id from models order by name, created_at;
