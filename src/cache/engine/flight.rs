//! Single-flight: one inner call per key at a time; concurrent misses wait
//! for it and share its result.
//!
//! The map is sharded by the key's hash, so misses on different keys take
//! different locks and never wait for each other's inner calls (a lock is
//! held only to look up or remove a flight, never across an `.await`).

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

use super::log::InvalidationLog;
use crate::cache::key::{Hashed, PassThrough};

const SHARDS: usize = 64;

enum State<R, E> {
    Running,
    Done(Result<R, E>),
    /// The leader's future was dropped before it finished: a waiter takes over.
    Abandoned,
}

pub(crate) struct Flight<R, E> {
    state: Mutex<State<R, E>>,
    notify: Notify,
    /// The lowest version the leader's request accepts; a request that needs
    /// a newer one must not share the leader's (possibly older) result.
    min_version: u64,
    /// The invalidation sequence number when the flight began: after an
    /// invalidation that may touch the key, nobody joins it any more.
    started_seq: u64,
}

impl<R: Clone, E: Clone> Flight<R, E> {
    fn lock(&self) -> MutexGuard<'_, State<R, E>> {
        crate::sync::lock(&self.state)
    }

    /// Waits for the leader: `Some(result)`, or `None` if it was abandoned.
    pub(crate) async fn wait(&self) -> Option<Result<R, E>> {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before looking, so a completion in between is not missed.
            notified.as_mut().enable();
            match &*self.lock() {
                State::Done(result) => return Some(result.clone()),
                State::Abandoned => return None,
                State::Running => {}
            }
            notified.await;
        }
    }
}

type FlightMap<K, R, E> = HashMap<Hashed<K>, Arc<Flight<R, E>>, PassThrough>;
type Shard<K, R, E> = Mutex<FlightMap<K, R, E>>;

pub(crate) struct Flights<K, R, E> {
    shards: Box<[Shard<K, R, E>]>,
}

pub(crate) enum Join<K: Hash + Eq, R: Clone, E: Clone> {
    /// No call in flight: this request makes it.
    Lead(Leader<K, R, E>),
    /// A call is in flight: wait for it.
    Wait(Arc<Flight<R, E>>),
    /// A call is in flight, but for an older minimum version: call alone.
    Alone,
}

impl<K: Hash + Eq, R: Clone, E: Clone> Flights<K, R, E> {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(HashMap::with_hasher(PassThrough)))
                .collect(),
        }
    }

    fn shard(&self, key: &Hashed<K>) -> MutexGuard<'_, FlightMap<K, R, E>> {
        // The low bits pick the table slot inside the shard; use the high ones.
        let index = (key.hash_value() >> 58) as usize % SHARDS;
        crate::sync::lock(&self.shards[index])
    }

    /// Number of calls in flight (for tests and statistics).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| crate::sync::lock(s).len()).sum()
    }
}

impl<K: Hash + Eq + Clone, R: Clone, E: Clone> Flights<K, R, E> {
    /// Joins the key's flight or leads a new one. A flight that began
    /// before an invalidation that may touch the key is not joined: the
    /// request leads a new flight instead (the old one still answers its
    /// own, earlier waiters). So a request that starts after an
    /// invalidation returned never gets a result read before it.
    pub(crate) fn join_fenced(
        self: &Arc<Self>,
        key: &Hashed<K>,
        min_version: Option<u64>,
        log: &InvalidationLog<K>,
    ) -> Join<K, R, E> {
        let min_version = min_version.unwrap_or(0);
        let mut shard = self.shard(key);
        // Read under the shard lock: a flight in the map began at or after
        // the sequence it recorded.
        let started_seq = log.current();
        if let Some(flight) = shard.get(key) {
            let fenced = log.touched_since(key, flight.started_seq);
            if !fenced {
                return if flight.min_version >= min_version {
                    Join::Wait(Arc::clone(flight))
                } else {
                    Join::Alone
                };
            }
            // Fenced off: this request leads a new flight in its place.
        }
        let flight = Arc::new(Flight {
            state: Mutex::new(State::Running),
            notify: Notify::new(),
            min_version,
            started_seq,
        });
        shard.insert(key.clone(), Arc::clone(&flight));
        Join::Lead(Leader {
            flights: Arc::clone(self),
            key: key.clone(),
            flight,
            finished: false,
        })
    }
}

/// The right and duty to make the inner call for a key. Dropping it
/// unfinished (the leader's future was cancelled) wakes the waiters so one
/// of them takes over.
pub(crate) struct Leader<K: Hash + Eq, R: Clone, E: Clone> {
    flights: Arc<Flights<K, R, E>>,
    key: Hashed<K>,
    flight: Arc<Flight<R, E>>,
    finished: bool,
}

impl<K: Hash + Eq, R: Clone, E: Clone> Leader<K, R, E> {
    /// Hands the result to every waiter. Call it after storing the result,
    /// so a request that arrives once the flight is gone finds the entry.
    pub(crate) fn complete(mut self, result: &Result<R, E>) {
        self.finish(State::Done(result.clone()));
    }

    fn finish(&mut self, state: State<R, E>) {
        self.finished = true;
        *self.flight.lock() = state;
        {
            let mut shard = self.flights.shard(&self.key);
            if shard
                .get(&self.key)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                shard.remove(&self.key);
            }
        }
        self.flight.notify.notify_waiters();
    }
}

impl<K: Hash + Eq, R: Clone, E: Clone> Drop for Leader<K, R, E> {
    fn drop(&mut self) {
        if !self.finished {
            self.finish(State::Abandoned);
        }
    }
}
