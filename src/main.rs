//! The `onkos` binary: parse the command line, build, run until SIGINT/SIGTERM.

use anyhow::Context;
use clap::{Parser, Subcommand};
use onkos::app::Application;
use onkos::auth::keys::DevKeys;
use onkos::config::Config;
use onkos::db::Database;
use std::path::PathBuf;

/// The service allocates many small, short-lived JSON values per request; mimalloc serves them with
/// far less contention and bookkeeping than the system allocator (measured in BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "onkos",
    version,
    about = "AI-driven precision diagnostics for lung and breast cancer (research use)"
)]
struct Cli {
    /// TOML configuration file (also ONKOS_CONFIG); environment variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API and run the in-process worker.
    Serve,
    /// Serve the API only (workers run elsewhere with `onkos worker`).
    Api,
    /// Run a worker only: claims and runs queued analyses from the shared database.
    Worker,
    /// Apply the database migrations and exit.
    Migrate,
    /// Print a development JWT signed with the key pair the default mode trusts.
    Token {
        #[arg(long)]
        tenant: String,
        /// submitter, clinician or admin; repeat for several.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// Lifetime, e.g. 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: humantime::Duration,
        /// The `sub` claim.
        #[arg(long, default_value = "dev-user")]
        subject: String,
    },
    /// Print the OpenAPI document.
    Openapi,
    /// Audit tools.
    Audit {
        #[command(subcommand)]
        action: AuditCommand,
    },
    /// Measure ONNX Runtime's in-process throughput for a bundled model (rows per second), to
    /// show how much of an analysis is inference.
    BenchInference {
        #[arg(long, default_value = "breast-fna-malignancy")]
        model: String,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Run every bundled feature model on its reference cohort, and the named tile models on
    /// pseudo-random tiles, through both the CPU and the CUDA execution providers, and print the
    /// differences (one line per model; exits 1 when one is over its float32 tolerance).
    BenchParity {
        /// Slide (tile) models to compare too, by folder name under the models directory.
        #[arg(long = "tile-model")]
        tile_models: Vec<String>,
        /// Compare the CPU with `cuda`, or with `cpu` again (a check of the harness itself).
        #[arg(long, default_value = "cuda")]
        against: String,
    },
    /// Tiles per second of a slide model through onkos's inference path at each batch size.
    BenchTiles {
        #[arg(long)]
        model: String,
        /// Batch sizes, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8,32,64,128,256,512")]
        batches: Vec<usize>,
        /// Timed seconds per batch size (at least 5 runs each).
        #[arg(long, default_value_t = 2.0)]
        seconds: f64,
        /// Write each batch into CUDA-pinned host memory instead of an ordinary buffer.
        #[arg(long)]
        pinned: bool,
    },
    /// Run the slide pipeline on one slide file and, in the same run, decode all its level-0
    /// tiles on all cores (the limit the pipeline is measured against)
    BenchSlide {
        #[arg(long)]
        slide: PathBuf,
        #[arg(long, default_value = "he-stain-quantification")]
        model: String,
        /// Tiles per ONNX Runtime call (default: the configuration's `slide_batch_tiles`).
        #[arg(long)]
        batch: Option<usize>,
    },
    /// Serve one slide's regions to the process that started it, through OpenSlide (internal:
    /// isolates the C library, so a crash in it ends this process only).
    #[command(hide = true)]
    SlideReader { slide: PathBuf },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check every tenant's provenance chain against the stored results; exits 1 when a link is
    /// broken, naming the first broken analysis of each tenant.
    Verify {
        /// Check this tenant only.
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // mimalloc marks its segments for transparent huge pages; a slide analysis frees and takes
    // them back over and over, and each time the kernel zeroes 2 MiB (a quarter of the slide
    // pipeline's perf samples). Without them the pipeline reads 14 % more tiles per second
    // (BENCHMARKS.md). MIMALLOC_ALLOW_THP, when set, is left to decide.
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none() {
        let _ = nix::sys::prctl::set_thp_disable(true);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Openapi => print!("{}", onkos::http::openapi::document()),
        Command::SlideReader { slide } => onkos::slides::openslide::serve(&slide)?,
        Command::BenchInference {
            model,
            batch,
            seconds,
        } => {
            let config = Config::load(cli.config.as_deref())?;
            let rate = onkos::inference::bench::bundled_throughput(
                &config,
                &model,
                batch,
                std::time::Duration::from_secs(seconds),
            )?;
            println!("{rate:.0}");
        }
        Command::BenchParity {
            tile_models,
            against,
        } => {
            let config = Config::load(cli.config.as_deref())?;
            let against = match against.as_str() {
                "cuda" => onkos::inference::ProviderChoice::Cuda,
                "cpu" => onkos::inference::ProviderChoice::Cpu,
                other => anyhow::bail!("--against {other:?} is not cuda or cpu"),
            };
            let lines = onkos::inference::bench::parity(&config, &tile_models, against)?;
            let ok = lines.iter().all(|l| l.ends_with("ok=true"));
            for line in lines {
                println!("{line}");
            }
            if !ok {
                std::process::exit(1);
            }
        }
        Command::BenchTiles {
            model,
            batches,
            seconds,
            pinned,
        } => {
            let config = Config::load(cli.config.as_deref())?;
            let feed = if pinned {
                onkos::inference::bench::Feed::Pinned
            } else {
                onkos::inference::bench::Feed::Pageable
            };
            for line in
                onkos::inference::bench::tile_throughput(&config, &model, &batches, seconds, feed)?
            {
                println!("{line}");
            }
        }
        Command::BenchSlide {
            slide,
            model,
            batch,
        } => {
            let config = Config::load(cli.config.as_deref())?;
            println!(
                "{}",
                onkos::slides::bench::run(
                    &config,
                    &slide,
                    &model,
                    batch.unwrap_or(config.slide_batch_tiles as usize)
                )?
            );
        }
        Command::Token {
            tenant,
            roles,
            ttl,
            subject,
        } => {
            let config = Config::load(cli.config.as_deref())?;
            print!("{}", mint(&config, &tenant, &roles, ttl.into(), &subject)?);
            println!();
        }
        Command::Migrate => {
            let config = Config::load(cli.config.as_deref())?;
            let _telemetry = onkos::telemetry::tracing::init(&config)?;
            Database::open(&config).await?.close().await?;
            tracing::info!("migrations applied");
        }
        Command::Audit {
            action: AuditCommand::Verify { tenant },
        } => {
            let config = Config::load(cli.config.as_deref())?;
            let _telemetry = onkos::telemetry::tracing::init(&config)?;
            let database = Database::open(&config).await?;
            let report = onkos::audit::verify(&database.pool, tenant.as_deref()).await;
            database.close().await?;
            let mut intact = true;
            for chain in report? {
                match chain.broken {
                    None => println!(
                        "{}: {} links intact, {} records awaiting the sealer (each intact)",
                        chain.tenant, chain.links, chain.pending
                    ),
                    Some((analysis, why)) => {
                        intact = false;
                        println!(
                            "{}: BROKEN at analysis {analysis} after {} intact links: {why}",
                            chain.tenant, chain.links
                        );
                    }
                }
            }
            if !intact {
                std::process::exit(1);
            }
        }
        Command::Serve | Command::Api => {
            let mut config = Config::load(cli.config.as_deref())?;
            config.worker &= matches!(cli.command, Command::Serve);
            let _telemetry = onkos::telemetry::tracing::init(&config)?;
            let shutdown = onkos::shutdown::on_signal();
            Application::build(config).await?.run(shutdown).await?;
        }
        Command::Worker => {
            let mut config = Config::load(cli.config.as_deref())?;
            anyhow::ensure!(
                config.database_url.is_some(),
                "DATABASE_URL: onkos worker shares the API's database, so it needs its URL (the embedded cluster belongs to one process)"
            );
            // A worker serves no HTTP; bind an ephemeral loopback port so it never collides with an API.
            config.listen = "127.0.0.1:0".into();
            let _telemetry = onkos::telemetry::tracing::init(&config)?;
            let shutdown = onkos::shutdown::on_signal();
            Application::build(config)
                .await?
                .run_worker(shutdown)
                .await?;
        }
    }
    Ok(())
}

fn mint(
    config: &Config,
    tenant: &str,
    roles: &[String],
    ttl: std::time::Duration,
    subject: &str,
) -> anyhow::Result<String> {
    anyhow::ensure!(
        config.dev_auth(),
        "onkos token signs with the development key pair, but ONKOS_AUTH_PUBLIC_KEY or ONKOS_AUTH_JWKS_URL is set: \
         get tokens from that identity provider"
    );
    onkos::domain::ids::TenantId::parse(tenant).map_err(anyhow::Error::msg)?;
    for role in roles {
        anyhow::ensure!(
            onkos::auth::Role::parse(role).is_some(),
            "--role {role:?} is not submitter, clinician or admin"
        );
    }
    let keys = DevKeys::load_or_create(&config.keys_dir())
        .context("cannot load the development key pair")?;
    keys.mint(
        &config.auth_issuer,
        &config.auth_audience,
        subject,
        tenant,
        roles,
        ttl,
    )
}
