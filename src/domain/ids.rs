//! Identifier newtypes, so an analysis id is never confused with a tenant or a subject.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// An analysis. UUIDv7, so ids sort by submission time and make a natural list cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid)]
pub struct AnalysisId(pub Uuid);

impl AnalysisId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for AnalysisId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for AnalysisId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The organisation a caller belongs to. Every stored row carries one; every query filters on it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TenantId(String);

impl TenantId {
    /// Tenants come from signed tokens, but they end up in URLs, logs and SQL parameters, so the
    /// alphabet is kept small: 1–64 of `a-z 0-9 - _ .`.
    pub fn parse(raw: &str) -> Result<Self, String> {
        let ok = !raw.is_empty()
            && raw.len() <= 64
            && raw
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if ok {
            Ok(Self(raw.to_owned()))
        } else {
            Err(format!(
                "tenant {raw:?} must be 1-64 characters of a-z, 0-9, '-', '_' or '.'"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_accepts_simple_names() {
        assert_eq!(
            TenantId::parse("oslo-uh").map(|t| t.to_string()),
            Ok("oslo-uh".into())
        );
    }

    #[test]
    fn tenant_rejects_empty_upper_case_and_punctuation() {
        for bad in ["", "Oslo", "a b", "x/y", &"a".repeat(65)] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn analysis_ids_sort_by_creation() {
        let first = AnalysisId::new();
        let second = AnalysisId::new();
        assert!(first.0 < second.0);
    }
}
