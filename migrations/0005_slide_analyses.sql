-- Slide analyses: a slide job runs alone (never batched with other jobs of its model), reports
-- its progress between tile batches, and keeps its per-tile scores compactly for heatmaps and
-- GeoJSON.
alter table jobs add column batchable boolean not null default true,
                 add column progress_done integer,
                 add column progress_total integer;

create table analysis_tiles (
    analysis_id      uuid primary key references analyses (id) on delete cascade,
    tenant_id        text not null,
    -- Side of every tile in level-0 pixels; corners are level-0 pixels too.
    tile_size_level0 double precision not null,
    xs               integer[] not null,
    ys               integer[] not null,
    -- The model's tissue output per tile (the weight of its measures).
    tissue           real[] not null,
    -- Names of the measures, the columns of scores (row-major, one row per tile).
    measures         text[] not null,
    scores           real[] not null
);
