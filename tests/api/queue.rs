//! The Postgres queue: exclusive claims, leases, retries with backoff, dead letters, cancellation,
//! idempotent submission and long polls. Time is moved by editing the queue's clocks, never by
//! sleeping.

use crate::helpers::{
    MODEL, TestApp, assert_problem, class_probability, reference_rows, test_config,
};
use onkos::app::Application;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::time::{Duration, Instant};

fn case() -> Value {
    json!({"model": MODEL, "features": reference_rows()[0]["features"]})
}

async fn status(app: &TestApp, token: &str, id: &str) -> Value {
    app.get(&format!("/v1/analyses/{id}"), token)
        .await
        .json()
        .await
        .unwrap()
}

/// Makes every lease look expired, as if its worker had died a lease ago.
async fn expire_leases(app: &TestApp) {
    sqlx::query(
        "update jobs set lease_expires_at = now() - interval '1 second' where state = 'running'",
    )
    .execute(&app.pool)
    .await
    .unwrap();
}

#[tokio::test]
async fn concurrent_workers_never_claim_the_same_job() {
    let app = TestApp::spawn_with(|c| c.worker_batch_size = 7).await;
    let token = app.token("oslo", "submitter");
    for _ in 0..120 {
        app.submit(&token, &case()["features"]).await;
    }
    let workers: Vec<_> = (0..4).map(|_| app.worker.another()).collect();
    let mut claimed = Vec::new();
    loop {
        let rounds = futures_join(&workers).await;
        if rounds.iter().all(Vec::is_empty) {
            break;
        }
        for (worker, jobs) in workers.iter().zip(rounds) {
            claimed.extend(jobs.iter().map(|j| j.analysis_id));
            worker.process(jobs).await.unwrap();
        }
    }
    let unique: HashSet<_> = claimed.iter().collect();
    assert_eq!((claimed.len(), unique.len()), (120, 120));
    assert_eq!(app.rows("results").await, 120);
}

/// Under a backlog a running worker keeps two batches in flight, one stored while the next runs.
/// Stopping it finishes what it claimed (no job is left running on a lease), and every job runs
/// exactly once.
#[tokio::test]
async fn a_worker_under_a_backlog_pipelines_batches_and_runs_each_job_once() {
    let app = TestApp::spawn_with(|c| c.worker_batch_size = 5).await;
    let token = app.token("oslo", "submitter");
    let mut ids = Vec::new();
    for _ in 0..40 {
        ids.push(app.submit(&token, &case()["features"]).await);
    }
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(
        app.worker
            .clone()
            .run(shutdown.clone(), Duration::from_secs(30)),
    );
    // The long poll ends when the first analysis is final; the worker is then stopped mid-backlog.
    let first = app
        .get_json(&format!("/v1/analyses/{}?wait=20s", ids[0]), &token)
        .await;
    assert_eq!(first["status"], "succeeded", "{first}");
    shutdown.cancel();
    running.await.unwrap();
    let running_jobs: i64 = sqlx::query_scalar("select count(*) from jobs where state = 'running'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        running_jobs, 0,
        "a stopped worker finishes the batches it claimed"
    );

    app.drain().await;
    let attempts: Vec<i32> = sqlx::query_scalar("select attempts from jobs where state = 'done'")
        .fetch_all(&app.pool)
        .await
        .unwrap();
    assert_eq!(
        attempts,
        vec![1; 40],
        "every job done, each on its first attempt"
    );
    assert_eq!(app.rows("results").await, 40);
}

async fn futures_join(
    workers: &[onkos::jobs::worker::Worker],
) -> Vec<Vec<onkos::repo::jobs::ClaimedJob>> {
    let handles: Vec<_> = workers
        .iter()
        .cloned()
        .map(|w| tokio::spawn(async move { w.claim().await.unwrap() }))
        .collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn an_expired_lease_is_reclaimed_and_the_stale_worker_cannot_complete_it() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &case()["features"]).await;
    let (dead, alive) = (app.worker.another(), app.worker.another());
    let stale = dead.claim().await.unwrap();
    assert_eq!(stale.len(), 1);
    assert!(
        alive.claim().await.unwrap().is_empty(),
        "a leased job is not claimable"
    );
    expire_leases(&app).await;
    let reclaimed = alive.claim().await.unwrap();
    assert_eq!(reclaimed.len(), 1);
    assert_eq!(reclaimed[0].attempts, 2);
    assert_eq!(alive.process(reclaimed).await.unwrap(), 1);
    assert_eq!(
        dead.process(stale).await.unwrap(),
        0,
        "the first worker lost its lease"
    );
    assert_eq!(status(&app, &token, &id).await["status"], "succeeded");
    assert_eq!(app.rows("results").await, 1);
}

#[tokio::test]
async fn a_heartbeat_keeps_a_lease_alive() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    app.submit(&token, &case()["features"]).await;
    let worker = app.worker.another();
    let jobs = worker.claim().await.unwrap();
    sqlx::query("update jobs set lease_expires_at = now() + interval '1 second'")
        .execute(&app.pool)
        .await
        .unwrap();
    let held = [(jobs[0].analysis_id, jobs[0].attempts)];
    assert_eq!(
        onkos::repo::jobs::heartbeat(&app.pool, worker.id(), &held, 600.0)
            .await
            .unwrap(),
        1
    );
    let left: f64 =
        sqlx::query_scalar("select extract(epoch from lease_expires_at - now())::float8 from jobs")
            .fetch_one(&app.pool)
            .await
            .unwrap();
    assert!(left > 500.0, "lease extended to {left} s");
    let other = app.worker.another();
    assert_eq!(
        onkos::repo::jobs::heartbeat(&app.pool, other.id(), &held, 600.0)
            .await
            .unwrap(),
        0,
        "only the holder extends it"
    );
}

/// A worker on another node whose blob store holds only the gradient-boosting model: loading the
/// logistic one fails there (as if its object store were unreachable), a transient failure.
async fn worker_without_the_model(app: &TestApp) -> onkos::jobs::worker::Worker {
    let models = tempfile::tempdir().unwrap().keep();
    let from = crate::helpers::repo_path("models/breast-fna-malignancy-gb");
    std::fs::create_dir_all(models.join("gb")).unwrap();
    for file in ["manifest.json", "model.onnx"] {
        std::fs::copy(from.join(file), models.join("gb").join(file)).unwrap();
    }
    let mut config = test_config(&tempfile::tempdir().unwrap().keep());
    config.models_dir = models;
    config.worker_max_attempts = app.config.worker_max_attempts;
    config.worker_retry_base_ms = app.config.worker_retry_base_ms;
    Application::with_pool(config, app.pool.clone())
        .await
        .unwrap()
        .worker()
}

#[tokio::test]
async fn a_failing_job_is_retried_with_growing_backoff_then_fails_with_the_reason() {
    let app = TestApp::spawn_with(|c| {
        c.worker_max_attempts = 3;
        c.worker_retry_base_ms = 10_000;
    })
    .await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &case()["features"]).await;
    let worker = worker_without_the_model(&app).await;
    for (attempt, base_secs) in [(1, 10.0), (2, 20.0)] {
        assert_eq!(worker.step().await.unwrap(), 1);
        let (state, delay, error): (String, f64, Option<String>) = sqlx::query_as(
            "select state, extract(epoch from run_after - now())::float8, last_error from jobs",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(state, "queued", "attempt {attempt} is retried");
        assert!(
            delay > base_secs * 0.5 - 1.0 && delay <= base_secs,
            "attempt {attempt}: backoff {delay} s"
        );
        assert!(error.unwrap().contains("could not be loaded"));
        assert_eq!(status(&app, &token, &id).await["status"], "queued");
        assert_eq!(
            worker.step().await.unwrap(),
            0,
            "not before the backoff has passed"
        );
        sqlx::query("update jobs set run_after = now()")
            .execute(&app.pool)
            .await
            .unwrap();
    }
    assert_eq!(worker.step().await.unwrap(), 1);
    let failed = status(&app, &token, &id).await;
    assert_eq!(failed["status"], "failed");
    let error = failed["error"].as_str().unwrap();
    assert!(
        error.contains("could not be loaded") && error.contains("3 attempts"),
        "{error}"
    );
    assert_eq!(app.rows("results").await, 0);
}

#[tokio::test]
async fn a_job_whose_worker_dies_on_every_attempt_is_dead_lettered() {
    let app = TestApp::spawn_with(|c| c.worker_max_attempts = 2).await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &case()["features"]).await;
    for _ in 0..2 {
        assert_eq!(app.worker.another().claim().await.unwrap().len(), 1);
        expire_leases(&app).await;
    }
    assert!(app.worker.claim().await.unwrap().is_empty());
    let failed = status(&app, &token, &id).await;
    assert_eq!(failed["status"], "failed");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("stopped responding"),
        "{failed}"
    );
}

#[tokio::test]
async fn a_cancelled_queued_analysis_is_never_run() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &case()["features"]).await;
    let url = format!("{}/v1/analyses/{id}", app.base);
    let cancelled: Value = app
        .client
        .delete(&url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    assert_eq!(app.step().await, 0);
    assert_eq!(status(&app, &token, &id).await["status"], "cancelled");
    let again = app
        .client
        .delete(&url)
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200, "cancelling twice is harmless");
    assert_eq!(app.rows("results").await, 0);
}

#[tokio::test]
async fn a_cancelled_running_analysis_is_never_completed() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &case()["features"]).await;
    let claimed = app.worker.claim().await.unwrap();
    assert_eq!(status(&app, &token, &id).await["status"], "running");
    let url = format!("{}/v1/analyses/{id}", app.base);
    assert_eq!(
        app.client
            .delete(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(app.worker.process(claimed).await.unwrap(), 0);
    assert_eq!(status(&app, &token, &id).await["status"], "cancelled");
    assert_eq!(app.rows("results").await, 0);
}

#[tokio::test]
async fn a_finished_analysis_cannot_be_cancelled_and_clinicians_cannot_cancel() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &case()["features"]).await;
    let url = format!("{}/v1/analyses/{id}", app.base);
    let clinician = app.token("oslo", "clinician");
    assert_problem(
        app.client
            .delete(&url)
            .bearer_auth(&clinician)
            .send()
            .await
            .unwrap(),
        403,
    )
    .await;
    app.step().await;
    assert_problem(
        app.client
            .delete(&url)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap(),
        409,
    )
    .await;
    let bergen = app.token("bergen", "submitter");
    assert_problem(
        app.client
            .delete(&url)
            .bearer_auth(&bergen)
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
}

#[tokio::test]
async fn an_idempotent_retry_returns_the_first_answer_and_a_reused_key_conflicts() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let post = |body: Value, key: &'static str| {
        let request = app
            .client
            .post(format!("{}/v1/analyses", app.base))
            .bearer_auth(&token)
            .header("idempotency-key", key)
            .json(&body);
        async move { request.send().await.unwrap() }
    };
    let first = post(case(), "order-17").await;
    assert_eq!(first.status(), 202);
    let location = first.headers()["location"].clone();
    let first: Value = first.json().await.unwrap();
    let retry = post(case(), "order-17").await;
    assert_eq!(retry.status(), 202);
    assert_eq!(retry.headers()["location"], location);
    assert_eq!(retry.json::<Value>().await.unwrap(), first);
    assert_eq!(app.rows("analyses").await, 1);
    let mut other = case();
    other["priority"] = json!("stat");
    let problem = assert_problem(post(other, "order-17").await, 409).await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key")
    );
    assert_eq!(app.rows("analyses").await, 1);
    let bergen = app.token("bergen", "submitter");
    let elsewhere = app
        .client
        .post(format!("{}/v1/analyses", app.base))
        .bearer_auth(&bergen)
        .header("idempotency-key", "order-17")
        .json(&case())
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 202, "keys are per tenant");
    assert_eq!(app.rows("analyses").await, 2);
}

#[tokio::test]
async fn a_long_poll_answers_when_the_result_is_stored() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &case()["features"]).await;
    let started = Instant::now();
    let poll = {
        let request = app
            .client
            .get(format!("{}/v1/analyses/{id}?wait=20s", app.base))
            .bearer_auth(&token);
        tokio::spawn(async move { request.send().await.unwrap().json::<Value>().await.unwrap() })
    };
    assert_eq!(app.step().await, 1);
    let answer = poll.await.unwrap();
    assert_eq!(answer["status"], "succeeded");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "answered on completion, not at the deadline"
    );
}

#[tokio::test]
async fn a_long_poll_ends_at_its_deadline_with_the_current_state() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &case()["features"]).await;
    let started = Instant::now();
    let answer = status(&app, &token, &format!("{id}?wait=300ms")).await;
    assert_eq!(answer["status"], "queued");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_problem(
        app.get(&format!("/v1/analyses/{id}?wait=soon"), &token)
            .await,
        400,
    )
    .await;
}

#[tokio::test]
async fn a_submission_may_wait_for_its_result_like_a_synchronous_call() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let request = app
        .client
        .post(format!("{}/v1/analyses?wait=20s", app.base))
        .bearer_auth(&token)
        .json(&case());
    let call = tokio::spawn(async move { request.send().await.unwrap() });
    // Step until the submission (committed by the call in flight) has been run.
    while app.step().await == 0 {
        tokio::task::yield_now().await;
    }
    let response = call.await.unwrap();
    assert_eq!(response.status(), 200);
    let analysis: Value = response.json().await.unwrap();
    assert_eq!(analysis["status"], "succeeded");
    assert!(analysis["result"]["predictions"].is_array());
    assert_eq!(
        app.rows("audit_events").await,
        1,
        "returning the result is a read"
    );
}

#[tokio::test]
async fn concurrent_submissions_are_each_stored_once_through_the_group_commit() {
    let app = TestApp::spawn_with(|c| c.worker_batch_size = 100).await;
    let token = app.token("oslo", "submitter");
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let request = app
                .client
                .post(format!("{}/v1/analyses", app.base))
                .bearer_auth(&token)
                .json(&case());
            tokio::spawn(async move {
                request.send().await.unwrap().json::<Value>().await.unwrap()["id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for call in calls {
        ids.insert(call.await.unwrap());
    }
    assert_eq!(ids.len(), 40);
    assert_eq!(
        (app.rows("analyses").await, app.rows("jobs").await),
        (40, 40)
    );
    assert_eq!(app.drain().await, 40);
}

/// A group whose statement failed after the server had committed it (its connection lost before
/// the answer came) is stored: a second write of the same analyses finds them and succeeds,
/// alone or in a group with a new submission, instead of failing on their primary keys.
#[tokio::test]
async fn a_group_stored_before_its_statement_failed_counts_as_stored() {
    use onkos::domain::analysis::Priority;
    use onkos::domain::ids::{AnalysisId, TenantId};
    use onkos::jobs::intake::Intake;
    use onkos::repo::analyses::{NewAnalysis, Submission};
    let app = TestApp::spawn().await;
    let model: (String, String, String) =
        sqlx::query_as(
            "select version, onnx_sha256, manifest_sha256 from models where name = $1 and state = 'active'",
        )
            .bind(MODEL)
            .fetch_one(&app.pool)
            .await
            .unwrap();
    let submission = Submission {
        tenant: TenantId::parse("oslo").unwrap(),
        submitted_by: "tester".into(),
        model_name: MODEL.into(),
        model_version: model.0,
        model_sha256: model.1,
        manifest_sha256: model.2,
        priority: Priority::Routine,
        batch_id: None,
        max_attempts: 3,
        batchable: true,
        traceparent: None,
    };
    let analysis = |id: AnalysisId| NewAnalysis {
        id,
        subject: None,
        input: serde_json::value::to_raw_value(&reference_rows()[0]["features"]).unwrap(),
        input_sha256: "1".repeat(64),
        validate_ms: 0.0,
        finished: None,
    };
    let intake = Intake::start(app.pool.clone());
    let (first, second) = (AnalysisId::new(), AnalysisId::new());
    intake
        .submit(submission.clone(), vec![analysis(first)])
        .await
        .unwrap();
    let again = intake.submit(submission.clone(), vec![analysis(first)]);
    let alone = intake.submit(submission.clone(), vec![analysis(second)]);
    let (again, alone) = tokio::join!(again, alone);
    assert_eq!(again.unwrap()[0].id, first);
    assert_eq!(alone.unwrap()[0].id, second);
    assert_eq!((app.rows("analyses").await, app.rows("jobs").await), (2, 2));
    // Once more on its own: a group of one takes the same path.
    assert_eq!(
        intake
            .submit(submission, vec![analysis(second)])
            .await
            .unwrap()[0]
            .id,
        second
    );
    assert_eq!(app.rows("analyses").await, 2);
}

/// A claim (queued -> running) is a HOT update: the job's new version stays on its page and no
/// index gets a new entry. `state` was in the claim indexes' predicates, so no claim was.
#[tokio::test]
async fn a_claim_adds_no_index_entries() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    for row in reference_rows().iter().take(4) {
        app.submit(&token, &row["features"]).await;
    }
    let mut tx = app.pool.begin().await.unwrap();
    let claimed = onkos::repo::jobs::claim(&mut *tx, uuid::Uuid::new_v4(), 10, 30.0, None)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 4);
    let (updated, hot): (i64, i64) = sqlx::query_as(
        "select pg_stat_get_xact_tuples_updated('jobs'::regclass),
                pg_stat_get_xact_tuples_hot_updated('jobs'::regclass)",
    )
    .fetch_one(&mut *tx)
    .await
    .unwrap();
    assert_eq!((updated, hot), (4, 4));
    tx.rollback().await.unwrap();
}

/// A read whose requester went away (the client disconnected) while it waited for a reader is
/// not served, so not recorded as a read in the audit trail; the reads queued with it are.
/// Stepped through a table lock, no timing: both readers are held on the audit table while one
/// read is queued and abandoned and another queued and kept.
#[tokio::test]
async fn an_abandoned_grouped_read_is_not_audited() {
    use futures_util::FutureExt;
    use onkos::domain::ids::{AnalysisId, TenantId};
    use onkos::jobs::reads::Reads;
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let id = app.submit(&token, &reference_rows()[0]["features"]).await;
    let analysis = AnalysisId(id.parse().unwrap());
    let tenant = TenantId::parse("oslo").unwrap();
    let reads = Reads::start(app.pool.clone());
    let waiting_on_locks = || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from pg_stat_activity
             where datname = current_database() and wait_event_type = 'Lock'",
        )
        .fetch_one(&app.pool)
        .await
        .unwrap()
    };
    let until_waiting = |n: i64| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        while waiting_on_locks().await < n {
            assert!(
                Instant::now() < deadline,
                "the readers did not reach the lock"
            );
            tokio::task::yield_now().await;
        }
    };

    let mut lock = app.pool.begin().await.unwrap();
    sqlx::query("lock table audit_events in access exclusive mode")
        .execute(&mut *lock)
        .await
        .unwrap();
    // Each reader takes one read and waits on the lock.
    let first = tokio::spawn({
        let (reads, tenant) = (reads.clone(), tenant.clone());
        async move { reads.find(&tenant, analysis, "first").await }
    });
    until_waiting(1).await;
    let second = tokio::spawn({
        let (reads, tenant) = (reads.clone(), tenant.clone());
        async move { reads.find(&tenant, analysis, "second").await }
    });
    until_waiting(2).await;
    // Polled once: queued (the channel has room), then dropped before any reader is free.
    assert!(
        reads
            .find(&tenant, analysis, "abandoned")
            .now_or_never()
            .is_none()
    );
    let kept = tokio::spawn({
        let (reads, tenant) = (reads.clone(), tenant.clone());
        async move { reads.find(&tenant, analysis, "kept").await }
    });
    lock.commit().await.unwrap();

    for read in [first, second, kept] {
        let record = read.await.unwrap().unwrap().expect("the analysis");
        assert_eq!(record.id.to_string(), id);
    }
    let mut actors: Vec<String> = sqlx::query_scalar(
        "select actor from audit_events where action = 'analysis.read' and target_id = $1",
    )
    .bind(&id)
    .fetch_all(&app.pool)
    .await
    .unwrap();
    actors.sort();
    assert_eq!(actors, ["first", "kept", "second"]);
}

#[tokio::test]
async fn a_job_whose_worker_died_is_retried_alone_so_a_poison_input_cannot_sink_its_batch() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    for _ in 0..3 {
        app.submit(&token, &case()["features"]).await;
    }
    assert_eq!(app.worker.another().claim().await.unwrap().len(), 3);
    expire_leases(&app).await;
    let worker = app.worker.another();
    for _ in 0..3 {
        let claimed = worker.claim().await.unwrap();
        assert_eq!(claimed.len(), 1, "a reclaimed job runs on its own");
        assert_eq!(worker.process(claimed).await.unwrap(), 1);
    }
    assert_eq!(app.rows("results").await, 3);
}

#[tokio::test]
async fn a_separate_onkos_worker_process_runs_the_queue_of_the_api() {
    let app = TestApp::spawn().await;
    let token = app.token("oslo", "submitter");
    let data = tempfile::tempdir().unwrap();
    let mut worker = tokio::process::Command::new(env!("CARGO_BIN_EXE_onkos"))
        .arg("worker")
        .env("DATABASE_URL", &app.database_url)
        .env("ONKOS_DATA_DIR", data.path())
        .env("ONKOS_MODELS_DIR", crate::helpers::repo_path("models"))
        .env("ONKOS_EXECUTION_PROVIDER", "cpu")
        .env("ORT_DYLIB_PATH", app.config.ort_dylib_path.clone().unwrap())
        .env("ONKOS_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let id = app.submit(&token, &case()["features"]).await;
    // No worker runs in the API process: only the other process can finish this.
    let analysis = status(&app, &token, &format!("{id}?wait=25s")).await;
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
    assert_eq!(
        analysis["model"]["sha256"],
        crate::helpers::manifest()["onnx"]["sha256"]
    );
    worker.start_kill().unwrap();
    let _ = worker.wait().await;
}

// Inline runs: in `serve` (a worker in the process), a single case whose submitter waits is run at
// once and stored finished, with no job.

#[tokio::test]
async fn serve_runs_a_waiting_case_inline_and_stores_it_finished_with_its_read() {
    let app = TestApp::spawn_with(|c| c.worker = true).await;
    let token = app.token("oslo", "submitter");
    let response = app
        .post_json("/v1/analyses?wait=20s", &token, &case())
        .await;
    assert_eq!(response.status(), 200);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let delivered: Value = response.json().await.unwrap();
    assert_eq!(delivered["status"], "succeeded", "{delivered}");
    assert_eq!(delivered["timings"]["dispatch"], "inline");
    assert_eq!(delivered["timings"]["batch_size"], 1);
    let expected = reference_rows()[0]["expected"]["probability"]
        .as_f64()
        .unwrap();
    let malignant = class_probability(&delivered, "malignant");
    assert!(
        (malignant - expected).abs() < 1e-5,
        "{malignant} vs {expected}"
    );
    // Stored in one transaction: the analysis (finished), its result and the delivery as a read;
    // no job was queued.
    assert_eq!(
        (
            app.rows("analyses").await,
            app.rows("results").await,
            app.rows("audit_events").await,
            app.rows("jobs").await
        ),
        (1, 1, 1, 0)
    );
    let actor: (String, String) = sqlx::query_as("select actor, action from audit_events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert_eq!(actor, ("tester".into(), "analysis.read".into()));
    // The result row is over the 2 kB at which PostgreSQL moves columns out of line: nothing of it
    // went to the TOAST table (a second heap and index insert per result, migration 0014).
    let (in_row, toasted): (i32, i64) = sqlx::query_as(
        "select (select pg_column_size(r) from results r),
                (select pg_relation_size(reltoastrelid) from pg_class where oid = 'results'::regclass)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(in_row > 2048, "the result row is {in_row} B");
    assert_eq!(toasted, 0, "the results' TOAST table holds {toasted} B");
    // What was answered is what is stored.
    let stored: Value = app.get(&location, &token).await.json().await.unwrap();
    assert_eq!(stored, delivered);
    let times: Vec<_> = ["created_at", "started_at", "finished_at"]
        .iter()
        .map(|k| chrono::DateTime::parse_from_rfc3339(stored[k].as_str().unwrap()).unwrap())
        .collect();
    assert!(times[0] <= times[1] && times[1] <= times[2], "{times:?}");
}

#[tokio::test]
async fn without_inline_runs_a_waiting_case_goes_through_the_queue_and_the_worker() {
    let app = TestApp::spawn_with(|c| {
        c.worker = true;
        c.worker_inline = false;
    })
    .await;
    let token = app.token("oslo", "submitter");
    let response = app
        .post_json("/v1/analyses?wait=20s", &token, &case())
        .await;
    assert_eq!(response.status(), 200);
    let analysis: Value = response.json().await.unwrap();
    assert_eq!(analysis["status"], "succeeded", "{analysis}");
    assert_eq!(analysis["timings"]["dispatch"], "queue");
    assert_eq!(app.rows("jobs").await, 1);
}

#[tokio::test]
async fn a_case_submitted_without_waiting_is_queued_even_in_serve() {
    let app = TestApp::spawn_with(|c| {
        c.worker = true;
        c.worker_poll_ms = 3_600_000;
    })
    .await;
    let token = app.token("oslo", "submitter");
    let response = app.post_json("/v1/analyses", &token, &case()).await;
    assert_eq!(response.status(), 202);
    assert_eq!(app.rows("jobs").await, 1);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let analysis: Value = app
        .get(&format!("/v1/analyses/{id}?wait=20s"), &token)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(analysis["status"], "succeeded");
    assert_eq!(analysis["timings"]["dispatch"], "queue");
}
