//! One API error type. Every error leaves as RFC 9457 `application/problem+json`; a 4xx names the
//! field and the rule, a 5xx is logged in full and answered with a generic body.

use crate::domain::contract::FieldError;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

pub const PROBLEM_JSON: &str = "application/problem+json";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("bad request: {0}")]
    BadRequest(String),
    /// The reason is logged at debug level, never sent: it would help an attacker more than a client.
    #[error("unauthenticated: {0}")]
    Unauthorized(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("payload too large")]
    PayloadTooLarge,
    #[error("unsupported media type: {0}")]
    UnsupportedMediaType(String),
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("validation failed")]
    Validation(Vec<FieldError>),
    #[error("request timed out")]
    Timeout,
    /// The client's rate limit is spent; it may try again after this long.
    #[error("too many requests")]
    TooManyRequests(std::time::Duration),
    #[error("service unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        if database_unreachable(&e) {
            Self::Unavailable(DATABASE_DOWN.into())
        } else {
            Self::Internal(e.into())
        }
    }
}

const DATABASE_DOWN: &str = "the database is not reachable; try again shortly";

/// The database is gone or going (restarting, failing over, out of connections), as opposed to a
/// fault in a query: the client may retry, so the answer is 503, not 500.
pub fn database_unreachable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // SQLSTATE class 08 (connection exception), 53 (insufficient resources: disk full, out of
        // memory, too many connections), 57 (operator intervention: shutdown, crash recovery,
        // "cannot connect now") and 58 (system error: the server's own files or I/O). And any
        // error the server sent as FATAL: it ends the session, so it is about the connection,
        // not a query. A database closed to connections (`ALLOW_CONNECTIONS false`, SQLSTATE
        // 55000, whose class also holds query errors) is refused that way.
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| {
                ["08", "53", "57", "58"]
                    .iter()
                    .any(|class| c.starts_with(class))
            }) || db
                .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
                .is_some_and(|e| {
                    matches!(
                        e.severity(),
                        sqlx::postgres::PgSeverity::Fatal | sqlx::postgres::PgSeverity::Panic
                    )
                })
        }
        _ => false,
    }
}

/// A value the database cannot store as text (a NUL character: SQLSTATE 22021, or 22P05 in
/// jsonb): the client's input, not a fault, so 400 rather than 500.
fn caused_by_unstorable_text(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::Database(db)) if matches!(db.code().as_deref(), Some("22021" | "22P05"))
        )
    })
}

/// An internal error whose cause is an unreachable database (through `anyhow` contexts).
fn caused_by_database_outage(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause
            .downcast_ref::<sqlx::Error>()
            .is_some_and(database_unreachable)
    })
}

/// The problem document (RFC 9457), with `errors` listing each offending field on a 422.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// A URI naming the kind of problem.
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<FieldError>,
}

impl ApiError {
    fn parts(&self) -> (StatusCode, &'static str, String) {
        match self {
            Self::BadRequest(d) => (StatusCode::BAD_REQUEST, "bad-request", d.clone()),
            Self::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "a valid bearer token is required".into(),
            ),
            Self::Forbidden(d) => (StatusCode::FORBIDDEN, "forbidden", d.clone()),
            Self::NotFound => (
                StatusCode::NOT_FOUND,
                "not-found",
                "no such resource".into(),
            ),
            Self::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "this resource does not support that method".into(),
            ),
            Self::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "the request body exceeds the configured limit".into(),
            ),
            Self::UnsupportedMediaType(d) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                d.clone(),
            ),
            Self::Conflict(d) => (StatusCode::CONFLICT, "conflict", d.clone()),
            Self::Validation(errors) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation-failed",
                errors
                    .iter()
                    .map(|e| format!("{}: {}", e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
            Self::Timeout => (
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the request took too long".into(),
            ),
            Self::TooManyRequests(wait) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                format!(
                    "this client has sent more requests than its rate limit allows; retry after {} s",
                    retry_after_secs(*wait)
                ),
            ),
            Self::Unavailable(d) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", d.clone()),
            Self::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "an internal error occurred; it has been logged".into(),
            ),
        }
    }

    pub fn problem(&self) -> Problem {
        let (status, slug, detail) = self.parts();
        Problem {
            kind: format!("https://onkos.dev/problems/{slug}"),
            title: status.canonical_reason().unwrap_or("Error").into(),
            status: status.as_u16(),
            detail,
            errors: match self {
                Self::Validation(errors) => errors.clone(),
                _ => Vec::new(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let this = match self {
            Self::Internal(e) if caused_by_database_outage(&e) => {
                tracing::warn!(error = format!("{e:#}"), "the database is unreachable");
                Self::Unavailable(DATABASE_DOWN.into())
            }
            Self::Internal(e) if caused_by_unstorable_text(&e) => Self::BadRequest(
                "a text value contains a character that cannot be stored (NUL, U+0000)".into(),
            ),
            other => other,
        };
        match &this {
            Self::Internal(e) => tracing::error!(error = ?e, "internal error"),
            Self::Unavailable(d) => tracing::warn!(reason = %d, "unavailable"),
            Self::Unauthorized(reason) => tracing::debug!(%reason, "rejected credentials"),
            other => tracing::debug!(error = %other, "client error"),
        }
        let problem = this.problem();
        let status =
            StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (status, axum::Json(problem)).into_response();
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(PROBLEM_JSON));
        let retry_after = match &this {
            Self::TooManyRequests(wait) => Some(retry_after_secs(*wait)),
            // A 503 is something that may pass: the database restarting or failing over, a full
            // table of event streams, a blob store that is full or unreachable.
            Self::Unavailable(_) => Some(UNAVAILABLE_RETRY_AFTER_SECS),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// What a 503 asks a client to wait before it tries again.
const UNAVAILABLE_RETRY_AFTER_SECS: u64 = 2;

/// Whole seconds (Retry-After has no fractions), rounded up, at least 1.
fn retry_after_secs(wait: std::time::Duration) -> u64 {
    u64::try_from(wait.as_nanos().div_ceil(1_000_000_000))
        .unwrap_or(u64::MAX)
        .max(1)
}

pub type ApiResult<T> = Result<T, ApiError>;
