//! The HTTP surface: routes, middleware (request id, trace span per route, timeout, body limit)
//! and the guarantee that every error response is problem+json.

pub mod analyses;
pub mod audit;
pub mod embeddings;
pub mod extract;
pub mod health;
pub mod limit;
pub mod metrics;
pub mod models;
pub mod openapi;
pub mod slides;
pub mod webhooks;

use crate::app::AppState;
use crate::error::{ApiError, PROBLEM_JSON};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Router, middleware};
use std::time::Duration;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;
use utoipa_swagger_ui::SwaggerUi;

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    let tracked = state.clone();
    let limited = state.clone();
    let timeout = state.config.request_timeout();
    let body_limit = state.config.body_limit_bytes;
    let model_limit = state.config.model_upload_limit_bytes;
    let api = Router::new()
        .route(
            "/v1/analyses",
            get(analyses::read::list).post(analyses::submit::create),
        )
        .route(
            "/v1/analyses/{id}",
            get(analyses::read::get).delete(analyses::cancel::cancel),
        )
        .route(
            "/v1/models",
            get(models::list)
                .post(models::register)
                .layer(DefaultBodyLimit::max(model_limit)),
        )
        .route("/v1/models/{name}", get(models::get))
        .route("/v1/models/{name}/versions/{version}", get(models::version))
        .route(
            "/v1/models/{name}/versions/{version}/activate",
            post(models::activate),
        )
        .route(
            "/v1/models/{name}/versions/{version}/retire",
            post(models::retire),
        )
        .route(
            "/v1/analyses/{id}/heatmap.png",
            get(analyses::pictures::heatmap),
        )
        .route(
            "/v1/analyses/{id}/tiles.geojson",
            get(analyses::pictures::geojson),
        )
        .route(
            "/v1/analyses/{id}/evidence/{rank}",
            get(analyses::pictures::evidence),
        )
        .route(
            "/v1/analyses/{id}/provenance",
            get(analyses::provenance::get),
        )
        .route("/v1/analyses/{id}/events", get(analyses::events::stream))
        .route("/v1/analyses/{id}/fhir", get(analyses::fhir::get))
        .route("/v1/audit", get(audit::list))
        .route("/v1/webhooks", get(webhooks::list).post(webhooks::create))
        .route("/v1/webhooks/{id}", axum::routing::delete(webhooks::delete))
        .route("/v1/webhooks/{id}/deliveries", get(webhooks::deliveries))
        .route("/v1/slides/{id}", get(slides::get))
        .route("/v1/embeddings/{id}", get(embeddings::get))
        .route("/v1/slides/{id}/thumbnail", get(slides::thumbnail))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::metrics))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(state.clone());
    // Slides stream for as long as gigabytes take, under their own size limit (checked while
    // streaming) and timeout.
    let uploads = Router::new()
        .route("/v1/slides", post(slides::upload))
        .route("/v1/embeddings", post(embeddings::upload))
        .layer(DefaultBodyLimit::disable())
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(state.config.slide_upload_timeout_secs),
        ))
        .with_state(state);
    let docs = SwaggerUi::new("/docs").url("/openapi.json", openapi::ApiDoc::openapi_document());
    Router::new()
        .merge(docs)
        .merge(api)
        .merge(uploads)
        .layer(middleware::map_response(problem_for_bare_errors))
        .layer(middleware::from_fn_with_state(limited, limit::limit))
        .layer(middleware::from_fn_with_state(tracked, metrics::track))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::new())
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request| {
            // Named by route template, not the raw path, to keep span cardinality low.
            let route = req
                .extensions()
                .get::<MatchedPath>()
                .map_or("unmatched", MatchedPath::as_str);
            let request_id = req
                .headers()
                .get(REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let span = tracing::info_span!(
                "request",
                method = %req.method(),
                route,
                request_id,
                trace_id = tracing::field::Empty
            );
            // A caller's `traceparent` makes this request part of its trace.
            crate::telemetry::tracing::join(
                &span,
                crate::telemetry::tracing::remote_context(req.headers()),
            );
            span
        }))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
}

/// What a worker-only process serves: its metrics and the probes, nothing of the API.
pub fn probes(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::metrics))
        .fallback(|| async { ApiError::NotFound })
        .with_state(state)
}

/// Layers outside our handlers (timeout, panic catcher, body limits) answer with bare bodies; turn
/// any error response that is not already a problem document into one, so clients parse one format.
async fn problem_for_bare_errors(response: Response) -> Response {
    let status = response.status();
    // A problem already, or a JSON document a handler chose to send with the status (`/readyz`).
    let typed = response.headers().get(CONTENT_TYPE).is_some_and(|t| {
        t == HeaderValue::from_static(PROBLEM_JSON)
            || t == HeaderValue::from_static("application/json")
    });
    if status.as_u16() < 400 || typed {
        return response;
    }
    let error = match status {
        StatusCode::NOT_FOUND => ApiError::NotFound,
        StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        StatusCode::REQUEST_TIMEOUT => ApiError::Timeout,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => {
            ApiError::UnsupportedMediaType("unsupported content type".into())
        }
        s if s.is_client_error() => {
            ApiError::BadRequest("the request could not be processed".into())
        }
        _ => ApiError::Internal(anyhow::anyhow!("{status} from a middleware layer")),
    };
    let mut problem = error.into_response();
    *problem.status_mut() = status;
    problem
}

impl openapi::ApiDoc {
    pub fn openapi_document() -> utoipa::openapi::OpenApi {
        <Self as utoipa::OpenApi>::openapi()
    }
}
