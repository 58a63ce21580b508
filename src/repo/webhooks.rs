//! Webhook endpoints and their outbox of deliveries (the outbox rows are written by triggers in
//! the transaction that changes an analysis; see migrations/0008_webhooks.sql).

use crate::domain::ids::TenantId;
use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;
use uuid::Uuid;

#[derive(Debug)]
pub struct Webhook {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

pub async fn insert(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    id: Uuid,
    url: &str,
    secret: &str,
    events: &[String],
    created_by: &str,
) -> sqlx::Result<Webhook> {
    sqlx::query_as!(
        Webhook,
        "insert into webhooks (id, tenant_id, url, secret, events, created_by) values ($1, $2, $3, $4, $5, $6)
         returning id, url, events, created_by, created_at",
        id,
        tenant.as_str(),
        url,
        secret,
        events,
        created_by,
    )
    .fetch_one(db)
    .await
}

/// The tenant's active endpoints, newest first.
pub async fn list(db: impl PgExecutor<'_>, tenant: &TenantId) -> sqlx::Result<Vec<Webhook>> {
    sqlx::query_as!(
        Webhook,
        "select id, url, events, created_by, created_at from webhooks
         where tenant_id = $1 and disabled_at is null order by created_at desc, id",
        tenant.as_str(),
    )
    .fetch_all(db)
    .await
}

pub async fn find(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    id: Uuid,
) -> sqlx::Result<Option<Webhook>> {
    sqlx::query_as!(
        Webhook,
        "select id, url, events, created_by, created_at from webhooks
         where tenant_id = $1 and id = $2 and disabled_at is null",
        tenant.as_str(),
        id,
    )
    .fetch_optional(db)
    .await
}

/// Stops an endpoint: no new events, and its pending deliveries are not sent. Its delivery
/// record stays. False when there was no such active endpoint.
pub async fn disable(db: impl PgExecutor<'_>, tenant: &TenantId, id: Uuid) -> sqlx::Result<bool> {
    Ok(sqlx::query!(
        "update webhooks set disabled_at = now() where tenant_id = $1 and id = $2 and disabled_at is null",
        tenant.as_str(),
        id,
    )
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// One delivery as recorded.
#[derive(Debug)]
pub struct Delivery {
    pub id: Uuid,
    pub analysis_id: Uuid,
    pub event: String,
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: DateTime<Utc>,
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

/// An endpoint's deliveries, newest first.
pub async fn deliveries(
    db: impl PgExecutor<'_>,
    tenant: &TenantId,
    webhook: Uuid,
    limit: i64,
) -> sqlx::Result<Vec<Delivery>> {
    sqlx::query_as!(
        Delivery,
        "select id, analysis_id, event, state, attempts, next_attempt_at, last_status, last_error,
                last_attempt_at, created_at, delivered_at
         from webhook_deliveries where tenant_id = $1 and webhook_id = $2
         order by created_at desc, id limit $3",
        tenant.as_str(),
        webhook,
        limit,
    )
    .fetch_all(db)
    .await
}

/// A delivery a deliverer now holds, with where to send it and the key to sign it with.
pub struct Due {
    pub id: Uuid,
    pub payload: Value,
    pub attempts: i32,
    pub url: String,
    pub secret: String,
}

impl std::fmt::Debug for Due {
    // The signing key is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Due")
            .field("id", &self.id)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// Claims up to `limit` due deliveries of active endpoints, oldest first, leasing them for
/// `lease_secs` (a deliverer that dies lets them lapse and another sends them).
pub async fn claim_due(
    db: impl PgExecutor<'_>,
    limit: i64,
    lease_secs: f64,
) -> sqlx::Result<Vec<Due>> {
    sqlx::query_as!(
        Due,
        r#"with due as (
               select d.id from webhook_deliveries d join webhooks w on w.id = d.webhook_id
               where d.state = 'pending' and d.next_attempt_at <= now()
                 and (d.lease_expires_at is null or d.lease_expires_at < now())
                 and w.disabled_at is null
               order by d.next_attempt_at
               limit $1
               for update of d skip locked
           ), claimed as (
               update webhook_deliveries d
               set lease_expires_at = now() + make_interval(secs => $2), attempts = d.attempts + 1,
                   last_attempt_at = now()
               from due where d.id = due.id
               returning d.id, d.webhook_id, d.payload, d.attempts
           )
           select c.id as "id!", c.payload as "payload!", c.attempts as "attempts!", w.url, w.secret
           from claimed c join webhooks w on w.id = c.webhook_id"#,
        limit,
        lease_secs,
    )
    .fetch_all(db)
    .await
}

/// What one attempt got.
#[derive(Debug)]
pub struct AttemptOutcome {
    pub id: Uuid,
    pub attempts: i32,
    pub status: Option<i32>,
    pub error: Option<String>,
    /// Delivered (a 2xx answer).
    pub delivered: bool,
    /// When not delivered: retry after this many seconds, or `None` to give up.
    pub retry_after_secs: Option<f64>,
}

/// Records an attempt's outcome, fenced on the attempt number (a lapsed lease re-sent by another
/// deliverer is recorded once, by the later attempt).
pub async fn record(db: impl PgExecutor<'_>, o: &AttemptOutcome) -> sqlx::Result<()> {
    let state = match (o.delivered, o.retry_after_secs) {
        (true, _) => "delivered",
        (false, Some(_)) => "pending",
        (false, None) => "failed",
    };
    sqlx::query!(
        "update webhook_deliveries
         set state = $3, last_status = $4, last_error = $5, lease_expires_at = null,
             next_attempt_at = now() + make_interval(secs => $6),
             delivered_at = case when $3 = 'delivered' then now() end
         where id = $1 and attempts = $2",
        o.id,
        o.attempts,
        state,
        o.status,
        o.error,
        o.retry_after_secs.unwrap_or(0.0),
    )
    .execute(db)
    .await?;
    Ok(())
}
