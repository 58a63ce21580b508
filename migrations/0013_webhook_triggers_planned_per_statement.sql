-- The webhook triggers of 0008 ran their queries through PL/pgSQL's plan cache. A query over
-- transition tables is planned once per connection, with the row counts of the first statement
-- that fired it: usually one row. The join of a statement's old and new rows then stayed a nested
-- loop for statements of hundreds of rows, which is quadratic: an update of 1,024 analyses spent
-- 60 ms in the trigger against 8 ms for the update itself, and a worker's completion of a
-- 256-job batch several milliseconds.
--
-- Now each statement's query is planned for its own transition tables (EXECUTE plans afresh), and
-- it is skipped when no webhook is enabled at all: one probe of the partial index webhooks_tenant.
-- EXECUTE does not set FOUND, so the rows written are counted with GET DIAGNOSTICS.

create or replace function onkos_analyses_inserted() returns trigger language plpgsql as $$
declare
    written bigint;
begin
    if not exists (select 1 from webhooks where disabled_at is null) then
        return null;
    end if;
    execute $q$
        insert into webhook_deliveries (webhook_id, tenant_id, analysis_id, event, payload)
        select w.id, n.tenant_id, n.id, 'analysis.' || n.status,
               onkos_analysis_event(n.id, n.status, n.model_name, n.model_version, n.subject, null)
                    || jsonb_build_object('occurred_at', now())
        from new_rows n
        join webhooks w on w.tenant_id = n.tenant_id and w.disabled_at is null
                       and ('analysis.' || n.status) = any (w.events)
    $q$;
    get diagnostics written = row_count;
    if written > 0 then
        perform pg_notify('onkos_webhooks', '');
    end if;
    return null;
end $$;

create or replace function onkos_analyses_updated() returns trigger language plpgsql as $$
declare
    written bigint;
begin
    if not exists (select 1 from webhooks where disabled_at is null) then
        return null;
    end if;
    execute $q$
        insert into webhook_deliveries (webhook_id, tenant_id, analysis_id, event, payload)
        select w.id, n.tenant_id, n.id, 'analysis.' || n.status,
               onkos_analysis_event(n.id, n.status, n.model_name, n.model_version, n.subject, null)
                    || jsonb_build_object('occurred_at', now())
        from new_rows n
        join old_rows o on o.id = n.id and o.status is distinct from n.status
        join webhooks w on w.tenant_id = n.tenant_id and w.disabled_at is null
                       and ('analysis.' || n.status) = any (w.events)
    $q$;
    get diagnostics written = row_count;
    if written > 0 then
        perform pg_notify('onkos_webhooks', '');
    end if;
    return null;
end $$;

create or replace function onkos_jobs_claimed() returns trigger language plpgsql as $$
declare
    written bigint;
begin
    if not exists (select 1 from webhooks where disabled_at is null) then
        return null;
    end if;
    execute $q$
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
        where n.state = 'running'
    $q$;
    get diagnostics written = row_count;
    if written > 0 then
        perform pg_notify('onkos_webhooks', '');
    end if;
    return null;
end $$;
