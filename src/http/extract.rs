//! Request bodies and their rejections, as our problem+json naming what is wrong.

use crate::error::ApiError;
use axum::extract::rejection::BytesRejection;
use axum::http::HeaderMap;
use axum::http::header::CONTENT_TYPE;
use serde_json::{Map, Value};

/// What a submission body is, by its declared content type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Json,
    Csv,
}

/// JSON is accepted as `application/json` (or `+json`), and also without a content type or with
/// curl's default `application/x-www-form-urlencoded`, so that `curl -d @case.json` works as
/// written; `text/csv` is a batch; any other declared type is a 415.
pub fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let declared = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match declared.as_deref() {
        None | Some("application/json" | "application/x-www-form-urlencoded") => Ok(BodyKind::Json),
        Some(ct) if ct.ends_with("+json") => Ok(BodyKind::Json),
        Some("text/csv") => Ok(BodyKind::Csv),
        Some(other) => Err(ApiError::UnsupportedMediaType(format!(
            "expected application/json or text/csv, got {other}"
        ))),
    }
}

/// The body's bytes, or 413 when it exceeds the configured limit.
pub fn body_bytes(
    body: Result<axum::body::Bytes, BytesRejection>,
) -> Result<axum::body::Bytes, ApiError> {
    body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge
        } else {
            ApiError::BadRequest(format!("cannot read the request body: {e}"))
        }
    })
}

/// Parses a JSON object body.
pub fn json_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::BadRequest(
            "the body must be a JSON object".into(),
        )),
        Err(e) => Err(ApiError::BadRequest(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}
