-- A claim (queued -> running) rewrote each job as a new row version with a new entry in every
-- index: `state` is in the predicate of both claim indexes, and PostgreSQL makes an update HOT
-- (same page, no index entries) only when no indexed column, predicates included, changes. The
-- indexes now cover the jobs that are open, a column the claim leaves as it is (true before and
-- after), and the table keeps room on each page for the new version.
alter table jobs add column open boolean generated always as (state in ('queued', 'running')) stored;
drop index jobs_claimable;
drop index jobs_claimable_by_model;
create index jobs_claimable on jobs (priority, enqueued_at) where open;
create index jobs_claimable_by_model on jobs (model_name, priority, enqueued_at) where open;
alter table jobs set (fillfactor = 80);
