-- The model registry. Bundled models (tenant_id null) are visible to every tenant; a model an admin
-- registers belongs to that admin's tenant. Versions are immutable; at most one is active per name.
create table models (
    name            text not null,
    version         text not null,
    tenant_id       text,
    modality        text not null,
    task            text not null,
    title           text not null,
    manifest        jsonb not null,
    manifest_sha256 text not null,
    onnx_sha256     text not null,
    -- Where the ONNX bytes are in the blob store.
    blob_key        text not null,
    card            text not null,
    state           text not null check (state in ('staged', 'active', 'retired')),
    source          text not null check (source in ('bundled', 'registered')),
    registered_by   text,
    created_at      timestamptz not null default now(),
    primary key (name, version)
);

create unique index models_one_active_version on models (name) where state = 'active';
