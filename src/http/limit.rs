//! Per-client rate limiting: one token bucket (GCRA, `governor`) per client, answered with 429
//! problem+json and `Retry-After` when it is empty. A client is the bearer token it presents (a LIS
//! integration, a portal user, a pipeline), or its address when it presents none. Limits are per
//! process: behind a load balancer each replica allows the configured rate.

use crate::app::AppState;
use crate::config::Config;
use crate::error::ApiError;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;

/// Paths never limited: a load balancer's and a scraper's probes.
const UNLIMITED: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

pub struct Limiter {
    buckets: RateLimiter<u64, DefaultKeyedStateStore<u64>, DefaultClock>,
    /// Keys are hashes: the map never holds a token.
    hasher: RandomState,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("clients", &self.buckets.len())
            .finish()
    }
}

impl Limiter {
    /// `None` when the configuration sets no limit.
    pub fn from_config(config: &Config) -> Option<Self> {
        let rate = NonZeroU32::new(config.rate_limit_per_second)?;
        let burst = NonZeroU32::new(config.rate_limit_burst).unwrap_or(rate);
        Some(Self {
            buckets: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            hasher: RandomState::new(),
        })
    }

    /// Takes one request from `client`'s bucket, or says how long until it may send the next.
    pub fn check(&self, client: &[u8]) -> Result<(), Duration> {
        let key = self.hasher.hash_one(client);
        self.buckets
            .check_key(&key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Forgets clients whose buckets are full again (they would be allowed a full burst anyway),
    /// so the map does not grow with every client ever seen.
    pub fn forget_idle(&self) {
        self.buckets.retain_recent();
        self.buckets.shrink_to_fit();
    }
}

pub async fn limit(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(limiter) = &state.limiter else {
        return next.run(request).await;
    };
    if UNLIMITED.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    let client = match request.headers().get(AUTHORIZATION) {
        Some(token) => token.as_bytes().to_vec(),
        None => request
            .extensions()
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip().to_string().into_bytes())
            .unwrap_or_default(),
    };
    match limiter.check(&client) {
        Ok(()) => next.run(request).await,
        Err(wait) => ApiError::TooManyRequests(wait).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_waits_and_others_are_not_affected() {
        let config = Config {
            rate_limit_per_second: 2,
            rate_limit_burst: 3,
            ..Config::default()
        };
        let limiter = Limiter::from_config(&config).expect("a limit is configured");
        for _ in 0..3 {
            assert!(limiter.check(b"Bearer a").is_ok());
        }
        let wait = limiter.check(b"Bearer a").expect_err("the burst is spent");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(
            limiter.check(b"Bearer b").is_ok(),
            "another client has its own bucket"
        );
        assert!(
            Limiter::from_config(&Config {
                rate_limit_per_second: 0,
                ..Config::default()
            })
            .is_none()
        );
    }
}
