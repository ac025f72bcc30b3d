//! A model-based check of the invalidation guarantees: writers bump a
//! version in a reference store and then invalidate (by key, by tag, by a
//! group tag, or everything); a slow loader (a seeded 0–5 ms after reading
//! the store) fills concurrently; readers record what they saw and when.
//! The checker then asserts, for every read:
//!
//! - **same instance**: a read that started after an invalidation of its
//!   key returned on the same instance saw that write's version or newer;
//! - **across instances**: a read that started more than the isolation
//!   window after an invalidation returned on another instance did too;
//!   with a shared tier whose delivery can be awaited ([`run_delivered`]),
//!   the window counts from when the invalidation reached it, as the
//!   tier documents (within a bound; one not delivered in it counts from
//!   its return, stricter than documented).
//!
//! Shared by `tests/cache` (one instance, no shared tier) and `tests/redis`
//! (two instances on one real redis-server, with faults).

#![allow(dead_code)]

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tower::ServiceExt;
use tower_scale::cache::{Cache, CachePolicy, Invalidator, MokaStore, Storable, Windows};

/// What the origin answers: (key, version).
pub type Value = Arc<(u64, u64)>;
pub type Origin = tower::util::BoxCloneSyncService<u64, Value, String>;
pub type Svc = Cache<Origin, TagPolicy, MokaStore<u64, Value, String>>;

/// Keys by themselves; every entry tagged `k:{key}` and `g:{key % 2}`.
#[derive(Debug, Clone, Copy)]
pub struct TagPolicy;

impl CachePolicy<u64, Value> for TagPolicy {
    type Key = u64;
    fn key(&self, req: &u64) -> Option<u64> {
        Some(*req)
    }
    fn storable(&self, key: &u64, _: &Value, defaults: &Windows) -> Option<Storable> {
        Some(
            Storable::new(*defaults)
                .tag(format!("k:{key}"))
                .tag(format!("g:{}", key % 2)),
        )
    }
}

/// A small seeded generator (splitmix64).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The reference store and the logical clock every event is ordered by.
pub struct Model {
    versions: Vec<AtomicU64>,
    clock: AtomicU64,
    calls: AtomicU64,
    seed: u64,
    pub loads: AtomicUsize,
}

impl Model {
    pub fn new(keys: usize, seed: u64) -> Arc<Self> {
        Arc::new(Self {
            versions: (0..keys).map(|_| AtomicU64::new(1)).collect(),
            clock: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            seed,
            loads: AtomicUsize::new(0),
        })
    }

    /// Writes `key` (bumps its version) and returns the new version.
    pub fn bump(&self, key: u64) -> u64 {
        self.versions[key as usize].fetch_add(1, Ordering::SeqCst) + 1
    }

    pub fn keys(&self) -> u64 {
        self.versions.len() as u64
    }

    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::SeqCst)
    }

    /// The loader: reads the store, then takes a seeded 0–5 ms (so fills
    /// overlap the writes and invalidations that follow the read).
    pub fn origin(self: &Arc<Self>) -> Origin {
        let model = Arc::clone(self);
        tower::util::BoxCloneSyncService::new(tower::service_fn(move |k: u64| {
            let model = Arc::clone(&model);
            async move {
                let version = model
                    .versions
                    .get(k as usize)
                    .map(|v| v.load(Ordering::SeqCst))
                    .ok_or_else(|| format!("no key {k}"))?;
                model.loads.fetch_add(1, Ordering::Relaxed);
                let n = model.calls.fetch_add(1, Ordering::Relaxed);
                let micros = Rng::new(model.seed ^ n.wrapping_mul(0x2545_F491)).below(5_000);
                tokio::time::sleep(Duration::from_micros(micros)).await;
                Ok::<_, String>(Arc::new((k, version)))
            }
        }))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Invalidated {
    pub key: u64,
    pub version: u64,
    pub instance: usize,
    pub returned: u64,
    pub returned_at: Instant,
}

#[derive(Debug, Clone, Copy)]
pub struct Read {
    pub key: u64,
    pub instance: usize,
    pub start: u64,
    pub start_at: Instant,
    pub seen: u64,
}

#[derive(Debug, Default)]
pub struct History {
    pub invalidations: Vec<Invalidated>,
    pub reads: Vec<Read>,
    pub failed: usize,
    /// (index in `invalidations`, when the invalidating instance's tier
    /// had delivered it, and every one before it).
    pub delivered: Vec<(usize, Instant)>,
}

/// Waits until instance `i`'s invalidations so far reached the shared
/// tier: true if they did (within the hook's own bound).
pub type Delivered = Arc<
    dyn Fn(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>
        + Send
        + Sync,
>;

#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub seed: u64,
    pub readers: usize,
    pub writers: usize,
    pub reads_each: usize,
    pub writes_each: usize,
    /// The run also stops here, whatever the counts.
    pub max_time: Duration,
    /// Writers pause up to this between writes.
    pub write_pause: Duration,
}

/// Runs the readers and writers over `instances` (each a service and its
/// invalidator) and returns the history.
pub async fn run(model: &Arc<Model>, instances: &[(Svc, Invalidator<u64>)], load: Load) -> History {
    run_delivered(model, instances, load, None).await
}

/// [`run`], recording when each invalidation was delivered (`delivered`,
/// awaited in a task of its own, so writers go on meanwhile).
pub async fn run_delivered(
    model: &Arc<Model>,
    instances: &[(Svc, Invalidator<u64>)],
    load: Load,
    delivered: Option<Delivered>,
) -> History {
    let history = Arc::new(Mutex::new(History::default()));
    let deliveries: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
    let deadline = Instant::now() + load.max_time;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..load.writers {
        let (model, history) = (Arc::clone(model), Arc::clone(&history));
        let invalidators: Vec<_> = instances.iter().map(|(_, i)| i.clone()).collect();
        let mut rng = Rng::new(load.seed ^ (0xA11CE + w as u64));
        let pause = load.write_pause;
        let (delivered, deliveries) = (delivered.clone(), Arc::clone(&deliveries));
        tasks.spawn(async move {
            for _ in 0..load.writes_each {
                if Instant::now() >= deadline {
                    break;
                }
                let key = rng.below(model.keys());
                let instance = rng.below(invalidators.len() as u64) as usize;
                let version = model.bump(key);
                let inv = &invalidators[instance];
                match rng.below(4) {
                    0 => inv.invalidate_key(&key),
                    1 => inv.invalidate_tag(format!("k:{key}")),
                    2 => inv.invalidate_tag(format!("g:{}", key % 2)),
                    _ => inv.invalidate_all(),
                }
                let returned = model.tick();
                let returned_at = Instant::now();
                let index = {
                    let mut h = history.lock().unwrap();
                    h.invalidations.push(Invalidated {
                        key,
                        version,
                        instance,
                        returned,
                        returned_at,
                    });
                    h.invalidations.len() - 1
                };
                if let Some(delivered) = &delivered {
                    let (wait, history) = (delivered(instance), Arc::clone(&history));
                    deliveries.lock().unwrap().push(tokio::spawn(async move {
                        if wait.await {
                            history
                                .lock()
                                .unwrap()
                                .delivered
                                .push((index, Instant::now()));
                        }
                    }));
                }
                let micros = rng.below(pause.as_micros() as u64 + 1);
                tokio::time::sleep(Duration::from_micros(micros)).await;
            }
        });
    }
    for r in 0..load.readers {
        let (model, history) = (Arc::clone(model), Arc::clone(&history));
        let services: Vec<_> = instances.iter().map(|(s, _)| s.clone()).collect();
        let mut rng = Rng::new(load.seed ^ (0xB0B + r as u64));
        tasks.spawn(async move {
            for _ in 0..load.reads_each {
                if Instant::now() >= deadline {
                    break;
                }
                let key = rng.below(model.keys());
                let instance = rng.below(services.len() as u64) as usize;
                let start_at = Instant::now();
                let start = model.tick();
                let result = services[instance].clone().oneshot(key).await;
                {
                    let mut h = history.lock().unwrap();
                    match result {
                        Ok(v) => {
                            assert_eq!(v.0, key, "a response for another key");
                            h.reads.push(Read {
                                key,
                                instance,
                                start,
                                start_at,
                                seen: v.1,
                            });
                        }
                        Err(_) => h.failed += 1,
                    }
                }
                if rng.below(4) == 0 {
                    tokio::task::yield_now().await;
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a load task panicked");
    }
    let waits = std::mem::take(&mut *deliveries.lock().unwrap());
    for wait in waits {
        wait.await.expect("a delivery wait panicked");
    }
    Arc::try_unwrap(history)
        .map(|m| m.into_inner().unwrap())
        .expect("the history is still shared after every task ended")
}

/// What the checker found.
#[derive(Debug, Default)]
pub struct Verdict {
    pub checked: usize,
    pub checked_across: usize,
    pub violations: Vec<String>,
}

/// Checks every read against the invalidations that returned before it
/// started (same instance), or more than `isolation` before it started
/// (another instance; `None`: not checked across).
pub fn check(history: &History, isolation: Option<Duration>) -> Verdict {
    let mut verdict = Verdict::default();
    // Across instances, an invalidation counts from its delivery when it
    // was recorded, else from its return.
    let mut from: Vec<Instant> = history
        .invalidations
        .iter()
        .map(|i| i.returned_at)
        .collect();
    for &(index, at) in &history.delivered {
        if let Some(f) = from.get_mut(index) {
            *f = (*f).max(at);
        }
    }
    let mut by_key: std::collections::HashMap<u64, Vec<(&Invalidated, Instant)>> =
        Default::default();
    for (inv, &at) in history.invalidations.iter().zip(&from) {
        by_key.entry(inv.key).or_default().push((inv, at));
    }
    for read in &history.reads {
        verdict.checked += 1;
        let mut needed = 0;
        let mut across = false;
        for &(inv, counted_from) in by_key.get(&read.key).into_iter().flatten() {
            let applies = if inv.instance == read.instance {
                inv.returned < read.start
            } else {
                match isolation {
                    Some(window) => {
                        let applies = read.start_at > counted_from + window;
                        across |= applies;
                        applies
                    }
                    None => false,
                }
            };
            if applies && inv.version > needed {
                needed = inv.version;
            }
        }
        if across {
            verdict.checked_across += 1;
        }
        if read.seen < needed {
            verdict.violations.push(format!(
                "read of key {} on instance {} saw version {} but version {} was invalidated before it began",
                read.key, read.instance, read.seen, needed
            ));
        }
    }
    verdict
}
