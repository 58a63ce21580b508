-- The W3C traceparent of the request that queued the job: the worker's spans join its trace.
alter table jobs add column traceparent text;
