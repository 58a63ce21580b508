//! The default database: a private PostgreSQL cluster in the data folder, started from the
//! machine's own server binaries, reachable only through a Unix socket, stopped when onkos stops.
//!
//! The server runs as a child of a dedicated thread with `PR_SET_PDEATHSIG`, so even a `kill -9` of
//! onkos takes the cluster down with it; a graceful stop sends SIGINT (PostgreSQL's fast shutdown).
#![allow(unsafe_code)] // pre_exec + prctl, see `spawn_server`.

use anyhow::{Context, bail};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The superuser initdb creates, and the database onkos uses in it.
const SUPERUSER: &str = "onkos";
const DATABASE: &str = "onkos";
/// sockaddr_un holds 108 bytes; PostgreSQL appends `/.s.PGSQL.5432`.
const MAX_SOCKET_DIR: usize = 90;

#[derive(Debug)]
pub struct EmbeddedPostgres {
    socket_dir: PathBuf,
    pid: i32,
    // In a Mutex only so that the handle is Sync (tests share one cluster through a static).
    exited: std::sync::Mutex<Exit>,
}

/// Who the server process runs as. PostgreSQL refuses to run as root.
#[derive(Debug, Clone, Copy)]
struct RunAs {
    uid: u32,
    gid: u32,
}

impl EmbeddedPostgres {
    /// Initialises the cluster on first use, starts it and waits until it accepts connections.
    pub async fn start(
        cluster_dir: &Path,
        bin_dir: Option<&Path>,
        root_user: &str,
    ) -> anyhow::Result<Self> {
        let bin = find_bin_dir(bin_dir)?;
        let run_as = run_as(root_user)?;
        let cluster_dir = reachable_cluster_dir(&std::path::absolute(cluster_dir)?, run_as)?;
        let data = cluster_dir.join("data");
        private_dir(&cluster_dir, run_as)?;
        if !data.join("PG_VERSION").exists() {
            init_cluster(&bin, &data, run_as)?;
        }
        let socket_dir = socket_dir(&cluster_dir);
        private_dir(&socket_dir, run_as)?;
        wait_for_previous_server(&data, &socket_dir).await?;
        let (pid, exited) = spawn_server(&bin, &data, &socket_dir, &cluster_dir, run_as)?;
        let server = Self {
            socket_dir,
            pid,
            exited: std::sync::Mutex::new(exited),
        };
        server.wait_ready(Duration::from_secs(60)).await?;
        server.ensure_database(DATABASE).await?;
        Ok(server)
    }

    /// Connection options for a database in this cluster.
    pub fn options(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .socket(&self.socket_dir)
            .username(SUPERUSER)
            .database(database)
    }

    /// A `DATABASE_URL` for a database in this cluster, for other processes (`onkos worker`).
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}@localhost/{database}?host={}",
            self.socket_dir.display()
        )
    }

    pub fn default_options(&self) -> PgConnectOptions {
        self.options(DATABASE)
    }

    async fn wait_ready(&self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            match self.options("postgres").connect().await {
                Ok(conn) => return Ok(conn.close().await?),
                Err(e) => {
                    if let Some(status) = self.exited.lock().ok().and_then(|rx| rx.try_recv().ok())
                    {
                        bail!(
                            "the embedded PostgreSQL exited during start-up ({status:?}); see postgres.log in the cluster folder"
                        );
                    }
                    if start.elapsed() > limit {
                        bail!(
                            "the embedded PostgreSQL did not accept connections within {limit:?}: {e}"
                        );
                    }
                    // Start-up polling, not a test wait: the server gives no other readiness signal.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn ensure_database(&self, name: &str) -> anyhow::Result<()> {
        let mut conn = self.options("postgres").connect().await?;
        let exists: Option<i32> =
            sqlx::query_scalar("select 1 from pg_database where datname = $1")
                .bind(name)
                .fetch_optional(&mut conn)
                .await?;
        if exists.is_none() {
            // The name is one of our own constants, never caller input.
            sqlx::query(sqlx::AssertSqlSafe(format!("create database \"{name}\"")))
                .execute(&mut conn)
                .await?;
        }
        Ok(conn.close().await?)
    }

    /// Fast shutdown: open transactions roll back, the cluster is consistent on disk.
    pub fn stop(self) -> anyhow::Result<()> {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let _ = kill(Pid::from_raw(self.pid), Signal::SIGINT);
        let exited = self
            .exited
            .lock()
            .map(|rx| rx.recv_timeout(Duration::from_secs(30)).is_ok());
        match exited {
            Ok(true) => Ok(()),
            _ => {
                let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
                bail!("the embedded PostgreSQL did not stop within 30 s and was killed")
            }
        }
    }
}

/// A previous onkos on this data folder may still be checkpointing after its stop (its server got
/// the parent-death signal a moment ago): wait for it to exit. A server that still accepts
/// connections belongs to another running onkos — that is an error, not something to wait for.
async fn wait_for_previous_server(data: &Path, socket_dir: &Path) -> anyhow::Result<()> {
    let Some(pid) = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<i32>().ok()))
    else {
        return Ok(());
    };
    let alive = || {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|cmd| String::from_utf8_lossy(&cmd).contains("postgres"))
    };
    let probe = PgConnectOptions::new()
        .socket(socket_dir)
        .username(SUPERUSER)
        .database("postgres");
    if alive() && probe.connect().await.is_ok() {
        bail!(
            "another onkos is already using the database in {} (PostgreSQL pid {pid}); stop it or use another ONKOS_DATA_DIR",
            data.display()
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while alive() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the previous PostgreSQL (pid {pid}) on {} did not stop within 60 s",
            data.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// PATH first (an operator's choice wins), then Debian/Ubuntu's versioned folders, newest first.
fn find_bin_dir(configured: Option<&Path>) -> anyhow::Result<PathBuf> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = configured {
        anyhow::ensure!(
            has_server(dir),
            "ONKOS_EMBEDDED_PG_BIN: {} has no initdb and postgres",
            dir.display()
        );
        return Ok(dir.to_path_buf());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut versioned: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dirs| dirs.flatten().map(|d| d.path().join("bin")).collect())
        .unwrap_or_default();
    versioned.sort_by_key(|p| {
        let version = p
            .parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok());
        std::cmp::Reverse(version)
    });
    on_path
        .into_iter()
        .chain(versioned)
        .find(|dir| has_server(dir))
        .context(
            "no PostgreSQL server binaries (initdb, postgres) found on PATH or in /usr/lib/postgresql/*/bin; \
             install them (Debian/Ubuntu: apt-get install postgresql) or set DATABASE_URL to an existing server",
        )
}

fn run_as(root_user: &str) -> anyhow::Result<Option<RunAs>> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    let user = nix::unistd::User::from_name(root_user)?.with_context(|| {
        format!(
            "onkos runs as root and PostgreSQL refuses to; the user {root_user:?} (ONKOS_EMBEDDED_PG_USER) \
             to run it as does not exist: create one (useradd --system {root_user}) or run onkos as a normal user"
        )
    })?;
    Ok(Some(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }))
}

fn private_dir(dir: &Path, run_as: Option<RunAs>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some(RunAs { uid, gid }) = run_as {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))
            .with_context(|| format!("cannot hand {} to the PostgreSQL user", dir.display()))?;
    }
    Ok(())
}

/// As root, the server runs as another user, who must be able to enter every folder above the
/// cluster. When the data folder sits somewhere private (a clone under /root, say), the cluster
/// moves to a stable place of its own under /var/lib/onkos instead, named after the data folder.
fn reachable_cluster_dir(preferred: &Path, run_as: Option<RunAs>) -> anyhow::Result<PathBuf> {
    let Some(user) = run_as else {
        return Ok(preferred.to_path_buf());
    };
    if preferred
        .ancestors()
        .skip(1)
        .all(|dir| enterable(dir, user))
    {
        return Ok(preferred.to_path_buf());
    }
    let digest = hex::encode(
        &<sha2::Sha256 as sha2::Digest>::digest(preferred.as_os_str().as_encoded_bytes())[..8],
    );
    let base = Path::new("/var/lib/onkos");
    std::fs::create_dir_all(base).with_context(|| format!("cannot create {}", base.display()))?;
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755))?;
    let moved = base.join(format!("pg-{digest}"));
    tracing::warn!(
        wanted = %preferred.display(),
        using = %moved.display(),
        "the PostgreSQL user cannot enter the data folder; the embedded cluster lives elsewhere"
    );
    Ok(moved)
}

/// Whether `user` may enter `dir` by its permission bits (missing folders will be created by us).
fn enterable(dir: &Path, user: RunAs) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(dir) else {
        return true;
    };
    let mode = meta.mode();
    if meta.uid() == user.uid {
        mode & 0o100 != 0
    } else if meta.gid() == user.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// The socket lives in the cluster folder unless that path is too long for a Unix socket.
fn socket_dir(cluster_dir: &Path) -> PathBuf {
    let preferred = cluster_dir.join("run");
    if preferred.as_os_str().len() <= MAX_SOCKET_DIR {
        return preferred;
    }
    let digest = hex::encode(
        &<sha2::Sha256 as sha2::Digest>::digest(cluster_dir.as_os_str().as_encoded_bytes())[..8],
    );
    std::env::temp_dir().join(format!("onkos-pg-{digest}"))
}

fn command(bin: &Path, program: &str, cwd: &Path, run_as: Option<RunAs>) -> Command {
    let mut cmd = Command::new(bin.join(program));
    // The caller's working directory may be unreadable for the PostgreSQL user.
    cmd.current_dir(cwd);
    cmd.env("LC_ALL", "C").env_remove("PGDATA");
    if let Some(RunAs { uid, gid }) = run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn init_cluster(bin: &Path, data: &Path, run_as: Option<RunAs>) -> anyhow::Result<()> {
    let cwd = data.parent().unwrap_or(data);
    let output = command(bin, "initdb", cwd, run_as)
        .args([
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
            "-U",
            SUPERUSER,
            "-D",
        ])
        .arg(data)
        .output()
        .context("cannot run initdb")?;
    if !output.status.success() {
        bail!(
            "initdb failed for {}: {}{}",
            data.display(),
            String::from_utf8_lossy(&output.stderr).trim(),
            if run_as.is_some() {
                " (as root, every folder above the data folder must be enterable by the PostgreSQL user)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

type Exit = mpsc::Receiver<std::io::Result<std::process::ExitStatus>>;

fn spawn_server(
    bin: &Path,
    data: &Path,
    socket: &Path,
    cluster: &Path,
    run_as: Option<RunAs>,
) -> anyhow::Result<(i32, Exit)> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cluster.join("postgres.log"))?;
    if let Some(RunAs { uid, gid }) = run_as {
        std::os::unix::fs::chown(cluster.join("postgres.log"), Some(uid), Some(gid))?;
    }
    let mut cmd = command(bin, "postgres", cluster, run_as);
    cmd.arg("-D")
        .arg(data)
        .arg("-k")
        .arg(socket)
        .args([
            "-c",
            "listen_addresses=",
            "-c",
            "unix_socket_permissions=0700",
            "-c",
            "max_connections=200",
        ])
        .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent. It runs after std has
    // switched uid/gid, so the kernel does not clear the death signal on the credential change.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGINT)
                .map_err(std::io::Error::from)
        });
    }
    let (pid_tx, pid_rx) = mpsc::channel();
    let (exit_tx, exit_rx) = mpsc::channel();
    // The death signal fires when the *thread* that forked the child ends, so the child is spawned
    // from a thread that lives exactly as long as the server.
    std::thread::Builder::new()
        .name("embedded-postgres".into())
        .spawn(move || match cmd.spawn() {
            Ok(mut child) => {
                let _ = pid_tx.send(Ok(child.id()));
                let _ = exit_tx.send(child.wait());
            }
            Err(e) => {
                let _ = pid_tx.send(Err(e));
            }
        })?;
    let pid = pid_rx.recv()?.context("cannot start postgres")?;
    Ok((i32::try_from(pid)?, exit_rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn someone_else() -> RunAs {
        let me = nix::unistd::geteuid().as_raw();
        RunAs {
            uid: me.wrapping_add(4242),
            gid: nix::unistd::getegid().as_raw().wrapping_add(4242),
        }
    }

    #[test]
    fn a_private_folder_is_not_enterable_by_another_user() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        assert!(!enterable(dir.path(), someone_else()));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        assert!(enterable(dir.path(), someone_else()));
    }

    #[test]
    fn a_short_cluster_path_keeps_its_socket_inside() {
        assert_eq!(
            socket_dir(Path::new("/srv/onkos/postgres")),
            Path::new("/srv/onkos/postgres/run")
        );
        let long = PathBuf::from("/srv").join("x".repeat(120));
        assert!(socket_dir(&long).starts_with(std::env::temp_dir()));
    }
}
