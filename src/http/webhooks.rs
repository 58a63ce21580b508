//! `/v1/webhooks`: a tenant's callback endpoints and what was delivered to them.

use crate::app::AppState;
use crate::auth::{Principal, Role};
use crate::domain::contract::FieldError;
use crate::error::{ApiError, ApiResult, Problem};
use crate::http::extract::{BodyKind, body_bytes, body_kind};
use crate::repo;
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The events an endpoint can subscribe to: one per analysis state.
pub const EVENTS: [&str; 5] = [
    "analysis.queued",
    "analysis.running",
    "analysis.succeeded",
    "analysis.failed",
    "analysis.cancelled",
];

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhook {
    /// Where events are POSTed (http or https; https outside a trusted network).
    #[schema(
        max_length = 2048,
        pattern = "^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?$"
    )]
    pub url: String,
    /// The HMAC-SHA256 key for `Onkos-Signature`, 16–256 characters. Never shown again.
    #[schema(min_length = 16, max_length = 256)]
    pub secret: String,
    /// Any of `analysis.queued`, `analysis.running`, `analysis.succeeded`, `analysis.failed`,
    /// `analysis.cancelled`.
    #[schema(value_type = Vec<WebhookEvent>, min_items = 1)]
    pub events: Vec<String>,
}

/// An analysis state change a webhook can subscribe to (documents `events`; see `EVENTS`).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub enum WebhookEvent {
    #[serde(rename = "analysis.queued")]
    Queued,
    #[serde(rename = "analysis.running")]
    Running,
    #[serde(rename = "analysis.succeeded")]
    Succeeded,
    #[serde(rename = "analysis.failed")]
    Failed,
    #[serde(rename = "analysis.cancelled")]
    Cancelled,
}

impl std::fmt::Debug for CreateWebhook {
    // The secret is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CreateWebhook")
            .field("url", &self.url)
            .field("events", &self.events)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookView {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct WebhookList {
    pub items: Vec<WebhookView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    /// Also sent as `Onkos-Delivery` and as `delivery` in the body: the same on every retry.
    pub id: Uuid,
    pub analysis_id: Uuid,
    pub event: String,
    /// `pending` (queued or waiting to retry), `delivered` or `failed` (attempts exhausted).
    pub state: String,
    pub attempts: i32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The HTTP status of the last answer, if there was one.
    pub last_status: Option<i32>,
    pub last_error: Option<String>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub delivered_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryList {
    /// Newest first.
    pub items: Vec<DeliveryView>,
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeliveryParams {
    /// Page size, 1–500 (default 100).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<i64>,
}

fn view(w: repo::webhooks::Webhook) -> WebhookView {
    WebhookView {
        id: w.id,
        url: w.url,
        events: w.events,
        created_by: w.created_by,
        created_at: w.created_at,
    }
}

fn check(body: &CreateWebhook, allow_private: bool) -> Result<(), Vec<FieldError>> {
    let mut errors = Vec::new();
    match reqwest::Url::parse(&body.url) {
        Ok(_) if !crate::jobs::webhooks::literal_host_allowed(&body.url, allow_private) => {
            errors.push(FieldError::new(
                "url",
                "private_address",
                "a loopback, private or link-local address: webhooks reach public addresses only \
                 unless the operator sets ONKOS_WEBHOOK_ALLOW_PRIVATE_NETWORKS=true",
            ));
        }
        Ok(url) if !matches!(url.scheme(), "http" | "https") => errors.push(FieldError::new(
            "url",
            "scheme",
            "must be an http or https URL",
        )),
        Ok(url) if url.host_str().is_none_or(str::is_empty) => {
            errors.push(FieldError::new("url", "host", "must name a host"));
        }
        Ok(_) => {}
        Err(e) => errors.push(FieldError::new(
            "url",
            "not_a_url",
            format!("not a URL: {e}"),
        )),
    }
    let secret = body.secret.chars().count();
    if !(16..=256).contains(&secret) {
        errors.push(FieldError::new(
            "secret",
            "length",
            format!("must be 16 to 256 characters, got {secret}"),
        ));
    }
    if body.events.is_empty() {
        errors.push(FieldError::new(
            "events",
            "missing",
            "name at least one event",
        ));
    }
    for (i, event) in body.events.iter().enumerate() {
        if !EVENTS.contains(&event.as_str()) {
            errors.push(FieldError::new(
                format!("events[{i}]"),
                "unknown",
                format!("{event:?} is not one of {}", EVENTS.join(", ")),
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Register a webhook endpoint.
///
/// On each subscribed state change of the tenant's analyses, onkos POSTs a JSON event
/// (`type`, `id`, `status`, `model`, `model_version`, `subject`, `occurred_at`, `delivery`) signed
/// in `Onkos-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`. Receivers should
/// refuse a `t` more than 300 s from their clock (replay window) and de-duplicate on
/// `Onkos-Delivery`. Events are queued in the same transaction as the change and retried with
/// exponential backoff until a 2xx answer.
#[utoipa::path(post, path = "/v1/webhooks", tag = "webhooks",
    request_body = CreateWebhook,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Registered", body = WebhookView),
        (status = 400, description = "The body is not JSON", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the submitter or admin role", body = Problem, content_type = "application/problem+json"),
        (status = 415, description = "Not application/json", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "A field is invalid", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<WebhookView>)> {
    principal.require(&[Role::Submitter, Role::Admin])?;
    if body_kind(&headers)? != BodyKind::Json {
        return Err(ApiError::UnsupportedMediaType(
            "expected application/json".into(),
        ));
    }
    let bytes = body_bytes(body)?;
    let body: CreateWebhook = serde_json::from_slice(&bytes).map_err(|e| {
        if e.is_data() {
            ApiError::Validation(vec![FieldError::new("body", "schema", e.to_string())])
        } else {
            ApiError::BadRequest(format!("the body is not valid JSON: {e}"))
        }
    })?;
    check(&body, state.config.webhook_allow_private_networks).map_err(ApiError::Validation)?;
    let mut events = body.events.clone();
    events.sort();
    events.dedup();
    let mut tx = state.pool.begin().await?;
    let id = Uuid::now_v7();
    let hook = repo::webhooks::insert(
        &mut *tx,
        &principal.tenant,
        id,
        &body.url,
        &body.secret,
        &events,
        &principal.subject,
    )
    .await?;
    repo::audit::record(
        &mut *tx,
        &principal.tenant,
        &principal.subject,
        "webhook.create",
        "webhook",
        &id.to_string(),
    )
    .await?;
    tx.commit().await?;
    Ok((StatusCode::CREATED, Json(view(hook))))
}

/// List the tenant's webhook endpoints (secrets are never shown).
#[utoipa::path(get, path = "/v1/webhooks", tag = "webhooks",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The endpoints", body = WebhookList),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the submitter or admin role", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> ApiResult<Json<WebhookList>> {
    principal.require(&[Role::Submitter, Role::Admin])?;
    let items = repo::webhooks::list(&state.pool, &principal.tenant).await?;
    Ok(Json(WebhookList {
        items: items.into_iter().map(view).collect(),
    }))
}

/// Remove a webhook endpoint: no further events are queued or sent to it; its delivery record stays.
#[utoipa::path(delete, path = "/v1/webhooks/{id}", tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the submitter or admin role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint in the caller's tenant", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    principal.require(&[Role::Submitter, Role::Admin])?;
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    let mut tx = state.pool.begin().await?;
    if !repo::webhooks::disable(&mut *tx, &principal.tenant, id).await? {
        return Err(ApiError::NotFound);
    }
    repo::audit::record(
        &mut *tx,
        &principal.tenant,
        &principal.subject,
        "webhook.delete",
        "webhook",
        &id.to_string(),
    )
    .await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT)
}

/// What was delivered to an endpoint: each event, its attempts and the receiver's last answer.
#[utoipa::path(get, path = "/v1/webhooks/{id}/deliveries", tag = "webhooks",
    params(("id" = Uuid, Path, description = "The endpoint id"), DeliveryParams),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The deliveries, newest first", body = DeliveryList),
        (status = 400, description = "`limit` is out of range", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No valid bearer token", body = Problem, content_type = "application/problem+json"),
        (status = 403, description = "The token lacks the submitter or admin role", body = Problem, content_type = "application/problem+json"),
        (status = 404, description = "No such endpoint in the caller's tenant", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "The database is not reachable", body = Problem, content_type = "application/problem+json"),
    ))]
pub async fn deliveries(
    State(state): State<AppState>,
    principal: Principal,
    Path(id): Path<String>,
    params: Result<Query<DeliveryParams>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<DeliveryList>> {
    principal.require(&[Role::Submitter, Role::Admin])?;
    let Query(params) = params.map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and 500, got {limit}"
        )));
    }
    let id = Uuid::parse_str(&id).map_err(|_| ApiError::NotFound)?;
    repo::webhooks::find(&state.pool, &principal.tenant, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let rows = repo::webhooks::deliveries(&state.pool, &principal.tenant, id, limit).await?;
    Ok(Json(DeliveryList {
        items: rows
            .into_iter()
            .map(|d| DeliveryView {
                id: d.id,
                analysis_id: d.analysis_id,
                event: d.event,
                next_attempt_at: (d.state == "pending").then_some(d.next_attempt_at),
                state: d.state,
                attempts: d.attempts,
                last_status: d.last_status,
                last_error: d.last_error,
                last_attempt_at: d.last_attempt_at,
                created_at: d.created_at,
                delivered_at: d.delivered_at,
            })
            .collect(),
    }))
}
