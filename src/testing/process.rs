//! Process plumbing shared by the PostgreSQL and Redis servers: free ports,
//! signals to whole process trees, running as the `postgres` user, temp dirs
//! that are swept after a crashed run.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, getuid};

use super::LocalError;

/// Prefix of every temp dir made by this module; the sweep looks for it.
pub(crate) const DIR_PREFIX: &str = "tower-scale-";
/// File in each temp dir naming the process that owns it (`pid starttime`).
const OWNER_FILE: &str = "tower-scale.owner";
/// File in each temp dir naming the server process running from it.
const SERVER_FILE: &str = "tower-scale.server";

/// The uid and gid server processes run as: the `postgres` user when this
/// process is root (PostgreSQL refuses to run as root), else ourselves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RunAs {
    pub(crate) ids: Option<(u32, u32)>,
}

impl RunAs {
    /// The identity for servers that refuse root (PostgreSQL).
    pub(crate) fn unprivileged() -> Result<Self, LocalError> {
        if !getuid().is_root() {
            return Ok(Self { ids: None });
        }
        let user = User::from_name("postgres")
            .map_err(|e| LocalError::Io {
                context: "looking up the `postgres` user".into(),
                source: io::Error::from(e),
            })?
            .ok_or_else(|| LocalError::MissingBinary {
                binary: "the `postgres` system user (needed to run PostgreSQL as root)".into(),
                package: "postgresql",
            })?;
        Ok(Self {
            ids: Some((user.uid.as_raw(), user.gid.as_raw())),
        })
    }

    /// Run as whoever we are.
    pub(crate) fn current() -> Self {
        Self { ids: None }
    }

    /// A command that runs as this identity.
    pub(crate) fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(program);
        if let Some((uid, gid)) = self.ids {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    /// Hands a path we created over to this identity.
    pub(crate) fn own(&self, path: &Path) -> Result<(), LocalError> {
        if let Some((uid, gid)) = self.ids {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| io_err(format!("chown {}", path.display()), e))?;
        }
        Ok(())
    }
}

pub(crate) fn io_err(context: impl Into<String>, source: io::Error) -> LocalError {
    LocalError::Io {
        context: context.into(),
        source,
    }
}

/// Where temp dirs go. As root the servers run as `postgres`, which must be
/// able to enter every parent directory, so `/tmp` is used rather than a
/// `TMPDIR` that may sit under `/root`.
fn temp_base() -> PathBuf {
    if let Some(dir) = std::env::var_os("TOWER_SCALE_TMPDIR") {
        return PathBuf::from(dir);
    }
    if getuid().is_root() {
        PathBuf::from("/tmp")
    } else {
        std::env::temp_dir()
    }
}

/// A temp dir owned by this process, marked so a later run can sweep it if
/// this process dies without cleaning up.
#[derive(Debug)]
pub(crate) struct MarkedDir {
    dir: tempfile::TempDir,
}

impl MarkedDir {
    pub(crate) fn new(kind: &str, run_as: &RunAs) -> Result<Self, LocalError> {
        let base = temp_base();
        sweep_stale(&base);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{kind}-"))
            .tempdir_in(&base)
            .map_err(|e| io_err(format!("creating a temp dir in {}", base.display()), e))?;
        // Written aside and renamed into place: another process's sweep
        // must never read a half-written mark (and take the dir for a dead
        // run's).
        let aside = dir.path().join(format!("{OWNER_FILE}.new"));
        fs::write(&aside, owner_mark(std::process::id())?)
            .and_then(|()| fs::rename(&aside, dir.path().join(OWNER_FILE)))
            .map_err(|e| io_err("writing the owner mark", e))?;
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err("chmod temp dir", e))?;
        run_as.own(dir.path())?;
        watch_over(&base)?;
        Ok(Self { dir })
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Records the server's pid and start time so a sweep (or the
    /// watchdog) can find it after a crash, and never mistake a process
    /// that reused the pid for it.
    pub(crate) fn record_server(&self, pid: u32) {
        // Best effort: the mark only matters after a crash.
        let start = process_start_time(pid).unwrap_or(0);
        let _ = fs::write(self.dir.path().join(SERVER_FILE), format!("{pid} {start}"));
    }

    /// The server was stopped: nothing to find after a crash.
    pub(crate) fn forget_server(&self) {
        let _ = fs::remove_file(self.dir.path().join(SERVER_FILE));
    }
}

/// The watchdog: a small `sh` process, in its own process group (so a
/// Ctrl-C to the test's group does not take it down), whose stdin is a pipe
/// only this process writes to. When this process ends, however it ends
/// (SIGKILL included), the kernel closes the write end; the watchdog reads
/// end-of-file and stops the servers running from this process's temp dirs
/// (PostgreSQL with SIGQUIT, an immediate shutdown that takes its backends
/// down too; Redis with SIGTERM; SIGKILL to both after 5 s), then removes
/// the dirs. A clean exit has removed them already: it finds nothing to do.
/// Not `PR_SET_PDEATHSIG`, which fires when the spawning *thread* exits (and
/// tokio's blocking threads do).
const WATCHDOG: &str = r#"
mark="$1"; base="$2"
cat >/dev/null
for d in "$base"/tower-scale-*; do
  # Ours only: a real directory whose owner mark we wrote (a file owned by
  # this user, not a link) and that names this process.
  [ -d "$d" ] && [ ! -L "$d" ] || continue
  [ -f "$d/tower-scale.owner" ] && [ ! -L "$d/tower-scale.owner" ] && [ -O "$d/tower-scale.owner" ] || continue
  [ "$(cat "$d/tower-scale.owner" 2>/dev/null)" = "$mark" ] || continue
  pid=; start=
  set -- $(cat "$d/tower-scale.server" 2>/dev/null)
  pid=$1; start=$2
  # The recorded server only if the pid still has its start time (not a
  # process that reused the pid).
  now=$(sed 's/^.*) //' "/proc/$pid/stat" 2>/dev/null | cut -d' ' -f20)
  [ -n "$start" ] && [ "$now" = "$start" ] || pid=
  case "$pid" in
    ''|*[!0-9]*) ;;
    *)
      if grep -qa redis-server "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
      elif grep -qa postgres "/proc/$pid/cmdline" 2>/dev/null; then
        kill -QUIT "$pid" 2>/dev/null
      fi
      # (A zombie's cmdline is empty: it counts as gone.)
      i=0
      while [ $i -lt 50 ] && grep -qa -e postgres -e redis-server "/proc/$pid/cmdline" 2>/dev/null; do
        sleep 0.1; i=$((i+1))
      done
      if grep -qa -e postgres -e redis-server "/proc/$pid/cmdline" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null
      fi
      ;;
  esac
  rm -rf "$d"
done
"#;

/// Starts this process's watchdog over `base` once (see [`WATCHDOG`]).
fn watch_over(base: &Path) -> Result<(), LocalError> {
    use std::os::unix::process::CommandExt;
    static STARTED: Mutex<Option<std::process::ChildStdin>> = Mutex::new(None);
    let mut started = crate::sync::lock(&STARTED);
    if started.is_some() {
        return Ok(());
    }
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("tower-scale-watchdog")
        .arg(owner_mark(std::process::id())?)
        .arg(base)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map_err(|e| io_err("starting the temp-dir watchdog (sh)", e))?;
    // Kept open for the life of the process (std opens it close-on-exec,
    // so no server inherits it): its closing is the signal.
    *started = child.stdin.take();
    Ok(())
}

/// `pid starttime` of a process: the start time tells a live owner from a
/// recycled pid.
fn owner_mark(pid: u32) -> Result<String, LocalError> {
    let start = process_start_time(pid).unwrap_or(0);
    Ok(format!("{pid} {start}"))
}

fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields after the last ')' are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    // Field 22 of stat is field 20 after "pid (comm) ".
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// True while `pid` exists and is not a zombie.
pub(crate) fn alive(pid: u32) -> bool {
    matches!(process_state(pid), Some(state) if state != 'Z' && state != 'X')
}

fn owner_alive(mark: &str) -> bool {
    let mut parts = mark.split_whitespace();
    let (Some(pid), Some(start)) = (parts.next(), parts.next()) else {
        return false;
    };
    let (Ok(pid), Ok(start)) = (pid.parse::<u32>(), start.parse::<u64>()) else {
        return false;
    };
    alive(pid) && process_start_time(pid) == Some(start)
}

/// Removes temp dirs left by runs whose owner process is gone, killing the
/// servers that still run from them.
fn sweep_stale(base: &Path) {
    let Ok(entries) = fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(DIR_PREFIX));
        if !is_ours {
            continue;
        }
        let Ok(mark) = fs::read_to_string(path.join(OWNER_FILE)) else {
            continue; // not marked: not ours to remove
        };
        if mark.trim().is_empty() || owner_alive(&mark) {
            continue;
        }
        if let Some(pid) = fs::read_to_string(path.join(SERVER_FILE))
            .ok()
            .and_then(|s| recorded_server(&s))
            && is_server_process(pid)
        {
            kill_tree(pid, Signal::SIGKILL);
            wait_gone(&tree(pid), Duration::from_secs(10));
        }
        tracing::info!(dir = %path.display(), "swept a temp dir left by a crashed run");
        let _ = fs::remove_dir_all(&path);
    }
}

/// The pid in a server mark (`pid starttime`), if that process still has
/// that start time.
fn recorded_server(mark: &str) -> Option<u32> {
    let mut parts = mark.split_whitespace();
    let pid = parts.next()?.parse::<u32>().ok()?;
    let start = parts.next()?.parse::<u64>().ok()?;
    (process_start_time(pid) == Some(start)).then_some(pid)
}

fn is_server_process(pid: u32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|cmd| {
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("postgres") || cmd.contains("redis-server")
        })
        .unwrap_or(false)
}

/// `pid` and all its descendants, parents first.
pub(crate) fn tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(child) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(format!("/proc/{child}/stat")) else {
                continue;
            };
            let Some(close) = stat.rfind(')') else {
                continue;
            };
            let ppid = stat[close + 2..]
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                children.entry(ppid).or_default().push(child);
            }
        }
    }
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        if let Some(kids) = children.get(&out[i]) {
            out.extend(kids.iter().copied());
        }
        i += 1;
    }
    out
}

/// Sends `signal` to `pid` and every descendant.
pub(crate) fn kill_tree(pid: u32, signal: Signal) {
    for p in tree(pid) {
        if let Ok(raw) = i32::try_from(p) {
            let _ = kill(Pid::from_raw(raw), signal);
        }
    }
}

/// Sends `signal` to one process.
pub(crate) fn signal(pid: u32, signal: Signal) -> Result<(), LocalError> {
    let raw = i32::try_from(pid).map_err(|_| LocalError::NotRunning {
        node: format!("pid {pid}"),
    })?;
    kill(Pid::from_raw(raw), signal).map_err(|e| io_err(format!("kill -{signal} {pid}"), e.into()))
}

/// Waits until none of `pids` is alive, or `timeout` passes.
pub(crate) fn wait_gone(pids: &[u32], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if pids.iter().all(|&p| !alive(p)) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits for a child to exit, up to `timeout`; true if it exited.
pub(crate) fn wait_child(child: &mut Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// A free TCP port on 127.0.0.1. Ports handed out by this process are not
/// handed out again, so parallel tests do not race each other for one.
pub(crate) fn free_port() -> Result<u16, LocalError> {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = crate::sync::lock(&GIVEN);
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..64 {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| io_err("binding 127.0.0.1:0 to find a free port", e))?;
        let port = listener
            .local_addr()
            .map_err(|e| io_err("reading the bound port", e))?
            .port();
        if given.insert(port) {
            return Ok(port);
        }
    }
    Err(io_err(
        "finding a free port",
        io::Error::new(io::ErrorKind::AddrInUse, "no free port after 64 tries"),
    ))
}

/// Runs a command to completion and turns a non-zero exit into an error that
/// shows its output.
pub(crate) fn run(mut cmd: Command, what: &str) -> Result<Output, LocalError> {
    let output = cmd
        .output()
        .map_err(|e| io_err(format!("running {what}"), e))?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(LocalError::CommandFailed {
            command: what.to_string(),
            status: output.status.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ),
        })
    }
}

/// The last `lines` lines of a log file, for error messages.
pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A server process we started, and whether it is paused: the state
/// `Node` and `LocalRedis` share.
#[derive(Debug, Default)]
pub(crate) struct ServerChild {
    child: Mutex<Option<Child>>,
    paused: std::sync::atomic::AtomicBool,
}

impl ServerChild {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        crate::sync::lock(&self.child)
    }

    /// The process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    /// True while the process runs (paused counts as running); forgets a
    /// process that exited.
    pub(crate) fn is_running(&self) -> bool {
        let mut child = self.lock();
        match child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(_) => {
                *child = None;
                false
            }
            None => false,
        }
    }

    pub(crate) fn is_paused(&self) -> bool {
        self.paused.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn set_paused(&self, paused: bool) {
        self.paused
            .store(paused, std::sync::atomic::Ordering::SeqCst);
    }

    /// SIGSTOP to the process and its children.
    pub(crate) fn pause(&self, node: &str) -> Result<(), LocalError> {
        let pid = self.pid().ok_or_else(|| LocalError::NotRunning {
            node: node.to_string(),
        })?;
        kill_tree(pid, Signal::SIGSTOP);
        self.set_paused(true);
        Ok(())
    }

    /// SIGCONT after [`pause`](Self::pause); nothing if not paused.
    pub(crate) fn resume(&self) {
        if self.paused.swap(false, std::sync::atomic::Ordering::SeqCst)
            && let Some(pid) = self.pid()
        {
            kill_tree(pid, Signal::SIGCONT);
        }
    }
}
