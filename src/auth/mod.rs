//! Who is calling: bearer JWTs verified against configured asymmetric keys, mapped to a `Principal`.

pub mod keys;
pub mod verify;

use crate::app::AppState;
use crate::domain::ids::TenantId;
use crate::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Integrations and pipelines: submit analyses and read their results.
    Submitter,
    /// Reads results.
    Clinician,
    /// Manages models and reads the audit trail.
    Admin,
}

impl Role {
    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "submitter" => Some(Self::Submitter),
            "clinician" => Some(Self::Clinician),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: String,
    pub tenant: TenantId,
    pub roles: Vec<Role>,
}

impl Principal {
    /// Passes when the caller holds any of `roles`; a 403 otherwise.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if self.roles.iter().any(|r| roles.contains(r)) {
            Ok(())
        } else {
            let names: Vec<&str> = roles
                .iter()
                .map(|r| match r {
                    Role::Submitter => "submitter",
                    Role::Clinician => "clinician",
                    Role::Admin => "admin",
                })
                .collect();
            Err(ApiError::Forbidden(format!(
                "this needs one of the roles: {}",
                names.join(", ")
            )))
        }
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(AUTHORIZATION)
            .ok_or_else(|| ApiError::Unauthorized("no Authorization header".into()))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::Unauthorized("Authorization is not a Bearer token".into()))?;
        state.verifier.verify(token).await
    }
}
