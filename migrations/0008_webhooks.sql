-- Webhooks: endpoints a tenant registers, and a durable outbox of deliveries to them.
create table webhooks (
    id          uuid primary key,
    tenant_id   text not null,
    url         text not null,
    -- The HMAC key the receiver shares; never returned by the API.
    secret      text not null,
    -- e.g. {analysis.succeeded, analysis.failed}
    events      text[] not null,
    created_by  text not null,
    created_at  timestamptz not null default now(),
    disabled_at timestamptz
);

create index webhooks_tenant on webhooks (tenant_id) where disabled_at is null;

-- The outbox: one row per event and endpoint, written in the transaction that changed the
-- analysis (by the triggers below), so a crash or restart loses no event.
create table webhook_deliveries (
    id               uuid primary key default gen_random_uuid(),
    webhook_id       uuid not null references webhooks (id) on delete cascade,
    tenant_id        text not null,
    analysis_id      uuid not null,
    event            text not null,
    payload          jsonb not null,
    state            text not null default 'pending' check (state in ('pending', 'delivered', 'failed')),
    attempts         integer not null default 0,
    next_attempt_at  timestamptz not null default now(),
    -- Held by a deliverer while it sends; a deliverer that dies lets it lapse.
    lease_expires_at timestamptz,
    last_status      integer,
    last_error       text,
    last_attempt_at  timestamptz,
    created_at       timestamptz not null default now(),
    delivered_at     timestamptz
);

create index webhook_deliveries_due on webhook_deliveries (next_attempt_at) where state = 'pending';
create index webhook_deliveries_by_hook on webhook_deliveries (webhook_id, created_at desc);

-- The event body for an analysis state change.
create function onkos_analysis_event(a_id uuid, a_status text, a_model text, a_version text,
                                     a_subject text, attempt integer) returns jsonb
language sql immutable as $$
    select jsonb_strip_nulls(jsonb_build_object(
        'type', 'analysis.' || a_status, 'id', a_id, 'status', a_status,
        'model', a_model, 'model_version', a_version, 'subject', a_subject, 'attempt', attempt))
$$;

-- Statement-level triggers with transition tables: one query per statement, however many rows
-- (submissions and completions are written set-wise), and nothing at all to do for a tenant
-- without webhooks beyond an index probe.
create function onkos_analyses_inserted() returns trigger language plpgsql as $$
begin
    insert into webhook_deliveries (webhook_id, tenant_id, analysis_id, event, payload)
    select w.id, n.tenant_id, n.id, 'analysis.' || n.status,
           onkos_analysis_event(n.id, n.status, n.model_name, n.model_version, n.subject, null)
                || jsonb_build_object('occurred_at', now())
    from new_rows n
    join webhooks w on w.tenant_id = n.tenant_id and w.disabled_at is null
                   and ('analysis.' || n.status) = any (w.events);
    if found then
        perform pg_notify('onkos_webhooks', '');
    end if;
    return null;
end $$;

create trigger analyses_events_insert after insert on analyses
    referencing new table as new_rows
    for each statement execute function onkos_analyses_inserted();

create function onkos_analyses_updated() returns trigger language plpgsql as $$
begin
    insert into webhook_deliveries (webhook_id, tenant_id, analysis_id, event, payload)
    select w.id, n.tenant_id, n.id, 'analysis.' || n.status,
           onkos_analysis_event(n.id, n.status, n.model_name, n.model_version, n.subject, null)
                || jsonb_build_object('occurred_at', now())
    from new_rows n
    join old_rows o on o.id = n.id and o.status is distinct from n.status
    join webhooks w on w.tenant_id = n.tenant_id and w.disabled_at is null
                   and ('analysis.' || n.status) = any (w.events);
    if found then
        perform pg_notify('onkos_webhooks', '');
    end if;
    return null;
end $$;

create trigger analyses_events_update after update on analyses
    referencing old table as old_rows new table as new_rows
    for each statement execute function onkos_analyses_updated();

-- "running" lives on the job (the wide analysis row is not rewritten when a worker claims it).
create function onkos_jobs_claimed() returns trigger language plpgsql as $$
begin
    insert into webhook_deliveries (webhook_id, tenant_id, analysis_id, event, payload)
    select w.id, n.tenant_id, n.analysis_id, 'analysis.running',
           onkos_analysis_event(n.analysis_id, 'running', a.model_name, a.model_version, a.subject, n.attempts)
                || jsonb_build_object('occurred_at', now())
    from new_rows n
    join old_rows o on o.analysis_id = n.analysis_id
                   and (o.state <> 'running' or o.attempts <> n.attempts)
    join analyses a on a.id = n.analysis_id
    join webhooks w on w.tenant_id = n.tenant_id and w.disabled_at is null
                   and 'analysis.running' = any (w.events)
    where n.state = 'running';
    if found then
        perform pg_notify('onkos_webhooks', '');
    end if;
    return null;
end $$;

create trigger jobs_events_update after update on jobs
    referencing old table as old_rows new table as new_rows
    for each statement execute function onkos_jobs_claimed();
