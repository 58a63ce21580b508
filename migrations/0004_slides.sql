-- Uploaded whole-slide images: the bytes live in the blob store, the facts read from the file here.
-- The same bytes uploaded twice in one tenant are one slide.
create table slides (
    id          uuid primary key,
    tenant_id   text not null,
    uploaded_by text not null,
    filename    text,
    sha256      text not null,
    size_bytes  bigint not null,
    format      text not null,
    vendor      text,
    width       bigint not null,
    height      bigint not null,
    -- [{width, height, downsample, tile_width, tile_height}], level 0 first.
    levels      jsonb not null,
    mpp_x       double precision,
    mpp_y       double precision,
    objective   double precision,
    blob_key    text not null,
    created_at  timestamptz not null default now(),
    unique (tenant_id, sha256)
);
