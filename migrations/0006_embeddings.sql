-- Precomputed tile embeddings of one slide (a bag for a MIL head), uploaded as a safetensors file:
-- the bytes live in the blob store, what was read from them here. The same bytes uploaded twice
-- in one tenant are one bag.
create table embeddings (
    id          uuid primary key,
    tenant_id   text not null,
    uploaded_by text not null,
    filename    text,
    sha256      text not null,
    size_bytes  bigint not null,
    tiles       integer not null,
    dim         integer not null,
    has_coords  boolean not null,
    -- The file's own string metadata (e.g. encoder, mpp), as sent.
    metadata    jsonb not null,
    blob_key    text not null,
    created_at  timestamptz not null default now(),
    unique (tenant_id, sha256)
);
