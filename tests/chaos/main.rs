//! Fault tests: workers killed with SIGKILL mid-work, a fleet of API and worker processes on one
//! database and one bucket, PostgreSQL restarted under the API, a worker stopped with SIGTERM while
//! it analyses a slide. Real `onkos` processes, a real Postgres, a real S3-compatible server.
//!
//! A binary of its own: its tests run many processes and should not share two cores with the
//! hundred integration tests. Processes cannot be stepped, so these tests watch the database (a
//! short poll with a deadline) for the state they wait for.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../api/helpers.rs"]
#[allow(dead_code)]
mod helpers;
#[path = "../api/moto.rs"]
#[allow(dead_code)]
mod moto;
mod processes;

use futures_util::StreamExt;
use helpers::{MODEL, TestApp, reference_rows, repo_path};
use serde_json::{Value, json};
use sqlx::PgPool;
use std::time::{Duration, Instant};

const WATCH: Duration = Duration::from_millis(25);

/// Analyses in each status.
async fn statuses(pool: &PgPool) -> std::collections::BTreeMap<String, i64> {
    sqlx::query_as::<_, (String, i64)>("select status, count(*) from analyses group by status")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .collect()
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Waits (watching the database) until no analysis is queued or running.
async fn until_all_final(pool: &PgPool, limit: Duration) {
    let start = Instant::now();
    loop {
        let open = count(
            pool,
            "select count(*) from analyses where status in ('queued', 'running')",
        )
        .await;
        if open == 0 {
            return;
        }
        assert!(
            start.elapsed() < limit,
            "{open} analyses still open after {limit:?}: {:?}",
            statuses(pool).await
        );
        tokio::time::sleep(WATCH).await;
    }
}

/// Submits `n` WDBC cases to the APIs at `bases` in turn, 16 at a time; returns the ids.
async fn submit_cases(
    client: &reqwest::Client,
    bases: &[String],
    token: &str,
    n: usize,
) -> Vec<String> {
    let rows = reference_rows();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let url = format!("{}/v1/analyses", bases[i % bases.len()]);
            let body = json!({"model": MODEL, "features": rows[i % rows.len()]["features"]});
            let request = client.post(url).bearer_auth(token).json(&body).send();
            async move {
                let response = request.await.unwrap();
                assert_eq!(response.status(), 202);
                response.json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            }
        })
        .buffer_unordered(16)
        .collect()
        .await
}

/// Uploads the Aperio fixture through the API at `base`; returns the slide.
async fn upload_slide(client: &reqwest::Client, base: &str, token: &str) -> Value {
    let bytes = std::fs::read(repo_path(
        "tests/fixtures/slides/aperio-cmu1-small-region.svs",
    ));
    let response = client
        .post(format!("{base}/v1/slides"))
        .bearer_auth(token)
        .header("content-type", "application/octet-stream")
        .body(bytes.unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    response.json().await.unwrap()
}

/// Every analysis succeeded, each with exactly one result, and no job is left holding a lease.
async fn assert_each_succeeded_once(pool: &PgPool, expected: usize) {
    let statuses = statuses(pool).await;
    assert_eq!(
        statuses.get("succeeded"),
        Some(&(expected as i64)),
        "{statuses:?}"
    );
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert_eq!(
        count(pool, "select count(*) from results").await,
        expected as i64
    );
    assert_eq!(
        count(pool, "select count(*) from jobs where state <> 'done'").await,
        0,
        "every job is done, none is left running under a lease"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_mid_work_lose_no_analysis_and_store_none_twice() {
    const N: usize = 600;
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let ids = submit_cases(&app.client, std::slice::from_ref(&app.base), &token, N).await;
    assert_eq!(ids.len(), N);
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let worker = |i: usize| {
        let mut command = processes::command("worker", &app.database_url, dirs[i].path());
        command
            .env("ONKOS_WORKER_BATCH_SIZE", "4")
            // A killed worker's jobs are taken over a second later.
            .env("ONKOS_WORKER_LEASE_SECS", "1")
            .env("ONKOS_WORKER_POLL_MS", "50")
            .env("ONKOS_WORKER_MAX_ATTEMPTS", "50");
        processes::start_worker(command, dirs[i].path())
    };
    let mut workers = [worker(0), worker(1)];
    let (start, mut kills, mut at_last_kill) = (Instant::now(), 0, 0);
    loop {
        let done = count(&app.pool, "select count(*) from results").await as usize;
        if done == N {
            break;
        }
        // Kill one worker with SIGKILL each time the fleet has finished another 50 analyses.
        if done >= at_last_kill + 50 && kills < 8 {
            let victim = kills % 2;
            workers[victim].start_kill().unwrap();
            workers[victim].wait().await.unwrap();
            workers[victim] = worker(victim);
            kills += 1;
            at_last_kill = done;
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "{done} of {N} done after {kills} kills"
        );
        tokio::time::sleep(WATCH).await;
    }
    assert!(
        kills >= 3,
        "only {kills} kills happened before the work was done"
    );
    until_all_final(&app.pool, Duration::from_secs(30)).await;
    assert_each_succeeded_once(&app.pool, N).await;
    let retried = count(&app.pool, "select count(*) from jobs where attempts > 1").await;
    eprintln!(
        "{kills} workers killed; {retried} jobs ran more than once before their result was stored"
    );
    // One provenance link per result: a killed batch left none behind. The workers' sealers may
    // not have linked the last ones yet: this sealer waits for any of theirs, then links the rest.
    onkos::repo::provenance::seal(&app.pool, i64::MAX, true)
        .await
        .unwrap();
    assert_eq!(
        count(&app.pool, "select count(*) from provenance").await,
        N as i64
    );
    assert_eq!(
        count(&app.pool, "select max(seq) from provenance").await,
        N as i64,
        "the chain has no gaps"
    );
    processes::audit_verify(&app.database_url, &app.config.data_dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_apis_and_three_workers_on_one_database_and_one_bucket_finish_every_analysis_once() {
    let moto = moto::Moto::start().await;
    moto.create_bucket("fleet").await;
    let (pool, url) = helpers::fresh_database_named().await;
    let keys_dir = tempfile::tempdir().unwrap();
    let keys = onkos::auth::keys::DevKeys::load_or_create(keys_dir.path()).unwrap();
    let public_key = keys_dir.path().join("dev-ed25519.pub.pem");
    let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
    let mut apis = Vec::new();
    for dir in &dirs[..2] {
        let mut command = processes::command("api", &url, dir.path());
        command.env("ONKOS_AUTH_PUBLIC_KEY", &public_key);
        processes::on_s3(&mut command, &moto, "fleet");
        apis.push(processes::start_serving(command).await);
    }
    let bases: Vec<String> = apis.iter().map(|(_, base)| base.clone()).collect();
    let mut workers = Vec::new();
    for dir in &dirs[2..] {
        let mut command = processes::command("worker", &url, dir.path());
        command.env("ONKOS_WORKER_BATCH_SIZE", "8");
        processes::on_s3(&mut command, &moto, "fleet");
        // A worker serves its metrics and probes: its address is read from its log like an API's.
        workers.push(processes::start_serving(command).await);
    }
    let token = keys
        .mint(
            "onkos-dev",
            "onkos",
            "pipeline",
            "oslo",
            &["submitter".into()],
            Duration::from_secs(600),
        )
        .unwrap();
    let client = reqwest::Client::new();
    // A slide through the first API, analysed by whichever worker claims it.
    let slide = upload_slide(&client, &bases[0], &token).await;
    let slide_analysis: Value = client
        .post(format!("{}/v1/analyses", bases[1]))
        .bearer_auth(&token)
        .json(&json!({"model": "he-stain-quantification", "slide": slide["id"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cases = submit_cases(&client, &bases, &token, 400).await;
    assert_eq!(cases.len(), 400);
    until_all_final(&pool, Duration::from_secs(240)).await;
    assert_each_succeeded_once(&pool, 401).await;
    let busy = count(
        &pool,
        "select count(distinct timings->>'worker') from results",
    )
    .await;
    // Each worker's own count, scraped from its /metrics, adds up to the work done.
    let mut scraped = 0.0;
    for (_, base) in &workers {
        let text = client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        scraped += text
            .lines()
            .filter(|l| l.starts_with("onkos_analyses_total{outcome=\"succeeded\"}"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum::<f64>();
    }
    assert_eq!(
        scraped, 401.0,
        "the workers' metrics count every analysis once"
    );
    assert!(busy >= 2, "the work was shared: {busy} workers ran jobs");
    // The second API never had the slide: it fetches it from the bucket to paint the heatmap.
    let heatmap = client
        .get(format!(
            "{}/v1/analyses/{}/heatmap.png",
            bases[1],
            slide_analysis["id"].as_str().unwrap()
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(heatmap.status(), 200);
    let keys = moto.keys("fleet").await;
    assert!(keys.iter().any(|k| k.starts_with("slides/")), "{keys:?}");
    processes::audit_verify(&url, dirs[0].path());
    drop(pool);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_postgres_restarts_the_api_answers_503_and_no_accepted_analysis_is_lost() {
    use onkos::db::embedded::EmbeddedPostgres;
    let _ = tracing_subscriber::fmt()
        .with_env_filter("onkos=error")
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let cluster_dir = dir.path().join("pg");
    let server = EmbeddedPostgres::start(&cluster_dir, None, "postgres")
        .await
        .unwrap();
    let pool = onkos::db::pool(server.default_options(), 8).await.unwrap();
    onkos::db::MIGRATOR.run(&pool).await.unwrap();
    let data = dir.path().join("data");
    let config = helpers::test_config(&data);
    let app = onkos::app::Application::with_pool(config.clone(), pool.clone())
        .await
        .unwrap();
    let base = format!("http://{}", app.local_addr());
    let worker = app.worker();
    let shutdown = tokio_util::sync::CancellationToken::new();
    tokio::spawn(app.run(shutdown.clone()));
    let keys = onkos::auth::keys::DevKeys::load_or_create(&config.keys_dir()).unwrap();
    let token = keys
        .mint(
            "onkos-dev",
            "onkos",
            "lis",
            "oslo",
            &["submitter".into()],
            Duration::from_secs(600),
        )
        .unwrap();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let bases = [base.clone()];
    let mut accepted = submit_cases(&client, &bases, &token, 20).await;

    // Load throughout: four clients submit back to back until the database is back and answering.
    let load_stop = tokio_util::sync::CancellationToken::new();
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (client, url, token, stop) = (
                client.clone(),
                format!("{base}/v1/analyses"),
                token.clone(),
                load_stop.clone(),
            );
            let case = json!({"model": MODEL, "features": reference_rows()[1]["features"]});
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while !stop.is_cancelled() {
                    let started = Instant::now();
                    let response = client
                        .post(&url)
                        .bearer_auth(&token)
                        .json(&case)
                        .send()
                        .await
                        .unwrap();
                    let (status, elapsed) = (response.status().as_u16(), started.elapsed());
                    let id = if status == 202 {
                        let accepted: Value = response.json().await.unwrap();
                        Some(accepted["id"].as_str().unwrap().to_owned())
                    } else {
                        None
                    };
                    outcomes.push((status, elapsed, id));
                }
                outcomes
            })
        })
        .collect();

    server.stop().unwrap();
    let case = json!({"model": MODEL, "features": reference_rows()[0]["features"]});
    for (method, path) in [
        ("POST", "/v1/analyses"),
        ("GET", "/v1/analyses"),
        ("GET", "/readyz"),
    ] {
        let started = Instant::now();
        let request = match method {
            "POST" => client.post(format!("{base}{path}")).json(&case),
            _ => client.get(format!("{base}{path}")),
        };
        let response = request.bearer_auth(&token).send().await.unwrap();
        let elapsed = started.elapsed();
        assert_eq!(response.status(), 503, "{method} {path}");
        if path != "/readyz" {
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json",
                "{method} {path}"
            );
        }
        assert!(
            elapsed < Duration::from_secs(10),
            "{method} {path} took {elapsed:?}"
        );
    }

    // The same cluster comes back; the API's pool reconnects by itself.
    let server = EmbeddedPostgres::start(&cluster_dir, None, "postgres")
        .await
        .unwrap();
    let started = Instant::now();
    loop {
        let response = client
            .post(format!("{base}/v1/analyses"))
            .bearer_auth(&token)
            .json(&case)
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            202 => {
                accepted.push(
                    response.json::<Value>().await.unwrap()["id"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                );
                break;
            }
            503 => assert!(
                started.elapsed() < Duration::from_secs(30),
                "the API did not recover"
            ),
            other => panic!(
                "{other} while the database came back: {:?}",
                response.text().await
            ),
        }
        tokio::time::sleep(WATCH).await;
    }
    accepted.extend(submit_cases(&client, &bases, &token, 10).await);
    load_stop.cancel();
    let mut during = std::collections::BTreeMap::<u16, usize>::new();
    for client in load {
        for (status, elapsed, id) in client.await.unwrap() {
            assert!(
                matches!(status, 202 | 503),
                "{status} under load while the database restarted"
            );
            assert!(
                elapsed < Duration::from_secs(10),
                "a request took {elapsed:?}"
            );
            *during.entry(status).or_default() += 1;
            accepted.extend(id);
        }
    }
    assert!(
        during.contains_key(&503),
        "the load saw the outage: {during:?}"
    );
    eprintln!("under load while Postgres restarted: {during:?}");
    let mut finished = 0;
    loop {
        match worker.step().await.unwrap() {
            0 => break,
            n => finished += n,
        }
    }
    assert_eq!(finished, accepted.len());
    for id in &accepted {
        let status: String = sqlx::query_scalar("select status from analyses where id = $1::uuid")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(status, "succeeded", "{id}");
    }
    shutdown.cancel();
    pool.close().await;
    server.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_with_sigterm_mid_slide_finishes_it_or_releases_its_lease() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let slide = upload_slide(&app.client, &app.base, &token).await;
    let id = app
        .submit_to(
            &token,
            &json!({"model": "he-stain-quantification", "slide": slide["id"]}),
        )
        .await;
    let data = tempfile::tempdir().unwrap();
    let mut command = processes::command("worker", &app.database_url, data.path());
    // Blobs are local here: the worker reads the API's folder.
    command
        .env("ONKOS_DATA_DIR", &app.config.data_dir)
        .env("ONKOS_SLIDE_BATCH_TILES", "2");
    let mut worker = processes::start_worker(command, data.path());
    let started = Instant::now();
    while count(
        &app.pool,
        "select count(*) from jobs where state = 'running'",
    )
    .await
        == 0
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the worker never claimed the slide"
        );
        tokio::time::sleep(WATCH).await;
    }
    let pid = nix::unistd::Pid::from_raw(i32::try_from(worker.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(60), worker.wait())
        .await
        .expect("the worker stops within a minute")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    let (state, owner): (String, Option<uuid::Uuid>) =
        sqlx::query_as("select state, lease_owner from jobs where analysis_id = $1::uuid")
            .bind(&id)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    match state.as_str() {
        "done" => {}
        "queued" => {
            assert_eq!(owner, None, "a released job has no lease");
            assert_eq!(app.step().await, 1);
        }
        other => panic!("the stopped worker left its job {other}"),
    }
    let analysis = app.get_json(&format!("/v1/analyses/{id}"), &token).await;
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
}
