//! Provenance: every result's record, the per-tenant chain, tamper detection and the audit trail.

use crate::helpers::{MODEL, TestApp, assert_problem, reference_rows};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Sorted keys, no whitespace: computed here independently of the service's own code.
fn canonical(value: &Value) -> String {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let fields: Vec<String> = keys
                .into_iter()
                .map(|k| format!("{}:{}", Value::String(k.clone()), canonical(&map[k])))
                .collect();
            format!("{{{}}}", fields.join(","))
        }
        Value::Array(items) => format!(
            "[{}]",
            items.iter().map(canonical).collect::<Vec<_>>().join(",")
        ),
        // serde_json's writer (1.0 stays 1.0), not `Number`'s Display.
        other => serde_json::to_string(other).unwrap(),
    }
}

async fn submit_and_run(app: &TestApp, token: &str, rows: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for row in reference_rows().into_iter().take(rows) {
        ids.push(app.submit(token, &row["features"]).await);
    }
    app.drain().await;
    ids
}

/// Steps the sealer: links every committed record into its tenant's chain.
async fn seal(app: &TestApp) -> u64 {
    onkos::repo::provenance::seal(&app.pool, i64::MAX, true)
        .await
        .unwrap()
}

/// Changes a stored result behind the service's back, as a tamperer with database access would.
async fn flip_decision(app: &TestApp, analysis: &str) {
    sqlx::query(
        "update results set result = jsonb_set(result::jsonb, '{decision,label}', '\"flipped\"')::json where analysis_id = $1::uuid",
    )
    .bind(analysis)
    .execute(&app.pool)
    .await
    .unwrap();
}

fn audit_verify(app: &TestApp) -> (bool, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_onkos"))
        .args(["audit", "verify"])
        .env("DATABASE_URL", &app.database_url)
        .env("ONKOS_DATA_DIR", app.config.data_dir.as_os_str())
        .env("ONKOS_LOG", "warn")
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[tokio::test]
async fn every_result_has_a_record_chained_to_the_tenants_previous_result() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let ids = submit_and_run(&app, &token, 3).await;
    // Stored with its result, each record waits for the sealer to link it into the chain.
    let p = app
        .get_json(&format!("/v1/analyses/{}/provenance", ids[0]), &token)
        .await;
    assert_eq!(
        (&p["sealed"], &p["seq"], &p["chain_sha256"]),
        (&json!(false), &Value::Null, &Value::Null),
        "{p}"
    );
    assert_eq!(p["intact"], true, "{p}");
    let (ok, output) = audit_verify(&app);
    assert!(ok, "{output}");
    assert!(
        output.contains("oslo: 0 links intact, 3 records awaiting the sealer"),
        "{output}"
    );
    assert_eq!(seal(&app).await, 3);
    assert_eq!(seal(&app).await, 0, "a record is sealed once");
    let model = app.get_json(&format!("/v1/models/{MODEL}"), &token).await;
    let mut previous = "0".repeat(64);
    let mut seqs = Vec::new();
    let mut links = Vec::new();
    for id in &ids {
        let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
        let p = app
            .get_json(&format!("/v1/analyses/{id}/provenance"), &token)
            .await;
        let record = &p["record"];
        assert_eq!(record["analysis_id"], json!(id));
        assert_eq!(record["tenant"], "oslo");
        assert_eq!(record["input_sha256"], analysis["input_sha256"]);
        assert_eq!(record["model_name"], MODEL);
        assert_eq!(record["model_version"], analysis["model"]["version"]);
        assert_eq!(record["model_sha256"], analysis["model"]["sha256"]);
        assert_eq!(
            record["manifest_sha256"], model["manifest_sha256"],
            "{model}"
        );
        assert_eq!(record["execution_provider"], "CPUExecutionProvider");
        assert!(
            record["code_version"]
                .as_str()
                .unwrap()
                .starts_with("onkos-0."),
            "{record}"
        );
        assert_eq!(
            record["result_sha256"],
            json!(sha256_hex(canonical(&analysis["result"]).as_bytes()))
        );
        assert_eq!(
            p["record_sha256"],
            json!(sha256_hex(canonical(record).as_bytes()))
        );
        assert_eq!(p["intact"], true, "{p}");
        assert_eq!(p["sealed"], true, "{p}");
        seqs.push(p["seq"].as_i64().unwrap());
        links.push(p);
    }
    // Chained in the order they were stored (one batch: by analysis id), without gaps.
    links.sort_by_key(|p| p["seq"].as_i64());
    seqs.sort_unstable();
    assert_eq!(seqs, [1, 2, 3]);
    for p in &links {
        assert_eq!(p["previous_sha256"], json!(previous));
        let chained =
            sha256_hex(format!("{previous}{}", p["record_sha256"].as_str().unwrap()).as_bytes());
        assert_eq!(p["chain_sha256"], json!(chained));
        previous = chained;
    }
    let (ok, output) = audit_verify(&app);
    assert!(ok, "{output}");
    assert!(
        output.contains("oslo: 3 links intact, 0 records"),
        "{output}"
    );
}

#[tokio::test]
async fn a_clean_shutdown_seals_the_records_of_the_last_results() {
    // A sealer that, once started, would not pass again for an hour: only its pass at shutdown
    // can seal what is stored meanwhile.
    let mut app = TestApp::spawn_with(|c| c.provenance_seal_ms = 3_600_000).await;
    let token = app.token("oslo", "submitter");
    submit_and_run(&app, &token, 3).await;
    let unsealed = "select count(*) from provenance where seq is null";
    let pool = app.pool.clone();
    let count = |sql: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(sql)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(count(unsealed).await, 3);
    app.stop_and_wait().await;
    assert_eq!(count(unsealed).await, 0);
    assert_eq!(count("select max(seq) from provenance").await, 3);
}

#[tokio::test]
async fn sealers_running_at_once_link_each_record_once_without_gaps() {
    let app = TestApp::spawn().await;
    let oslo = app.token("oslo", "submitter");
    let bergen = app.token("bergen", "submitter");
    submit_and_run(&app, &oslo, 6).await;
    submit_and_run(&app, &bergen, 2).await;
    // Two sealers that skip a held chain head and one that waits for it, as several processes
    // sealing the same database; then a pass that must find nothing left.
    let pool = &app.pool;
    let (a, b, c) = tokio::join!(
        onkos::repo::provenance::seal(pool, 2, false),
        onkos::repo::provenance::seal(pool, 3, false),
        onkos::repo::provenance::seal(pool, i64::MAX, true),
    );
    assert!(a.unwrap() + b.unwrap() + c.unwrap() <= 8);
    seal(&app).await;
    assert_eq!(seal(&app).await, 0);
    for (tenant, n) in [("oslo", 6_i64), ("bergen", 2)] {
        let seqs: Vec<i64> =
            sqlx::query_scalar("select seq from provenance where tenant_id = $1 order by seq")
                .bind(tenant)
                .fetch_all(pool)
                .await
                .unwrap();
        assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "{tenant}");
    }
    let (ok, output) = audit_verify(&app);
    assert!(ok, "{output}");
    assert!(
        output.contains("oslo: 6 links intact, 0 records"),
        "{output}"
    );
}

#[tokio::test]
async fn a_changed_result_breaks_its_link_and_audit_verify_names_it() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let ids = submit_and_run(&app, &token, 3).await;
    let victim = &ids[1];
    seal(&app).await;
    flip_decision(&app, victim).await;
    let p = app
        .get_json(&format!("/v1/analyses/{victim}/provenance"), &token)
        .await;
    assert_eq!(p["intact"], false, "{p}");
    assert!(
        p["problem"]
            .as_str()
            .unwrap()
            .contains("result was changed"),
        "{p}"
    );
    let (ok, output) = audit_verify(&app);
    assert!(!ok, "a tampered chain must fail: {output}");
    assert!(
        output.contains(&format!("BROKEN at analysis {victim}")),
        "{output}"
    );
}

#[tokio::test]
async fn a_result_changed_before_its_record_is_sealed_is_named_too() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let ids = submit_and_run(&app, &token, 2).await;
    let victim = &ids[0];
    flip_decision(&app, victim).await;
    let p = app
        .get_json(&format!("/v1/analyses/{victim}/provenance"), &token)
        .await;
    assert_eq!(
        (&p["sealed"], &p["intact"]),
        (&json!(false), &json!(false)),
        "{p}"
    );
    let (ok, output) = audit_verify(&app);
    assert!(!ok, "{output}");
    assert!(
        output.contains(&format!("BROKEN at analysis {victim}"))
            && output.contains("not yet sealed"),
        "{output}"
    );
    // Sealing links what was recorded, so the change stays visible.
    seal(&app).await;
    let (ok, output) = audit_verify(&app);
    assert!(!ok, "{output}");
    assert!(
        output.contains(&format!("BROKEN at analysis {victim}")),
        "{output}"
    );
}

#[tokio::test]
async fn a_removed_link_breaks_the_chain() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let ids = submit_and_run(&app, &token, 3).await;
    seal(&app).await;
    let last: String = sqlx::query_scalar(
        "select analysis_id::text from provenance where tenant_id = 'oslo' order by seq desc limit 1",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(ids.contains(&last));
    sqlx::query("delete from provenance where analysis_id = $1::uuid")
        .bind(&last)
        .execute(&app.pool)
        .await
        .unwrap();
    let (ok, output) = audit_verify(&app);
    assert!(!ok, "{output}");
    assert!(output.contains("links after it were removed"), "{output}");
}

#[tokio::test]
async fn inline_and_queued_results_share_one_chain_per_tenant() {
    let app = TestApp::spawn_with(|c| c.worker = true).await;
    let oslo = app.token("oslo", "submitter");
    let bergen = app.token("bergen", "submitter");
    let rows = reference_rows();
    let inline = app
        .post_json(
            "/v1/analyses?wait=20s",
            &oslo,
            &json!({"model": MODEL, "features": rows[0]["features"]}),
        )
        .await;
    assert_eq!(inline.status(), 200);
    let inline: Value = inline.json().await.unwrap();
    assert_eq!(inline["timings"]["dispatch"], "inline");
    let queued = app.submit(&oslo, &rows[1]["features"]).await;
    let other = app.submit(&bergen, &rows[2]["features"]).await;
    for (id, token) in [(&queued, &oslo), (&other, &bergen)] {
        let done = app
            .get_json(&format!("/v1/analyses/{id}?wait=20s"), token)
            .await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["timings"]["dispatch"], "queue");
    }
    seal(&app).await;
    let seq = |p: &Value| p["seq"].as_i64().unwrap();
    let first = app
        .get_json(
            &format!("/v1/analyses/{}/provenance", inline["id"].as_str().unwrap()),
            &oslo,
        )
        .await;
    let second = app
        .get_json(&format!("/v1/analyses/{queued}/provenance"), &oslo)
        .await;
    assert_eq!((seq(&first), seq(&second)), (1, 2));
    assert_eq!(second["previous_sha256"], first["chain_sha256"]);
    // An inline record is made from what the process holds, a queued one from the database: they
    // must state the same model, manifest, build and provider, and the inline one its own facts.
    let model = app.get_json(&format!("/v1/models/{MODEL}"), &oslo).await;
    let (a, b) = (&first["record"], &second["record"]);
    assert_eq!(a["manifest_sha256"], model["manifest_sha256"], "{model}");
    for field in [
        "tenant",
        "model_name",
        "model_version",
        "model_sha256",
        "manifest_sha256",
        "code_version",
        "execution_provider",
    ] {
        assert_eq!(a[field], b[field], "{field}: {a} against {b}");
    }
    assert_eq!(a["analysis_id"], inline["id"]);
    assert_eq!(a["input_sha256"], inline["input_sha256"]);
    // The input is stored as the very text its digest was taken over, on both paths.
    let stored: Vec<(String, String)> =
        sqlx::query_as("select input::text, input_sha256 from analyses where tenant_id = 'oslo'")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(stored.len(), 2);
    for (input, digest) in &stored {
        assert_eq!(&sha256_hex(input.as_bytes()), digest, "{input}");
        assert!(input.starts_with('{') && !input.contains(' '), "{input}");
    }
    assert_eq!(
        a["result_sha256"],
        json!(sha256_hex(canonical(&inline["result"]).as_bytes()))
    );
    assert_eq!(
        first["record_sha256"],
        json!(sha256_hex(canonical(a).as_bytes()))
    );
    let p = app
        .get_json(&format!("/v1/analyses/{other}/provenance"), &bergen)
        .await;
    assert_eq!(seq(&p), 1, "each tenant has its own chain: {p}");
    // Another tenant's provenance is a 404, like the analysis.
    assert_problem(
        app.get(&format!("/v1/analyses/{other}/provenance"), &oslo)
            .await,
        404,
    )
    .await;
    let (ok, output) = audit_verify(&app);
    assert!(ok, "{output}");
    assert!(
        output.contains("bergen: 1 links intact, 0 records"),
        "{output}"
    );
    assert!(
        output.contains("oslo: 2 links intact, 0 records"),
        "{output}"
    );
}

#[tokio::test]
async fn admins_list_the_audit_trail_with_filters_and_pages() {
    let app = TestApp::spawn().await;
    let submitter = app.token("oslo", "submitter");
    let admin = app.token("oslo", "admin");
    let ids = submit_and_run(&app, &submitter, 2).await;
    for id in &ids {
        app.get_json(&format!("/v1/analyses/{id}"), &submitter)
            .await;
    }
    app.get_json(&format!("/v1/analyses/{}", ids[0]), &admin)
        .await;
    assert_problem(app.get("/v1/audit", &submitter).await, 403).await;

    let reads = app.get_json("/v1/audit?action=analysis.read", &admin).await;
    assert_eq!(reads["items"].as_array().unwrap().len(), 3, "{reads}");
    let first = app
        .get_json(
            &format!("/v1/audit?target_id={}&actor=tester", ids[0]),
            &admin,
        )
        .await;
    assert!(
        first["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["target_id"] == json!(ids[0]))
    );
    // Pages: newest first, then older ones through `before`.
    let page = app.get_json("/v1/audit?limit=2", &admin).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 2);
    let before = page["next_before"].as_i64().unwrap();
    assert!(page["items"][0]["id"].as_i64() > page["items"][1]["id"].as_i64());
    let older = app
        .get_json(&format!("/v1/audit?limit=2&before={before}"), &admin)
        .await;
    assert!(older["items"][0]["id"].as_i64().unwrap() < before);
    // Another tenant's trail is not visible.
    let other = app.token("bergen", "admin");
    let none = app.get_json("/v1/audit", &other).await;
    assert_eq!(none["items"], json!([]));
    assert_problem(app.get("/v1/audit?limit=0", &admin).await, 400).await;
    assert_problem(app.get("/v1/audit?since=yesterday", &admin).await, 400).await;
}
