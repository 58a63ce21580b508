-- A provenance record as the chain check reads it: the record and its link, with what is stored
-- now for its analysis (the input digest and the result) beside it, so that a record can be
-- checked against the data it speaks for. One definition for every reader of the chain
-- (src/repo/provenance.rs: one record, a page of the chain, the records not yet sealed).
create view provenance_links as
select p.analysis_id, p.tenant_id, p.seq, p.record, p.record_sha256, p.previous_sha256,
       p.chain_sha256, p.created_at, a.input_sha256, r.result
from provenance p
left join analyses a on a.id = p.analysis_id
left join results r on r.analysis_id = p.analysis_id;
