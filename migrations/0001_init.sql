-- One analysis per accepted request; tenant_id on every row, every query filters on it.
create table analyses (
    id            uuid primary key,
    tenant_id     text not null,
    submitted_by  text not null,
    subject       text,
    model_name    text not null,
    model_version text not null,
    model_sha256  text not null,
    priority      text not null check (priority in ('routine', 'stat')),
    status        text not null default 'queued'
                  check (status in ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    input         jsonb compression lz4 not null,
    input_sha256  text not null,
    error         text,
    validate_ms   double precision not null,
    -- Rows of one CSV submission share a batch id.
    batch_id      uuid,
    created_at    timestamptz not null default now(),
    started_at    timestamptz,
    finished_at   timestamptz
);

create index analyses_tenant_recent on analyses (tenant_id, id desc);
create index analyses_tenant_batch on analyses (tenant_id, batch_id) where batch_id is not null;

-- The queue. One job per analysis, written in the same transaction as the analysis.
create table jobs (
    analysis_id      uuid primary key references analyses (id) on delete cascade,
    tenant_id        text not null,
    -- Jobs of one model are claimed together and run as one inference batch.
    model_name       text not null,
    priority         smallint not null,  -- 0 = stat, 1 = routine: lower runs first
    state            text not null default 'queued'
                     check (state in ('queued', 'running', 'done', 'failed', 'cancelled')),
    attempts         integer not null default 0,
    max_attempts     integer not null default 5,
    -- Not claimable before this: retries back off.
    run_after        timestamptz not null default now(),
    -- First claim. While a job runs, its analysis row (wide: the input) is not rewritten: "running"
    -- and its start time are read from here, and copied to the analysis when it finishes.
    started_at       timestamptz,
    lease_owner      uuid,
    lease_expires_at timestamptz,
    last_error       text,
    enqueued_at      timestamptz not null default now()
);

create index jobs_claimable on jobs (priority, enqueued_at) where state in ('queued', 'running');
create index jobs_claimable_by_model on jobs (model_name, priority, enqueued_at) where state in ('queued', 'running');

-- Written in the same transaction that completes the job, so a result exists exactly once.
create table results (
    analysis_id        uuid primary key references analyses (id) on delete cascade,
    tenant_id          text not null,
    -- lz4: results are a few kB (explanations) and written once per analysis; pglz costs more CPU.
    result             jsonb compression lz4 not null,
    timings            jsonb not null,
    execution_provider text not null,
    created_at         timestamptz not null default now()
);

-- Who read which result, and when.
create table audit_events (
    id          bigint generated always as identity primary key,
    tenant_id   text not null,
    actor       text not null,
    action      text not null,
    target_type text not null,
    target_id   text not null,
    at          timestamptz not null default now()
);

create index audit_events_tenant_at on audit_events (tenant_id, at desc);

-- A retried submission with the same Idempotency-Key replays the first answer.
create table idempotency_keys (
    tenant_id      text not null,
    key            text not null,
    request_sha256 text not null,
    response       jsonb not null,
    location       text,
    created_at     timestamptz not null default now(),
    primary key (tenant_id, key)
);
