//! `GET /metrics` (Prometheus text) and the middleware that counts and times every request.

use crate::app::AppState;
use crate::repo;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::time::Instant;

/// Prometheus metrics: requests and latency by route template, queue depth by state and priority,
/// per-stage durations, batch sizes, analyses by outcome and the execution provider in use.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses(
        (status = 200, description = "OpenMetrics text exposition (Prometheus scrapes it)", content_type = "application/openmetrics-text", body = String),
    ))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    // A database outage must not hide the process's own metrics.
    let queue = match repo::jobs::depth(&state.pool).await {
        Ok(rows) => rows,
        Err(e) => {
            tracing::warn!(error = %e, "queue depth unavailable for /metrics");
            Vec::new()
        }
    };
    let text = state.metrics.render(&queue, state.registry.provider());
    (
        [(
            CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// Counts and times each request under its route template (low cardinality: ids are not labels).
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    // A fixed set: any other method string would be a new series per request.
    let method = match request.method().as_str() {
        m @ ("GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS") => m,
        _ => "other",
    }
    .to_owned();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let response = next.run(request).await;
    let labels = crate::telemetry::metrics::RouteLabels {
        method,
        route,
        status: response.status().as_u16(),
    };
    state.metrics.requests.get_or_create(&labels).inc();
    state
        .metrics
        .request_seconds
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    response
}
