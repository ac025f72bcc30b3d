//! CPU accounting of `examples/load.rs`: pinning threads to cores, and
//! how long the server threads, the generator thread and the PostgreSQL
//! processes ran (and waited to run) during a stretch, from
//! `/proc/.../schedstat` (falling back to `stat` ticks).
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

/// Pins the calling thread to `core`; says so once if it cannot.
pub fn pin(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    let pinned = set
        .set(core)
        .and_then(|()| nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set));
    if let Err(e) = pinned {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            eprintln!("load: could not pin a thread to core {core} ({e}); running unpinned");
        }
    }
}

/// Nanoseconds this process's threads whose name starts with `prefix`
/// spent on a CPU and waiting for one (`/proc/self/task/*/schedstat`).
/// On a CPU plus waiting for one is the time they had work: when it is
/// the whole run, that side was never idle, waiting for the other.
fn threads_time(prefix: &str) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (0, 0);
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.starts_with(prefix))
        })
        .map(|t| schedstat(&t.path()).unwrap_or((cpu_of(&t.path()), 0)))
        .fold((0, 0), |(r, w), (r2, w2)| (r + r2, w + w2))
}

/// On a CPU and waiting for one, in nanoseconds.
fn schedstat(dir: &std::path::Path) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(dir.join("schedstat")).ok()?;
    let mut f = s.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((f.next()??, f.next()??))
}

fn cpu_of(dir: &std::path::Path) -> u64 {
    if let Some((ns, _)) = schedstat(dir) {
        return ns;
    }
    // utime + stime, in clock ticks of 10 ms.
    std::fs::read_to_string(dir.join("stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?) * 10_000_000)
        })
        .unwrap_or(0)
}

/// On-CPU nanoseconds of each PostgreSQL process of the cluster (the
/// postmasters and their children), by pid.
fn postgres_cpu(postmasters: &[u32]) -> HashMap<u32, u64> {
    let mut out = HashMap::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let ppid = std::fs::read_to_string(p.path().join("stat"))
            .ok()
            .and_then(|s| {
                let rest = &s[s.rfind(')')? + 2..];
                rest.split_whitespace().nth(1)?.parse::<u32>().ok()
            });
        if postmasters.contains(&pid) || ppid.is_some_and(|pp| postmasters.contains(&pp)) {
            out.insert(pid, cpu_of(&p.path()));
        }
    }
    out
}

/// CPU used during a stretch, in nanoseconds.
#[derive(Default, Clone, Copy)]
pub struct Cpu {
    pub server: u64,
    pub client: u64,
    /// Runnable but waiting for the core (another process had it).
    pub server_wait: u64,
    pub client_wait: u64,
    pub postgres: u64,
}

/// CPU counters at the start of a stretch.
pub struct Probe<'a> {
    postmasters: &'a [u32],
    server: (u64, u64),
    client: (u64, u64),
    postgres: HashMap<u32, u64>,
}

impl<'a> Probe<'a> {
    pub fn start(postmasters: &'a [u32]) -> Self {
        Self {
            postmasters,
            server: threads_time("load-server"),
            client: threads_time("load-client"),
            postgres: postgres_cpu(postmasters),
        }
    }
    pub fn stop(self) -> Cpu {
        let pg = postgres_cpu(self.postmasters);
        let server = threads_time("load-server");
        let client = threads_time("load-client");
        Cpu {
            server: server.0.saturating_sub(self.server.0),
            client: client.0.saturating_sub(self.client.0),
            server_wait: server.1.saturating_sub(self.server.1),
            client_wait: client.1.saturating_sub(self.client.1),
            postgres: pg
                .iter()
                .map(|(pid, ns)| ns.saturating_sub(*self.postgres.get(pid).unwrap_or(&0)))
                .sum(),
        }
    }
}
