//! Running the examples as real processes from tests, and waiting for a
//! condition with a deadline.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

/// The path of a built example (`cargo test --all-features` builds them).
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} not built; run the tests with `cargo test --all-features`",
        path.display()
    );
    path
}

/// A running example, killed on drop.
pub struct Running {
    pub child: Child,
    /// `IP:PORT` from its readiness line.
    pub addr: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts an example and waits for `listening on http://IP:PORT` on its
/// first stdout line.
pub fn start(name: &str, args: &[&str]) -> Running {
    start_reading(name, args, 0).0
}

/// Starts an example, waits for its readiness line and returns the
/// `extra` stdout lines that follow it.
pub fn start_reading(name: &str, args: &[&str], extra: usize) -> (Running, Vec<String>) {
    let mut child = Command::new(example(name))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    let mut stdout = BufReader::new(stdout);
    stdout.read_line(&mut line).expect("readiness line");
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("{name}: first line was {line:?}"))
        .to_string();
    let lines = (0..extra)
        .map(|_| {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("stdout line");
            line.trim().to_string()
        })
        .collect();
    (Running { child, addr }, lines)
}

/// Polls `cond` every 10 ms until it holds and returns how long that took;
/// fails the test after `within`.
pub async fn until(
    what: &str,
    within: std::time::Duration,
    mut cond: impl AsyncFnMut() -> bool,
) -> std::time::Duration {
    let started = std::time::Instant::now();
    while !cond().await {
        assert!(started.elapsed() < within, "timed out waiting for: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    started.elapsed()
}
