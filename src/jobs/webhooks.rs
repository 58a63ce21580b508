//! Webhook delivery: sends the outbox's due events to their endpoints, signed, and records each
//! attempt; failures retry with exponential backoff and jitter until the attempts run out.
//!
//! Signature: header `Onkos-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">`
//! keyed with the endpoint's secret. A receiver recomputes it over the raw body, compares in
//! constant time, and refuses a `t` more than [`REPLAY_WINDOW_SECS`] from its clock; a retry is
//! signed afresh, and carries the same `Onkos-Delivery` id for de-duplication.

use crate::config::Config;
use crate::jobs::retry::{RetryPolicy, unit_random};
use crate::repo;
use crate::repo::webhooks::{AttemptOutcome, Due};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub const SIGNATURE_HEADER: &str = "onkos-signature";
pub const DELIVERY_HEADER: &str = "onkos-delivery";
pub const EVENT_HEADER: &str = "onkos-event";
/// How far a signature's time may be from the receiver's clock before it refuses it as a replay.
pub const REPLAY_WINDOW_SECS: i64 = 300;
/// The channel the outbox triggers notify when they queue a delivery.
pub const WEBHOOKS_CHANNEL: &str = "onkos_webhooks";
/// Deliveries sent at once by one deliverer.
const CONCURRENCY: i64 = 32;

/// The `Onkos-Signature` value for `body` sent at unix time `t`.
pub fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    format!(
        "t={t},v1={}",
        hex::encode(mac(secret, t, body).finalize().into_bytes())
    )
}

fn mac(secret: &str, t: i64, body: &[u8]) -> Hmac<Sha256> {
    // An HMAC key may have any length; `new_from_slice` cannot fail for HMAC.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

/// What a receiver does: checks a signature header against the raw body, the secret and its
/// clock (`now`, unix seconds). The reference for integrators, and what the tests check with.
pub fn verify(secret: &str, header: &str, body: &[u8], now: i64) -> Result<(), &'static str> {
    let mut t = None;
    let mut signatures = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => signatures.push(v),
            _ => {}
        }
    }
    let t = t.ok_or("no timestamp")?;
    if (now - t).abs() > REPLAY_WINDOW_SECS {
        return Err("timestamp outside the replay window");
    }
    let valid = signatures.iter().any(|s| {
        hex::decode(s).is_ok_and(|bytes| mac(secret, t, body).verify_slice(&bytes).is_ok())
    });
    if valid {
        Ok(())
    } else {
        Err("signature does not match")
    }
}

/// True for addresses on the public internet: not loopback, private (RFC 1918, ULA), link-local,
/// shared (CGNAT), documentation, multicast, broadcast or unspecified.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_unspecified()
                || v4.is_multicast()
                || a == 0
                || a >= 240
                || (a == 100 && (b & 0xc0) == 64))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
                || first == 0x2001 && v6.segments()[1] == 0x0db8)
        }
    }
}

pub const PRIVATE_REFUSED: &str = "resolves only to loopback, private or link-local addresses, which webhooks may not reach (ONKOS_WEBHOOK_ALLOW_PRIVATE_NETWORKS=true allows them)";

/// Resolves receivers' names, keeping public addresses only: checked at connection time, so a
/// name that resolved to a public address at registration cannot be re-pointed inside later.
#[derive(Debug)]
struct PublicOnly;

impl reqwest::dns::Resolve for PublicOnly {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let found = tokio::net::lookup_host((name.as_str(), 0)).await?;
            let public: Vec<SocketAddr> = found.filter(|a| is_public(a.ip())).collect();
            if public.is_empty() {
                return Err(format!("{} {PRIVATE_REFUSED}", name.as_str()).into());
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Refuses a URL whose host is a literal non-public address (names are checked on resolution).
pub fn literal_host_allowed(url: &str, allow_private: bool) -> bool {
    if allow_private {
        return true;
    }
    let Some(host) = reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.host_str().map(str::to_owned))
    else {
        return true;
    };
    // IPv6 literals come bracketed.
    match host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    {
        Ok(ip) => is_public(ip),
        Err(_) => true,
    }
}

/// Sends due deliveries. Many deliverers (one per `serve` or `worker` process) share the outbox.
#[derive(Debug, Clone)]
pub struct Deliverer {
    pool: PgPool,
    client: reqwest::Client,
    retry: RetryPolicy,
    lease_secs: f64,
    allow_private: bool,
}

impl Deliverer {
    pub fn new(pool: PgPool, config: &Config) -> anyhow::Result<Self> {
        let timeout = Duration::from_secs(config.webhook_timeout_secs);
        let mut client = reqwest::Client::builder();
        if !config.webhook_allow_private_networks {
            client = client.dns_resolver(std::sync::Arc::new(PublicOnly));
        }
        let client = client
            .timeout(timeout)
            // A redirect could send the signed body somewhere the tenant did not register.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("onkos/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            pool,
            client,
            retry: config.webhook_retry_policy(),
            lease_secs: timeout.as_secs_f64() + 30.0,
            allow_private: config.webhook_allow_private_networks,
        })
    }

    /// Sends what is due now (up to a batch) and records each outcome. Returns how many were
    /// attempted; tests call this to step delivery.
    pub async fn step(&self) -> anyhow::Result<usize> {
        let due = repo::webhooks::claim_due(&self.pool, CONCURRENCY, self.lease_secs).await?;
        let outcomes = futures_util::future::join_all(due.iter().map(|d| self.attempt(d))).await;
        for outcome in &outcomes {
            repo::webhooks::record(&self.pool, outcome).await?;
        }
        Ok(outcomes.len())
    }

    async fn attempt(&self, due: &Due) -> AttemptOutcome {
        if !literal_host_allowed(&due.url, self.allow_private) {
            return AttemptOutcome {
                id: due.id,
                attempts: due.attempts,
                status: None,
                error: Some(format!("the receiver's address {PRIVATE_REFUSED}")),
                delivered: false,
                retry_after_secs: None,
            };
        }
        let mut event = due.payload.clone();
        if let Some(object) = event.as_object_mut() {
            object.insert("delivery".into(), due.id.to_string().into());
        }
        let body = serde_json::to_vec(&event).unwrap_or_default();
        let t = chrono::Utc::now().timestamp();
        let kind = event.get("type").and_then(|v| v.as_str()).unwrap_or("");
        let sent = self
            .client
            .post(&due.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, sign(&due.secret, t, &body))
            .header(DELIVERY_HEADER, due.id.to_string())
            .header(EVENT_HEADER, kind)
            .body(body)
            .send()
            .await;
        let (status, error) = match sent {
            Ok(response) if response.status().is_success() => {
                return AttemptOutcome {
                    id: due.id,
                    attempts: due.attempts,
                    status: Some(i32::from(response.status().as_u16())),
                    error: None,
                    delivered: true,
                    retry_after_secs: None,
                };
            }
            Ok(response) => (
                Some(i32::from(response.status().as_u16())),
                format!("the receiver answered {}", response.status()),
            ),
            // Without the URL: it may carry credentials, and the error is shown to the tenant.
            Err(e) => (
                None,
                format!("cannot deliver: {}", error_chain(&e.without_url())),
            ),
        };
        tracing::warn!(delivery = %due.id, attempt = due.attempts, %error, "webhook delivery failed");
        let retry_after_secs = (due.attempts < self.retry.max_attempts)
            .then(|| self.retry.delay(due.attempts, unit_random()).as_secs_f64());
        AttemptOutcome {
            id: due.id,
            attempts: due.attempts,
            status,
            error: Some(error),
            delivered: false,
            retry_after_secs,
        }
    }

    /// Delivers until `shutdown`, woken by the outbox triggers' NOTIFY and polling as a fallback
    /// (retries come due without a notification).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut listener = PgListener::connect_with(&self.pool).await.ok();
        if let Some(l) = listener.as_mut()
            && l.listen(WEBHOOKS_CHANNEL).await.is_err()
        {
            listener = None;
        }
        while !shutdown.is_cancelled() {
            let sent = match self.step().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!(error = %e, "webhook delivery step failed");
                    0
                }
            };
            if sent > 0 {
                continue;
            }
            let wake = async {
                match listener.as_mut() {
                    Some(l) => {
                        let _ = l.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = wake => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_and_a_changed_body_or_old_time_does_not() {
        let header = sign("s3cret-s3cret-s3cret", 1_700_000_000, b"{\"id\":1}");
        assert!(header.starts_with("t=1700000000,v1="));
        assert_eq!(
            verify(
                "s3cret-s3cret-s3cret",
                &header,
                b"{\"id\":1}",
                1_700_000_100
            ),
            Ok(())
        );
        assert!(
            verify(
                "s3cret-s3cret-s3cret",
                &header,
                b"{\"id\":2}",
                1_700_000_100
            )
            .is_err()
        );
        assert!(verify("other-secret-000000", &header, b"{\"id\":1}", 1_700_000_100).is_err());
        assert_eq!(
            verify(
                "s3cret-s3cret-s3cret",
                &header,
                b"{\"id\":1}",
                1_700_000_000 + 301
            ),
            Err("timestamp outside the replay window")
        );
    }

    #[test]
    fn only_public_addresses_are_public() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:10.0.0.1",
        ] {
            assert!(
                !is_public(private.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))),
                "{private}"
            );
        }
        for public in ["8.8.8.8", "151.101.1.1", "2606:4700::1111"] {
            assert!(
                is_public(public.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))),
                "{public}"
            );
        }
        assert!(!literal_host_allowed("http://10.0.0.5:8500/x", false));
        assert!(literal_host_allowed("http://10.0.0.5:8500/x", true));
        assert!(literal_host_allowed("https://lis.example.org/x", false));
    }

    #[test]
    fn signature_is_hmac_sha256_of_time_dot_body() {
        // RFC 4231 style check against an independently computed value:
        // printf '1.{}' | openssl dgst -sha256 -hmac key
        assert_eq!(
            sign("key", 1, b"{}"),
            "t=1,v1=1ba6b8171186efc613e8bcc0cbdab2748f24984d7c5a84faa2637afa0e40d224"
        );
    }
}
