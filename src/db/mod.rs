//! The connection pool, the migrations, and the choice between an external and the embedded Postgres.

pub mod embedded;

use crate::config::Config;
use anyhow::Context;
use embedded::EmbeddedPostgres;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use std::str::FromStr;
use std::time::Duration;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The pool, plus the embedded cluster when onkos owns one (stopped by `Database::close`).
#[derive(Debug)]
pub struct Database {
    pub pool: PgPool,
    embedded: Option<EmbeddedPostgres>,
}

impl Database {
    /// Connects to `DATABASE_URL`, or starts the embedded cluster, and applies the migrations.
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        let (options, embedded) = match &config.database_url {
            Some(url) => (
                PgConnectOptions::from_str(url)
                    .context("DATABASE_URL is not a valid Postgres URL")?,
                None,
            ),
            None => {
                let server = EmbeddedPostgres::start(
                    &config.data_dir.join("postgres"),
                    config.embedded_pg_bin.as_deref(),
                    &config.embedded_pg_user,
                )
                .await?;
                (server.default_options(), Some(server))
            }
        };
        let pool = pool(options, config.db_max_connections).await?;
        MIGRATOR
            .run(&pool)
            .await
            .context("cannot apply the database migrations")?;
        Ok(Self { pool, embedded })
    }

    pub async fn close(self) -> anyhow::Result<()> {
        self.pool.close().await;
        if let Some(server) = self.embedded {
            tokio::task::spawn_blocking(move || server.stop()).await??;
        }
        Ok(())
    }
}

pub async fn pool(options: PgConnectOptions, max_connections: u32) -> anyhow::Result<PgPool> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        // A request must not hang when the database is gone: fail fast and answer 503.
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .context("cannot connect to the database")
}
