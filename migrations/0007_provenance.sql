-- Provenance: one record per result, chained per tenant (see src/domain/provenance.rs for the
-- digests). Written in the transaction that stores the result.
create table provenance (
    analysis_id     uuid primary key references analyses (id) on delete cascade,
    tenant_id       text not null,
    -- Position in the tenant's chain, from 1, without gaps.
    seq             bigint not null,
    record          jsonb not null,
    record_sha256   text not null,
    previous_sha256 text not null,
    chain_sha256    text not null,
    created_at      timestamptz not null default now(),
    unique (tenant_id, seq)
);

-- The last link of each tenant's chain. Appending locks this row until commit, so a tenant's
-- results are chained in commit order.
create table provenance_heads (
    tenant_id    text primary key,
    seq          bigint not null,
    chain_sha256 text not null
);

create index audit_events_tenant_action on audit_events (tenant_id, action, at desc);
