//! Liveness and readiness for orchestrators and load balancers.

use crate::app::AppState;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Serialize;

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Readiness {
    /// `ready` or `not_ready`.
    pub status: String,
    pub database: bool,
    /// Model versions with a session in this process.
    pub models_loaded: usize,
    /// The ONNX Runtime execution provider in use, e.g. `CPUExecutionProvider`.
    pub execution_provider: String,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "Alive", body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// The service can take work: the database answers and the models are loaded.
#[utoipa::path(get, path = "/readyz", tag = "health", responses(
    (status = 200, description = "Ready", body = Readiness),
    (status = 503, description = "Not ready: the database does not answer", body = Readiness),
))]
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let database = sqlx::query_scalar!("select 1 as \"one!\"")
        .fetch_one(&state.pool)
        .await
        .is_ok();
    let models_loaded = state.registry.loaded_count();
    let ready = database && models_loaded > 0;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            status: if ready { "ready" } else { "not_ready" }.into(),
            database,
            models_loaded,
            execution_provider: state.registry.provider().into(),
        }),
    )
}
