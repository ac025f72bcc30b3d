//! A scripted origin service for the cache tests.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tower::Service;
use tower_scale::cache::MockClock;

pub type Resp = Arc<String>;
pub type Err = String;

/// Counts calls, answers `"{key}#{call number}"`, can fail, can hold each
/// call at a gate until the test lets it through, and can move a mock clock
/// during the call (to simulate how long a fill takes).
#[derive(Clone, Default)]
pub struct Origin {
    pub calls: Arc<AtomicUsize>,
    pub fail: Arc<AtomicBool>,
    pub gate: Option<Arc<Semaphore>>,
    pub gated_keys: Option<Vec<u64>>,
    pub tick: Option<(MockClock, Duration)>,
    pub dropped_unfinished: Arc<AtomicUsize>,
}

impl Origin {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn gated() -> Self {
        Self {
            gate: Some(Arc::new(Semaphore::new(0))),
            ..Self::default()
        }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub fn open(&self, n: usize) {
        if let Some(gate) = &self.gate {
            gate.add_permits(n);
        }
    }

    pub fn set_failing(&self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
    }
}

struct DropGuard {
    finished: bool,
    counter: Arc<AtomicUsize>,
}

impl Drop for DropGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.counter.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Service<u64> for Origin {
    type Response = Resp;
    type Error = Err;
    type Future = Pin<Box<dyn Future<Output = Result<Resp, Err>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Err>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, key: u64) -> Self::Future {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let fail = self.fail.load(Ordering::SeqCst);
        let gate = self.gate.clone().filter(|_| {
            self.gated_keys
                .as_ref()
                .is_none_or(|keys| keys.contains(&key))
        });
        let tick = self.tick.clone();
        let counter = self.dropped_unfinished.clone();
        Box::pin(async move {
            let mut guard = DropGuard {
                finished: false,
                counter,
            };
            if let Some(gate) = gate {
                gate.acquire().await.expect("gate closed").forget();
            }
            if let Some((clock, by)) = tick {
                clock.advance(by);
            }
            guard.finished = true;
            if fail {
                Err(format!("{key} failed #{n}"))
            } else {
                Ok(Arc::new(format!("{key}#{n}")))
            }
        })
    }
}

/// Polls `cond` until it holds or `within` passes (generous deadlines; no
/// fixed sleeps).
pub async fn eventually(what: &str, within: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
