-- Provenance records are written unchained, in the transaction that stores their result, and are
-- linked into their tenant's chain after commit by a sealer (src/jobs/sealer.rs). Before, every
-- transaction that stored a result held its tenant's chain head row until commit, so a tenant's
-- commits, on every API and worker process, waited for one another's fsync.
alter table provenance alter column seq drop not null;
alter table provenance alter column previous_sha256 drop not null;
alter table provenance alter column chain_sha256 drop not null;
alter table provenance add constraint provenance_sealed_whole check (
    (seq is null) = (previous_sha256 is null) and (seq is null) = (chain_sha256 is null)
);
create index provenance_unsealed on provenance (tenant_id, created_at, analysis_id)
    where seq is null;
