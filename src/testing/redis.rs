//! A throwaway `redis-server`.

use std::fmt;
use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::LocalError;
use super::process::{self, MarkedDir, RunAs, ServerChild, io_err};

/// A `redis-server` on a free 127.0.0.1 port, persistence off, in its own
/// temp dir; stopped and removed on drop.
///
/// ```no_run
/// use tower_scale::testing::LocalRedis;
/// let redis = LocalRedis::start()?;
/// println!("{}", redis.url()); // redis://127.0.0.1:PORT
/// redis.kill()?;               // as a crash would
/// redis.start_again()?;        // same port, empty data set
/// # Ok::<(), tower_scale::testing::LocalError>(())
/// ```
pub struct LocalRedis {
    binary: PathBuf,
    port: u16,
    dir: MarkedDir,
    child: ServerChild,
}

impl fmt::Debug for LocalRedis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalRedis")
            .field("port", &self.port)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

impl LocalRedis {
    /// Starts `redis-server` and waits until it answers `PING`.
    pub fn start() -> Result<Self, LocalError> {
        let binary = find_redis()?;
        let dir = MarkedDir::new("redis", &RunAs::current())?;
        let redis = Self {
            binary,
            port: process::free_port()?,
            dir,
            child: ServerChild::default(),
        };
        redis.start_again()?;
        Ok(redis)
    }

    /// The TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The temp dir the server runs in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// True while the server process runs.
    pub fn is_running(&self) -> bool {
        self.child.is_running()
    }

    /// Starts the server again on the same port (after `stop` or `kill`);
    /// the data set starts empty. Does nothing if it runs.
    pub fn start_again(&self) -> Result<(), LocalError> {
        let mut guard = self.child.lock();
        if let Some(child) = guard.as_mut()
            && matches!(child.try_wait(), Ok(None))
        {
            return Ok(());
        }
        let log_path = self.dir.path().join("redis.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| io_err("opening the redis log", e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| io_err("cloning the log handle", e))?;
        let mut child = std::process::Command::new(&self.binary)
            .current_dir(self.dir.path())
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| io_err("spawning redis-server", e))?;
        self.dir.record_server(child.id());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(LocalError::StartFailed {
                    node: "redis".into(),
                    reason: format!("redis-server exited with {status}"),
                    log: process::tail(&log_path, 20),
                });
            }
            if ping(self.port) {
                break;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LocalError::StartFailed {
                    node: "redis".into(),
                    reason: "no PONG after 30s".into(),
                    log: process::tail(&log_path, 20),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        *guard = Some(child);
        self.child.set_paused(false);
        Ok(())
    }

    /// Clean stop (SIGTERM; nothing is saved).
    pub fn stop(&self) -> Result<(), LocalError> {
        self.resume()?;
        let mut guard = self.child.lock();
        if let Some(mut child) = guard.take() {
            let _ = process::signal(child.id(), Signal::SIGTERM);
            if !process::wait_child(&mut child, Duration::from_secs(10)) {
                let _ = child.kill();
                let _ = child.wait();
            }
            self.dir.forget_server();
        }
        Ok(())
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&self) -> Result<(), LocalError> {
        let mut guard = self.child.lock();
        if let Some(mut child) = guard.take() {
            let _ = child.kill();
            let _ = child.wait();
            self.dir.forget_server();
        }
        self.child.set_paused(false);
        Ok(())
    }

    /// SIGSTOP: connections stay open, nothing answers.
    pub fn pause(&self) -> Result<(), LocalError> {
        self.child.pause("redis")
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&self) -> Result<(), LocalError> {
        self.child.resume();
        Ok(())
    }

    /// The server process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.pid()
    }
}

impl Drop for LocalRedis {
    fn drop(&mut self) {
        let _ = self.resume();
        let _ = self.kill();
    }
}

fn find_redis() -> Result<PathBuf, LocalError> {
    let candidates = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("redis-server"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    candidates
        .into_iter()
        .chain([PathBuf::from("/usr/bin/redis-server")])
        .find(|p| p.is_file())
        .ok_or_else(|| LocalError::MissingBinary {
            binary: "redis-server".into(),
            package: "redis-server",
        })
}

/// Sends a raw RESP `PING` and waits for `+PONG` (no client crate needed).
fn ping(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(200),
    ) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
