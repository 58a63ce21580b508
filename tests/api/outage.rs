//! The database goes away under a running service, and comes back. Meanwhile requests are
//! answered 503 problem+json with a Retry-After at once, not after a timeout each; nothing of them is stored or
//! audited; readiness says why. When the database returns, the same process serves again, without
//! a restart.
//!
//! The service reaches its database through a gate: a Unix socket that forwards to PostgreSQL's
//! while open. Closed, it cuts the connections it carries and hangs up on new ones at once, as a
//! crashed server or a broken network path does.

use crate::helpers::{MODEL, TestApp, assert_problem, fresh_database_options, reference_rows};
use serde_json::{Value, json};
use sqlx::postgres::PgConnectOptions;
use std::time::{Duration, Instant};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

struct Gate {
    open: watch::Sender<bool>,
    _dir: tempfile::TempDir,
}

impl Gate {
    /// An open gate to the database of `target`, and the options that reach it through the gate.
    fn start(target: &PgConnectOptions) -> (Self, PgConnectOptions) {
        let upstream = target
            .get_socket()
            .expect("the test cluster listens on a Unix socket")
            .join(format!(".s.PGSQL.{}", target.get_port()));
        let dir = tempfile::tempdir().unwrap();
        let listener = UnixListener::bind(dir.path().join(".s.PGSQL.5432")).unwrap();
        let (open, state) = watch::channel(true);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !*state.borrow() {
                    // Closed: hung up before a byte is read.
                    continue;
                }
                let (upstream, mut closed) = (upstream.clone(), state.clone());
                tokio::spawn(async move {
                    let Ok(mut server) = UnixStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = closed.wait_for(|open| !open) => {}
                    }
                });
            }
        });
        let through = target.clone().socket(dir.path()).port(5432);
        (Self { open, _dir: dir }, through)
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

fn case() -> Value {
    json!({"model": MODEL, "features": reference_rows()[0]["features"]})
}

#[tokio::test]
async fn while_the_database_is_gone_requests_are_503_at_once_and_the_process_serves_again_after() {
    let (options, url) = fresh_database_options().await;
    let (gate, through) = Gate::start(&options);
    let pool = onkos::db::pool(through, 8).await.unwrap();
    let app = TestApp::spawn_on(pool, url, |_| {}).await;
    // What the test checks afterwards, it reads past the gate.
    let direct = onkos::db::pool(options, 1).await.unwrap();
    let token = app.token("oslo", "submitter");
    let id = app.submit_to(&token, &case()).await;
    assert_eq!(app.step().await, 1);
    let path = format!("/v1/analyses/{id}");
    let before: Value = app.get_json(&path, &token).await;
    assert_eq!(before["status"], "succeeded", "{before}");

    gate.set_open(false);
    let started = Instant::now();
    // Reads arriving together share one statement: the group's failure answers each of them.
    let reads = futures_util::future::join_all((0..8).map(|_| app.get(&path, &token))).await;
    for read in reads {
        assert_eq!(read.headers()["retry-after"], "2");
        let problem = assert_problem(read, 503).await;
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("database")),
            "{problem}"
        );
    }
    let long_poll = app.get(&format!("{path}?wait=20s"), &token).await;
    assert_problem(long_poll, 503).await;
    let submitted = app.post_json("/v1/analyses", &token, &case()).await;
    assert_eq!(submitted.headers()["retry-after"], "2");
    assert_problem(submitted, 503).await;
    let waited = app
        .post_json("/v1/analyses?wait=20s", &token, &case())
        .await;
    assert_problem(waited, 503).await;
    let ready = reqwest::get(format!("{}/readyz", app.base)).await.unwrap();
    assert_eq!(ready.status(), 503);
    let ready: Value = ready.json().await.unwrap();
    assert_eq!(ready["database"], false, "{ready}");
    // At once: not after the pool's 5 s acquire timeout, nor once per request.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the outage's answers took {:?}",
        started.elapsed()
    );

    gate.set_open(true);
    let after: Value = app.get_json(&path, &token).await;
    assert_eq!(after, before);
    let again = app.submit_to(&token, &case()).await;
    assert_eq!(app.step().await, 1);
    assert_eq!(
        app.get_json(&format!("/v1/analyses/{again}"), &token).await["status"],
        "succeeded"
    );
    // Nothing of the refused requests was kept: two analyses (before and after), and only the
    // answered reads in the audit trail.
    let analyses: i64 = sqlx::query_scalar("select count(*) from analyses")
        .fetch_one(&direct)
        .await
        .unwrap();
    assert_eq!(analyses, 2);
    let reads: Vec<String> = sqlx::query_scalar(
        "select target_id from audit_events where action = 'analysis.read' order by id",
    )
    .fetch_all(&direct)
    .await
    .unwrap();
    assert_eq!(reads, [id.clone(), id, again]);
}

/// A database closed to new connections (`ALLOW_CONNECTIONS false`, as an operator does for
/// maintenance) refuses each one with a FATAL 55000: the service answers 503 with a Retry-After,
/// as for any outage, not 500; and serves again once the database is opened.
#[tokio::test]
async fn a_database_closed_to_connections_is_an_outage_not_an_error() {
    use sqlx::Connection;
    let (options, url) = fresh_database_options().await;
    let name = options.get_database().unwrap().to_owned();
    let pool = onkos::db::pool(options.clone(), 4).await.unwrap();
    let app = TestApp::spawn_on(pool, url, |_| {}).await;
    let token = app.token("oslo", "submitter");
    assert_eq!(app.get("/v1/analyses", &token).await.status(), 200);
    let mut admin = sqlx::PgConnection::connect_with(&options.clone().database("postgres"))
        .await
        .unwrap();
    let allow = |on: bool| format!("alter database {name} allow_connections {on}");
    sqlx::query(sqlx::AssertSqlSafe(allow(false)))
        .execute(&mut admin)
        .await
        .unwrap();
    // The pool's connections are cut, so every request needs a new one.
    sqlx::query(
        "select pg_terminate_backend(pid) from pg_stat_activity
         where datname = $1 and pid <> pg_backend_pid()",
    )
    .bind(&name)
    .execute(&mut admin)
    .await
    .unwrap();

    let list = app.get("/v1/analyses", &token).await;
    assert_eq!(list.headers()["retry-after"], "2");
    assert_problem(list, 503).await;
    let submitted = app.post_json("/v1/analyses", &token, &case()).await;
    assert_problem(submitted, 503).await;

    sqlx::query(sqlx::AssertSqlSafe(allow(true)))
        .execute(&mut admin)
        .await
        .unwrap();
    let list = app.get_json("/v1/analyses", &token).await;
    assert_eq!(list["items"], json!([]), "{list}");
}
