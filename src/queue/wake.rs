//! Waking workers: one `LISTEN` session per queue per process (a
//! [`Hub`]) shared by every worker of that queue here; each notification
//! wakes one idle worker.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::handle::Queue;

/// The wake-ups of one queue's workers in this process. The listening
/// task stops when the last worker lets go of it.
pub(crate) struct Hub {
    /// One permit per notification: one idle worker wakes.
    pub(crate) notify: Notify,
    /// Whether the `LISTEN` session is up.
    pub(crate) listening: AtomicBool,
    /// A worker is claiming for a notification; another notification came
    /// meanwhile.
    claiming: std::sync::Mutex<(bool, bool)>,
    _stop: DropGuard,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("listening", &self.listening.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Hub {
    /// Whether this worker should claim for a notification now: false if
    /// another is claiming (it will claim once more when done).
    pub(crate) fn begin_claim(&self) -> bool {
        let mut c = crate::sync::lock(&self.claiming);
        if c.0 {
            c.1 = true;
            false
        } else {
            c.0 = true;
            true
        }
    }

    /// The claim begun by [`begin_claim`](Self::begin_claim) is done; one
    /// more round if notifications came meanwhile.
    pub(crate) fn end_claim(&self) {
        let again = {
            let mut c = crate::sync::lock(&self.claiming);
            let again = c.1;
            *c = (false, false);
            again
        };
        if again {
            self.notify.notify_one();
        }
    }

    /// The hub of `queue` in this process, its listener started on
    /// `runtime` if none runs; `pause` between reconnections.
    pub(crate) fn of(queue: &Queue, pause: Duration, runtime: &tokio::runtime::Handle) -> Arc<Hub> {
        let mut slot = crate::sync::lock(&queue.inner.hub);
        if let Some(hub) = slot.upgrade() {
            return hub;
        }
        let stop = CancellationToken::new();
        let hub = Arc::new(Hub {
            notify: Notify::new(),
            listening: AtomicBool::new(false),
            claiming: std::sync::Mutex::new((false, false)),
            _stop: stop.clone().drop_guard(),
        });
        runtime.spawn(listen(queue.clone(), Arc::downgrade(&hub), stop, pause));
        *slot = Arc::downgrade(&hub);
        hub
    }
}

/// The first pause before listening again after a session that never
/// listened or did not last [`LASTED`] (doubled while that goes on, up to
/// the `pause` given); after one that did (it broke, or the primary
/// moved), again at once.
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// How long a session must have listened for the next to start at once
/// (a server that ends every session right after `LISTEN` would
/// otherwise be reconnected to in a tight loop).
const LASTED: Duration = Duration::from_secs(1);

/// Keeps a `LISTEN` session on the primary, waking a worker for each
/// notification of the queue, reconnecting when it ends (at once after a
/// session that listened, else after a back-off up to `pause`).
async fn listen(queue: Queue, hub: Weak<Hub>, stop: CancellationToken, pause: Duration) {
    let name = queue.inner.name.clone();
    let mut retry = FIRST_RETRY.min(pause);
    loop {
        let listened = Arc::new(std::sync::OnceLock::<tokio::time::Instant>::new());
        let (h, n) = (hub.clone(), name.clone());
        let on_notify: crate::pg::OnNotify = Arc::new(move |payload: &str| {
            if payload == &*n
                && let Some(hub) = h.upgrade()
            {
                hub.notify.notify_one();
            }
        });
        let (h, l) = (hub.clone(), Arc::clone(&listened));
        let listening: crate::pg::OnListening = Arc::new(move |on| {
            if on {
                let _ = l.set(tokio::time::Instant::now());
            }
            if let Some(hub) = h.upgrade() {
                hub.listening.store(on, Ordering::Release);
                if on {
                    // Jobs committed while no session listened: every idle
                    // worker looks once more.
                    hub.notify.notify_waiters();
                    hub.notify.notify_one();
                }
            }
        });
        let channel = queue.inner.sql.channel.clone();
        tokio::select! {
            () = stop.cancelled() => return,
            ended = queue.inner.db.listen(channel, on_notify, listening) => {
                if let Err(e) = ended {
                    tracing::debug!(queue = %name, error = %e, "job queue: listening again");
                }
            }
        }
        let wait = if listened.get().is_some_and(|at| at.elapsed() >= LASTED) {
            retry = FIRST_RETRY.min(pause);
            Duration::ZERO
        } else {
            let wait = retry;
            retry = (retry * 2).min(pause);
            wait
        };
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(wait) => {}
        }
    }
}
