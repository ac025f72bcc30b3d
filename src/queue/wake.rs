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
            _stop: stop.clone().drop_guard(),
        });
        runtime.spawn(listen(queue.clone(), Arc::downgrade(&hub), stop, pause));
        *slot = Arc::downgrade(&hub);
        hub
    }
}

/// Keeps a `LISTEN` session on the primary, waking a worker for each
/// notification of the queue, reconnecting after `pause` when it ends.
async fn listen(queue: Queue, hub: Weak<Hub>, stop: CancellationToken, pause: Duration) {
    let name = queue.inner.name.clone();
    loop {
        let (h, n) = (hub.clone(), name.clone());
        let on_notify: crate::pg::OnNotify = Arc::new(move |payload: &str| {
            if payload == &*n
                && let Some(hub) = h.upgrade()
            {
                hub.notify.notify_one();
            }
        });
        let h = hub.clone();
        let listening: crate::pg::OnListening = Arc::new(move |on| {
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
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(pause) => {}
        }
    }
}
