//! One PostgreSQL server of a [`LocalCluster`](super::LocalCluster): init,
//! base backup, start, stop, kill, pause, promote, and what to connect to.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::testing::LocalError;
use crate::testing::process::{self, MarkedDir, RunAs, ServerChild, io_err};

/// How long a server may take to accept connections after it was started.
use super::{NodeRole, PgBin, START_TIMEOUT, format_lsn, parse_lsn};

/// One PostgreSQL server of a [`LocalCluster`](super::LocalCluster).
pub struct Node {
    name: String,
    role: NodeRole,
    port: u16,
    bin: PgBin,
    run_as: RunAs,
    dir: MarkedDir,
    child: ServerChild,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .field("running", &self.is_running())
            .field("paused", &self.is_paused())
            .finish()
    }
}

impl Node {
    pub(super) fn new(
        name: String,
        role: NodeRole,
        bin: &PgBin,
        run_as: RunAs,
    ) -> Result<Self, LocalError> {
        let dir = MarkedDir::new("pg", &run_as)?;
        Ok(Self {
            name,
            role,
            port: process::free_port()?,
            bin: bin.clone(),
            run_as,
            dir,
            child: ServerChild::default(),
        })
    }

    pub(super) fn init_primary(
        bin: &PgBin,
        run_as: RunAs,
        extra: &[String],
    ) -> Result<Self, LocalError> {
        let node = Self::new("primary".into(), NodeRole::Primary, bin, run_as)?;
        let mut initdb = node.command("initdb");
        initdb.arg("-D").arg(node.data_dir()).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        ]);
        process::run(initdb, "initdb")?;
        let mut conf = vec![
            "listen_addresses = '127.0.0.1'".to_string(),
            // Logical decoding too: a change feed needs it on the primary.
            "wal_level = logical".into(),
            "max_wal_senders = 20".into(),
            "max_replication_slots = 20".into(),
            "wal_keep_size = '512MB'".into(),
            "hot_standby = on".into(),
            "hot_standby_feedback = on".into(),
            "wal_receiver_status_interval = '1s'".into(),
            "max_connections = 200".into(),
            "shared_buffers = '32MB'".into(),
            // Throwaway servers: durability buys nothing and costs seconds.
            "fsync = off".into(),
            "full_page_writes = off".into(),
            "log_min_messages = warning".into(),
            "log_line_prefix = '%m [%p] '".into(),
        ];
        conf.extend(extra.iter().cloned());
        node.append_conf("postgresql.conf", &conf)?;
        node.append_conf(
            "pg_hba.conf",
            &[
                "host replication all 127.0.0.1/32 trust".to_string(),
                "host all all 127.0.0.1/32 trust".to_string(),
            ],
        )?;
        node.start()?;
        Ok(node)
    }

    pub(super) fn init_replica(
        bin: &PgBin,
        run_as: RunAs,
        primary: &Node,
        number: usize,
        delay: Option<Duration>,
        replication_port: u16,
    ) -> Result<Self, LocalError> {
        let node = Self::new(format!("replica-{number}"), NodeRole::Replica, bin, run_as)?;
        let mut backup = node.command("pg_basebackup");
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port.to_string(),
                "-U",
                "postgres",
            ])
            .arg("-D")
            .arg(node.data_dir())
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        process::run(backup, "pg_basebackup")?;
        let mut conf = Vec::new();
        if let Some(delay) = delay {
            conf.push(format!(
                "recovery_min_apply_delay = '{}ms'",
                delay.as_millis()
            ));
        }
        node.append_conf("postgresql.conf", &conf)?;
        // postgresql.auto.conf is read last; `-R` wrote primary_conninfo there.
        node.append_conf(
            "postgresql.auto.conf",
            &[format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={}'",
                replication_port, node.name
            )],
        )?;
        node.start()?;
        Ok(node)
    }

    pub(super) fn command(&self, binary: &str) -> std::process::Command {
        let mut cmd = self.run_as.command(self.bin.path(binary));
        // The postgres user may not be able to enter our working directory.
        cmd.current_dir(self.dir.path());
        cmd
    }

    pub(super) fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub(super) fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub(super) fn append_conf(&self, file: &str, lines: &[String]) -> Result<(), LocalError> {
        if lines.is_empty() {
            return Ok(());
        }
        let path = self.data_dir().join(file);
        let mut f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| io_err(format!("opening {}", path.display()), e))?;
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        f.write_all(format!("\n# tower-scale LocalCluster\n{text}").as_bytes())
            .map_err(|e| io_err(format!("writing {}", path.display()), e))
    }

    /// The node's name: `primary`, `replica-1`, `replica-2`, ...
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The role the node was started with (a promoted replica keeps
    /// `Replica` here; ask the server for its current role).
    pub fn initial_role(&self) -> NodeRole {
        self.role
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding the node's Unix socket, data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log so far (for failing tests to print).
    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// A connection URL: `postgresql://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A `tokio_postgres::Config` for this node over TCP.
    pub fn config(&self) -> tokio_postgres::Config {
        config_on(self.port)
    }

    /// Connects over TCP; the connection task runs on the current Tokio runtime.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, LocalError> {
        let (client, connection) = self.config().connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }

    /// The server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }

    /// True while the server process runs (paused counts as running).
    pub fn is_running(&self) -> bool {
        self.child.is_running()
    }

    /// True between [`pause`](Self::pause) and [`resume`](Self::resume).
    pub fn is_paused(&self) -> bool {
        self.child.is_paused()
    }

    /// Starts the server (again) on its port and waits until it accepts
    /// connections. Blocking; does nothing if it already runs.
    pub fn start(&self) -> Result<(), LocalError> {
        let mut guard = self.child.lock();
        if let Some(child) = guard.as_mut()
            && matches!(child.try_wait(), Ok(None))
        {
            return Ok(());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| io_err("opening the server log", e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| io_err("cloning the log handle", e))?;
        let mut cmd = self.command("postgres");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let mut child = cmd.spawn().map_err(|e| io_err("spawning postgres", e))?;
        self.dir.record_server(child.id());
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(LocalError::StartFailed {
                    node: self.name.clone(),
                    reason: format!("the server exited with {status}"),
                    log: process::tail(&self.log_path(), 30),
                });
            }
            if self.accepting(child.id()) {
                break;
            }
            if Instant::now() >= deadline {
                process::kill_tree(child.id(), Signal::SIGKILL);
                let _ = child.wait();
                return Err(LocalError::StartFailed {
                    node: self.name.clone(),
                    reason: format!("not ready after {START_TIMEOUT:?}"),
                    log: process::tail(&self.log_path(), 30),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        *guard = Some(child);
        self.child.set_paused(false);
        Ok(())
    }

    /// The postmaster writes its state on line 8 of `postmaster.pid`:
    /// `ready` (primary) or `standby` (hot standby accepting reads); this is
    /// what `pg_ctl start -w` waits for.
    /// The pid on line 1 must be the server we just started: a killed
    /// server leaves its `postmaster.pid` behind.
    pub(super) fn accepting(&self, pid: u32) -> bool {
        let Ok(text) = fs::read_to_string(self.data_dir().join("postmaster.pid")) else {
            return false;
        };
        let mut lines = text.lines();
        let ours = lines.next().is_some_and(|l| l.trim() == pid.to_string());
        ours && lines
            .nth(6)
            .is_some_and(|l| matches!(l.trim(), "ready" | "standby"))
    }

    /// Clean stop: `pg_ctl stop -m fast` (clients are disconnected, then the
    /// server checkpoints and exits). Blocking.
    pub fn stop(&self) -> Result<(), LocalError> {
        self.resume()?;
        let mut guard = self.child.lock();
        let Some(mut child) = guard.take() else {
            return Ok(());
        };
        let mut cmd = self.command("pg_ctl");
        cmd.arg("stop")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "fast", "-w", "-t", "60"]);
        let result = process::run(cmd, "pg_ctl stop -m fast");
        if result.is_err() {
            process::kill_tree(child.id(), Signal::SIGKILL);
        }
        let _ = child.wait();
        self.dir.forget_server();
        result.map(|_| ())
    }

    /// Kills the server and all its processes with SIGKILL, as a crash
    /// would. Blocking until they are gone.
    pub fn kill(&self) -> Result<(), LocalError> {
        let mut guard = self.child.lock();
        let Some(mut child) = guard.take() else {
            return Ok(());
        };
        let pids = process::tree(child.id());
        process::kill_tree(child.id(), Signal::SIGKILL);
        let _ = child.wait();
        process::wait_gone(&pids, Duration::from_secs(10));
        self.dir.forget_server();
        self.child.set_paused(false);
        Ok(())
    }

    /// Stalls the server (SIGSTOP to every server process): connections
    /// stay open but nothing answers, like a hung machine.
    pub fn pause(&self) -> Result<(), LocalError> {
        self.child.pause(&self.name)
    }

    /// Resumes a paused server (SIGCONT).
    pub fn resume(&self) -> Result<(), LocalError> {
        self.child.resume();
        Ok(())
    }

    /// Promotes this replica to a primary with `pg_promote()` and waits
    /// until it accepts writes.
    pub async fn promote(&self) -> Result<(), LocalError> {
        let client = self.connect().await?;
        let row = client.query_one("SELECT pg_promote(true, 60)", &[]).await?;
        let promoted: bool = row.get(0);
        if !promoted {
            return Err(LocalError::Config(format!(
                "pg_promote() on {} returned false",
                self.name
            )));
        }
        Ok(())
    }

    /// `pg_current_wal_lsn()` on a primary.
    pub async fn current_lsn(&self) -> Result<u64, LocalError> {
        let client = self.connect().await?;
        let row = client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?;
        parse_lsn(row.get(0))
    }

    /// `pg_last_wal_replay_lsn()` on a replica (`None` before any replay).
    pub async fn replay_lsn(&self) -> Result<Option<u64>, LocalError> {
        let client = self.connect().await?;
        let row = client
            .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
            .await?;
        row.get::<_, Option<&str>>(0).map(parse_lsn).transpose()
    }

    /// Waits until this replica has replayed WAL up to `lsn`.
    pub async fn wait_for_replay(&self, lsn: u64, timeout: Duration) -> Result<(), LocalError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let client = self.connect().await?;
        loop {
            let row = client
                .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
                .await?;
            let replayed = row.get::<_, Option<&str>>(0).map(parse_lsn).transpose()?;
            if replayed.is_some_and(|r| r >= lsn) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LocalError::Timeout(format!(
                    "{} did not replay {} within {timeout:?} (at {:?})",
                    self.name,
                    format_lsn(lsn),
                    replayed.map(format_lsn)
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    pub(super) fn teardown(&self) {
        let _ = self.resume();
        let mut guard = self.child.lock();
        if let Some(mut child) = guard.take() {
            let pids = process::tree(child.id());
            // SIGQUIT is PostgreSQL's immediate shutdown: the fastest clean exit.
            let _ = process::signal(child.id(), Signal::SIGQUIT);
            if !process::wait_child(&mut child, Duration::from_secs(10)) {
                process::kill_tree(child.id(), Signal::SIGKILL);
                let _ = child.wait();
            }
            if !process::wait_gone(&pids, Duration::from_secs(5)) {
                for pid in pids {
                    let _ = process::signal(pid, Signal::SIGKILL);
                }
            }
        }
    }
}

/// How tests connect to a local server listening on `port` of 127.0.0.1
/// (the server's own port, or a proxy's in front of it).
pub(super) fn config_on(port: u16) -> tokio_postgres::Config {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .application_name("tower-scale-test")
        .connect_timeout(Duration::from_secs(5));
    config
}
