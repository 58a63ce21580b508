//! Every way a token can be wrong answers 401 problem+json; a valid token without the role, 403.

use crate::helpers::{MODEL, TestApp, assert_problem, reference_rows};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use onkos::auth::keys::DevKeys;
use onkos::auth::verify::Claims;
use serde_json::{Value, json};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(app: &TestApp) -> Claims {
    Claims {
        sub: "tester".into(),
        iss: app.config.auth_issuer.clone(),
        aud: app.config.auth_audience.clone(),
        exp: now() + 600,
        nbf: now(),
        iat: now(),
        tenant: "oslo".into(),
        roles: vec!["submitter".into()],
    }
}

fn private_pem(app: &TestApp) -> Vec<u8> {
    std::fs::read(app.config.keys_dir().join("dev-ed25519.pem")).unwrap()
}

/// A token signed with the trusted key, with `change` applied to its claims.
fn signed(app: &TestApp, change: impl FnOnce(&mut Claims)) -> String {
    let mut c = claims(app);
    change(&mut c);
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(app.keys.kid.clone());
    encode(
        &header,
        &c,
        &EncodingKey::from_ed_pem(&private_pem(app)).unwrap(),
    )
    .unwrap()
}

fn bad_tokens(app: &TestApp) -> Vec<(&'static str, String)> {
    let good = signed(app, |_| {});
    let (head_and_body, signature) = good.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(signature).unwrap();
    sig[0] ^= 0x55;
    let tampered = format!("{head_and_body}.{}", URL_SAFE_NO_PAD.encode(sig));

    let stranger = DevKeys::load_or_create(&tempfile::tempdir().unwrap().keep()).unwrap();
    let unknown_kid = stranger
        .mint(
            &app.config.auth_issuer,
            &app.config.auth_audience,
            "x",
            "oslo",
            &["submitter".into()],
            Duration::from_secs(600),
        )
        .unwrap();

    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims(app)).unwrap());
    let none = format!(
        "{}.{payload}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#)
    );

    let public_pem = std::fs::read(app.config.keys_dir().join("dev-ed25519.pub.pem")).unwrap();
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(app.keys.kid.clone());
    let hs256 = encode(
        &hs_header,
        &claims(app),
        &EncodingKey::from_secret(&public_pem),
    )
    .unwrap();

    vec![
        ("malformed", "not.a.jwt".into()),
        (
            "expired",
            signed(app, |c| {
                c.exp = now() - 3600;
                c.nbf = now() - 7200;
            }),
        ),
        (
            "not yet valid",
            signed(app, |c| {
                c.nbf = now() + 3600;
                c.exp = now() + 7200;
            }),
        ),
        (
            "wrong issuer",
            signed(app, |c| c.iss = "https://evil.example".into()),
        ),
        (
            "wrong audience",
            signed(app, |c| c.aud = "another-service".into()),
        ),
        ("bad signature", tampered),
        ("unknown kid", unknown_kid),
        ("alg none", none),
        ("HS256 signed with the public key", hs256),
        (
            "tenant with forbidden characters",
            signed(app, |c| c.tenant = "../oslo".into()),
        ),
        // The subject is stored with every analysis: a NUL cannot be stored as text at all.
        (
            "subject with a NUL",
            signed(app, |c| c.sub = "dr\u{0}who".into()),
        ),
        (
            "subject with a newline",
            signed(app, |c| c.sub = "dr\nwho".into()),
        ),
        ("empty subject", signed(app, |c| c.sub = String::new())),
        (
            "subject over 255 bytes",
            signed(app, |c| c.sub = "x".repeat(256)),
        ),
    ]
}

#[tokio::test]
async fn every_kind_of_bad_token_is_a_401_problem() {
    let app = TestApp::spawn().await;
    let body = json!({"model": MODEL, "features": reference_rows()[0]["features"]});
    let url = format!("{}/v1/analyses", app.base);
    let missing = app.client.post(&url).json(&body).send().await.unwrap();
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    assert_problem(missing, 401).await;
    let basic = app
        .client
        .post(&url)
        .basic_auth("u", Some("p"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_problem(basic, 401).await;
    for (case, token) in bad_tokens(&app) {
        let response = app.post_json("/v1/analyses", &token, &body).await;
        assert_eq!(response.status(), 401, "{case}");
        let problem = assert_problem(response, 401).await;
        assert_eq!(
            problem["detail"], "a valid bearer token is required",
            "{case} must not say why"
        );
        assert_eq!(
            app.get("/v1/analyses", &token).await.status(),
            401,
            "{case}"
        );
    }
    assert_eq!(app.rows("analyses").await, 0);
}

#[tokio::test]
async fn a_token_minted_by_onkos_token_is_accepted() {
    let app = TestApp::spawn().await;
    let token = signed(&app, |_| {});
    assert_eq!(app.get("/v1/analyses", &token).await.status(), 200);
}

#[tokio::test]
async fn a_clinician_may_read_but_not_submit() {
    let app = TestApp::spawn().await;
    let clinician = app.token("oslo", "clinician");
    let body = json!({"model": MODEL, "features": reference_rows()[0]["features"]});
    let problem = assert_problem(app.post_json("/v1/analyses", &clinician, &body).await, 403).await;
    assert!(problem["detail"].as_str().unwrap().contains("submitter"));
    assert_eq!(app.get("/v1/analyses", &clinician).await.status(), 200);
    let nobody = signed(&app, |c| c.roles = vec!["janitor".into()]);
    assert_problem(app.get("/v1/analyses", &nobody).await, 403).await;
}

/// A JWKS endpoint on loopback whose key set the test can rotate.
async fn jwks_server(keys: std::sync::Arc<std::sync::Mutex<Value>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let keys = keys.clone();
            async move { axum::Json(keys.lock().unwrap().clone()) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/jwks.json")
}

fn jwk(keys: &DevKeys) -> Value {
    let der = pem_body(&keys.public_pem);
    // An Ed25519 SubjectPublicKeyInfo ends with the 32-byte public key.
    let x = URL_SAFE_NO_PAD.encode(&der[der.len() - 32..]);
    json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": keys.kid, "alg": "EdDSA", "use": "sig"})
}

fn pem_body(pem: &str) -> Vec<u8> {
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
}

#[tokio::test]
async fn jwks_keys_are_fetched_and_refetched_when_an_unknown_kid_appears() {
    let first = DevKeys::load_or_create(&tempfile::tempdir().unwrap().keep()).unwrap();
    let second = DevKeys::load_or_create(&tempfile::tempdir().unwrap().keep()).unwrap();
    let set = std::sync::Arc::new(std::sync::Mutex::new(json!({"keys": [jwk(&first)]})));
    let url = jwks_server(set.clone()).await;
    let app = TestApp::spawn_with(|c| {
        c.auth_jwks_url = Some(url);
        c.auth_jwks_min_refresh_secs = 0;
        c.auth_jwks_max_age_secs = 0;
    })
    .await;
    let mint = |keys: &DevKeys| {
        keys.mint(
            &app.config.auth_issuer,
            &app.config.auth_audience,
            "idp-user",
            "oslo",
            &["clinician".into()],
            Duration::from_secs(600),
        )
        .unwrap()
    };
    assert_eq!(app.get("/v1/analyses", &mint(&first)).await.status(), 200);
    assert_eq!(
        app.get("/v1/analyses", &mint(&second)).await.status(),
        401,
        "not yet published"
    );
    *set.lock().unwrap() = json!({"keys": [jwk(&first), jwk(&second)]});
    assert_eq!(
        app.get("/v1/analyses", &mint(&second)).await.status(),
        200,
        "rotation picked up"
    );
    let first_token = mint(&first);
    assert_eq!(app.get("/v1/analyses", &first_token).await.status(), 200);
    *set.lock().unwrap() = json!({"keys": [jwk(&second)]});
    assert_eq!(app.get("/v1/analyses", &mint(&second)).await.status(), 200);
    assert_eq!(
        app.get("/v1/analyses", &first_token).await.status(),
        401,
        "a withdrawn key stops verifying, even for a token verified before"
    );
    assert_eq!(
        app.get("/v1/analyses", &app.token("oslo", "clinician"))
            .await
            .status(),
        401,
        "the dev key is not trusted when a JWKS is configured"
    );
}
