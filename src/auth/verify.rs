//! Token verification. The algorithm comes from configuration, never from the token; `iss`, `aud`,
//! `exp` and `nbf` are checked; keys come from a PEM file, a JWKS URL or the development key pair.

use super::{Principal, Role};
use crate::config::Config;
use crate::domain::ids::TenantId;
use crate::error::ApiError;
use anyhow::Context;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Mutex, RwLock};

/// The claims onkos reads. `tenant` and `roles` are private claims set by the issuer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub tenant: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct RawClaims {
    sub: String,
    exp: u64,
    tenant: String,
    #[serde(default)]
    roles: Vec<String>,
}

/// A JWKS fetched on demand and again when a token names a key id it does not hold (key rotation),
/// at most once per `min_refresh` so unknown-kid floods cannot hammer the issuer.
struct Jwks {
    url: String,
    min_refresh: Duration,
    /// Keys are refetched when older than this, so a key the issuer withdrew stops verifying.
    max_age: Duration,
    /// Bumped on every refetch; tokens verified under an older key set are verified again.
    generation: AtomicU64,
    client: reqwest::Client,
    keys: RwLock<HashMap<String, DecodingKey>>,
    last_fetch: Mutex<Option<Instant>>,
}

enum Keys {
    /// One key; when it has a kid, a token naming another kid is refused.
    Single {
        kid: Option<String>,
        key: DecodingKey,
    },
    Jwks(Jwks),
}

pub struct Verifier {
    validation: Validation,
    keys: Keys,
    /// Tokens already verified, until they expire: a pipeline sends the same token thousands of
    /// times, and a signature check costs more than the rest of a request's authentication.
    verified: std::sync::RwLock<HashMap<String, VerifiedToken>>,
}

/// A verified token's caller, its `exp`, and the key-set generation it was verified under.
type VerifiedToken = (Principal, u64, u64);

/// A flood of distinct tokens must not grow the cache without bound.
const VERIFIED_CACHE_LIMIT: usize = 10_000;

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .finish_non_exhaustive()
    }
}

pub fn algorithm(name: &str) -> anyhow::Result<Algorithm> {
    match name {
        "EdDSA" => Ok(Algorithm::EdDSA),
        "ES256" => Ok(Algorithm::ES256),
        "RS256" => Ok(Algorithm::RS256),
        other => anyhow::bail!("ONKOS_AUTH_ALGORITHM: {other:?} is not one of EdDSA, ES256, RS256"),
    }
}

fn decoding_key(alg: Algorithm, pem: &[u8]) -> jsonwebtoken::errors::Result<DecodingKey> {
    match alg {
        Algorithm::EdDSA => DecodingKey::from_ed_pem(pem),
        Algorithm::ES256 => DecodingKey::from_ec_pem(pem),
        _ => DecodingKey::from_rsa_pem(pem),
    }
}

impl Verifier {
    pub fn from_config(config: &Config) -> anyhow::Result<Self> {
        let alg = algorithm(&config.auth_algorithm)?;
        let mut validation = Validation::new(alg);
        validation.set_issuer(&[&config.auth_issuer]);
        validation.set_audience(&[&config.auth_audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        validation.leeway = 30;
        let keys = if let Some(url) = &config.auth_jwks_url {
            Keys::Jwks(Jwks {
                url: url.clone(),
                min_refresh: Duration::from_secs(config.auth_jwks_min_refresh_secs),
                max_age: Duration::from_secs(config.auth_jwks_max_age_secs),
                generation: AtomicU64::new(0),
                client: reqwest::Client::builder()
                    .timeout(Duration::from_secs(5))
                    .build()?,
                keys: RwLock::new(HashMap::new()),
                last_fetch: Mutex::new(None),
            })
        } else if let Some(path) = &config.auth_public_key {
            let pem = std::fs::read(path).with_context(|| {
                format!("ONKOS_AUTH_PUBLIC_KEY: cannot read {}", path.display())
            })?;
            let key = decoding_key(alg, &pem).with_context(|| {
                format!(
                    "ONKOS_AUTH_PUBLIC_KEY: {} is not a {alg:?} public key",
                    path.display()
                )
            })?;
            Keys::Single { kid: None, key }
        } else {
            anyhow::ensure!(
                alg == Algorithm::EdDSA,
                "ONKOS_AUTH_ALGORITHM: the development key pair is Ed25519, so it must be EdDSA (or configure a key)"
            );
            let dev = super::keys::DevKeys::load_or_create(&config.keys_dir())?;
            Keys::Single {
                kid: Some(dev.kid.clone()),
                key: DecodingKey::from_ed_pem(dev.public_pem.as_bytes())?,
            }
        };
        Ok(Self {
            validation,
            keys,
            verified: std::sync::RwLock::default(),
        })
    }

    pub async fn verify(&self, token: &str) -> Result<Principal, ApiError> {
        let now = jsonwebtoken::get_current_timestamp();
        let cached = self
            .verified
            .read()
            .ok()
            .and_then(|v| v.get(token).cloned());
        if let Some((principal, exp, generation)) = cached
            && now < exp
            && generation == self.key_generation()
        {
            return Ok(principal);
        }
        self.verify_signed(token).await
    }

    fn key_generation(&self) -> u64 {
        match &self.keys {
            Keys::Single { .. } => 0,
            Keys::Jwks(jwks) => jwks.generation.load(Ordering::Acquire),
        }
    }

    async fn verify_signed(&self, token: &str) -> Result<Principal, ApiError> {
        let reject = |why: String| ApiError::Unauthorized(why);
        let header =
            decode_header(token).map_err(|e| reject(format!("unreadable token header: {e}")))?;
        let claims = match &self.keys {
            Keys::Single { kid, key } => {
                if let (Some(expected), Some(got)) = (kid, &header.kid)
                    && expected != got
                {
                    return Err(reject(format!("unknown key id {got:?}")));
                }
                decode::<RawClaims>(token, key, &self.validation)
            }
            Keys::Jwks(jwks) => {
                let kid = header
                    .kid
                    .ok_or_else(|| reject("token has no key id".into()))?;
                let key = jwks
                    .key(&kid)
                    .await
                    .map_err(|e| reject(format!("key id {kid:?}: {e}")))?;
                decode::<RawClaims>(token, &key, &self.validation)
            }
        }
        .map_err(|e| reject(format!("invalid token: {e}")))?
        .claims;
        let tenant = TenantId::parse(&claims.tenant).map_err(reject)?;
        // The subject is stored with every analysis and audit event: an empty one or one with
        // control characters (a NUL cannot even be stored as text) names no one.
        if claims.sub.is_empty()
            || claims.sub.len() > 255
            || claims.sub.chars().any(char::is_control)
        {
            return Err(reject(
                "the token's subject (sub) must be 1-255 bytes without control characters".into(),
            ));
        }
        let principal = Principal {
            subject: claims.sub,
            tenant,
            roles: claims.roles.iter().filter_map(|r| Role::parse(r)).collect(),
        };
        let generation = self.key_generation();
        if let Ok(mut verified) = self.verified.write() {
            if verified.len() >= VERIFIED_CACHE_LIMIT {
                verified.clear();
            }
            verified.insert(
                token.to_owned(),
                (principal.clone(), claims.exp, generation),
            );
        }
        Ok(principal)
    }
}

impl Jwks {
    async fn key(&self, kid: &str) -> anyhow::Result<DecodingKey> {
        let mut last = self.last_fetch.lock().await;
        let stale = last.is_none_or(|t| t.elapsed() >= self.max_age);
        if !stale && let Some(key) = self.keys.read().await.get(kid) {
            return Ok(key.clone());
        }
        if !stale && last.is_some_and(|t| t.elapsed() < self.min_refresh) {
            anyhow::bail!(
                "not in the key set (refreshed {:?} ago)",
                last.map(|t| t.elapsed())
            );
        }
        *last = Some(Instant::now());
        let set: JwkSet = self
            .client
            .get(&self.url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let fresh: HashMap<String, DecodingKey> = set
            .keys
            .iter()
            .filter_map(|jwk| Some((jwk.common.key_id.clone()?, DecodingKey::from_jwk(jwk).ok()?)))
            .collect();
        tracing::info!(url = %self.url, keys = fresh.len(), "refreshed the JWKS");
        *self.keys.write().await = fresh;
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(last);
        self.keys
            .read()
            .await
            .get(kid)
            .cloned()
            .context("not in the key set")
    }
}
