//! The upstream set: the [`Upstreams`] handle an application changes at
//! run time, each upstream's shared state (health and counters), and the
//! stream of changes the balancer consumes as its `Discover`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::Uri;
use http::uri::{Authority, Scheme};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tower::discover::Change;

use super::error::{BuildError, InvalidUpstream};
use super::health::{Backoff, Failed, Health, Phase};
use super::stats::{FailureKind, UpstreamStats};
use crate::sync::lock;

/// An upstream's identity in the balancer: `http://host:port`.
pub(crate) type Key = Arc<str>;

/// An upstream's key in the balancer's discover stream: a number unique
/// in the process (tower's ready cache hashes it at every request, as it
/// moves the called endpoint out of its ready set and back).
pub(crate) type Id = u64;

/// A change to the set, as the balancer's discover stream receives it.
pub(crate) type SetChange = Change<Id, Arc<UpstreamState>>;

/// One upstream: where it is, its health, its counters. Shared by the
/// handle, the balancer's endpoint and the health checks.
#[derive(Debug)]
pub(crate) struct UpstreamState {
    pub(crate) key: Key,
    pub(crate) id: Id,
    pub(crate) scheme: Scheme,
    pub(crate) authority: Authority,
    pub(crate) health: Mutex<Health>,
    pub(crate) stats: UpstreamStats,
}

impl UpstreamState {
    fn new(key: Key, authority: Authority) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self {
            stats: UpstreamStats::new(&key),
            key,
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            scheme: Scheme::HTTP,
            authority,
            health: Mutex::new(Health::new(Instant::now())),
        }
    }

    /// `http://host:port/`.
    pub(crate) fn uri(&self) -> Uri {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query("/")
            .build()
            .unwrap_or_default()
    }

    /// A request sent under `sent_under` got a response head at `now`.
    pub(crate) fn succeeded(&self, sent_under: u64, now: Instant) {
        let mut health = lock(&self.health);
        let before = health.phase();
        health.succeeded(now, sent_under);
        if !matches!(before, Phase::Admitted { .. })
            && matches!(health.phase(), Phase::Admitted { .. })
        {
            drop(health);
            tracing::info!(upstream = %self.key, "upstream re-admitted (its probe answered)");
            self.stats.healthy(true);
        }
    }

    /// A request sent under `sent_under` (`None`: an active check) failed.
    pub(crate) fn failed(&self, kind: FailureKind, sent_under: Option<u64>, backoff: &Backoff) {
        self.stats.failed(kind);
        let outcome = lock(&self.health).failed(Instant::now(), sent_under, backoff);
        if let Failed::Ejected(length) = outcome {
            tracing::warn!(upstream = %self.key, %kind, ?length, "upstream ejected");
            self.stats.ejected();
        }
    }

    /// The connection closed while the body of a request sent under
    /// `sent_under` was written: counted as a reset, never an ejection
    /// (see [`Health::closed_during_upload`]).
    pub(crate) fn closed_during_upload(&self, sent_under: u64) {
        self.stats.failed(FailureKind::Reset);
        if lock(&self.health).closed_during_upload(sent_under) {
            tracing::info!(upstream = %self.key, "uploads cut three times in a row: its next request is a probe");
        }
    }
}

/// Where an upstream stands, in [`UpstreamStatus`].
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum UpstreamHealth {
    /// In rotation, taking `weight` of its fair share (below 1.0 while it
    /// ramps up after being added or re-admitted).
    Healthy {
        /// From 0.1 to 1.0 over the slow-start window.
        weight: f64,
    },
    /// Out of rotation for `remaining` more (then probed).
    Ejected {
        /// Time left on its back-off.
        remaining: Duration,
    },
    /// Its back-off is over: its next request is a probe, and it gets no
    /// other until the probe answers.
    Probing,
}

impl UpstreamHealth {
    /// Whether it takes requests (healthy, or due for its probe).
    pub fn in_rotation(&self) -> bool {
        !matches!(self, Self::Ejected { .. })
    }
}

/// One upstream's state, from [`Upstreams::status`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct UpstreamStatus {
    /// Its address, `http://host:port/`.
    pub url: Uri,
    /// In rotation, ejected or probing.
    pub health: UpstreamHealth,
    /// Ejections since it last answered.
    pub consecutive_failures: u32,
    /// Requests sent to it (retries and probes included).
    pub requests: u64,
    /// Requests that failed on it (refused, reset, timed out, not HTTP),
    /// and failed active checks.
    pub failures: u64,
    /// Times it was ejected.
    pub ejections: u64,
    /// Requests that failed on it and were sent again to another.
    pub retries: u64,
    /// Times it was probed before its back-off ended because every
    /// upstream was ejected (panic mode).
    pub panic_probes: u64,
    /// Requests waiting for its response head now (the load
    /// `tower_scale_upstream_load` reports).
    pub in_flight: u64,
}

/// What [`Upstreams::set`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SetOutcome {
    /// Upstreams that were not in the set before.
    pub added: Vec<Uri>,
    /// Upstreams that left it.
    pub removed: Vec<Uri>,
}

#[derive(Debug)]
struct Registry {
    list: Vec<Arc<UpstreamState>>,
    /// The balancer these upstreams feed.
    subscriber: Option<mpsc::UnboundedSender<SetChange>>,
    /// Its settings (for the ramp shown in the status).
    backoff: Backoff,
}

impl Registry {
    fn send(&mut self, change: SetChange) {
        if let Some(tx) = &self.subscriber
            && tx.send(change).is_err()
        {
            self.subscriber = None;
        }
    }
}

/// The set of upstreams a [`Balancer`](super::Balancer) spreads requests
/// over, changed at run time (from a service registry or a reloaded file).
///
/// Cloning gives another handle to the same set. The balancer follows
/// every change at once: an added upstream starts taking requests (ramped
/// up over the slow-start window), a removed one takes no new request and
/// finishes those it has in flight. Dropping every handle leaves the
/// balancer with the set as it was.
///
/// ```
/// use tower_scale::balance::Upstreams;
///
/// let upstreams = Upstreams::new();
/// upstreams.add("http://10.0.0.1:8080".parse()?)?;
/// upstreams.add("http://10.0.0.2:8080".parse()?)?;
/// // A reloaded list: 10.0.0.1 leaves, 10.0.0.3 joins.
/// let changed = upstreams.set([
///     "http://10.0.0.2:8080".parse()?,
///     "http://10.0.0.3:8080".parse()?,
/// ])?;
/// assert_eq!((changed.added.len(), changed.removed.len()), (1, 1));
/// assert_eq!(upstreams.list().len(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Upstreams {
    registry: Arc<Mutex<Registry>>,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self::new()
    }
}

/// The key of `url` (`http://host:port`, host lowercased, port explicit)
/// and its authority, or why it is refused.
fn normalize(url: &Uri) -> Result<(Key, Authority), InvalidUpstream> {
    let text = || url.to_string();
    let authority = url
        .authority()
        .ok_or_else(|| InvalidUpstream::NoHost(text()))?;
    let host = authority.host();
    if authority.as_str().contains('@') {
        return Err(InvalidUpstream::Credentials(host.to_string()));
    }
    if url.scheme() != Some(&Scheme::HTTP) {
        return Err(InvalidUpstream::Scheme(text()));
    }
    if host.is_empty() {
        return Err(InvalidUpstream::NoHost(text()));
    }
    if url.query().is_some() || !matches!(url.path(), "" | "/") {
        return Err(InvalidUpstream::Path(text()));
    }
    let host = host.to_ascii_lowercase();
    let port = authority.port_u16().unwrap_or(80);
    let authority: Authority = format!("{host}:{port}")
        .parse()
        .map_err(|_| InvalidUpstream::NoHost(text()))?;
    Ok((Arc::from(format!("http://{authority}")), authority))
}

impl Upstreams {
    /// An empty set.
    pub fn new() -> Self {
        Self {
            registry: Arc::new(Mutex::new(Registry {
                list: Vec::new(),
                subscriber: None,
                backoff: Backoff::default(),
            })),
        }
    }

    /// Adds `url` (`http://HOST:PORT`); `Ok(false)` if it is already in.
    pub fn add(&self, url: Uri) -> Result<bool, InvalidUpstream> {
        let (key, authority) = normalize(&url)?;
        let mut registry = lock(&self.registry);
        if registry.list.iter().any(|u| u.key == key) {
            return Ok(false);
        }
        let state = Arc::new(UpstreamState::new(key, authority));
        registry.list.push(Arc::clone(&state));
        registry.send(Change::Insert(state.id, state));
        Ok(true)
    }

    /// Removes `url`; `false` if it was not in the set. Requests it has in
    /// flight finish.
    pub fn remove(&self, url: &Uri) -> bool {
        let Ok((key, _)) = normalize(url) else {
            return false;
        };
        let mut registry = lock(&self.registry);
        let Some(i) = registry.list.iter().position(|u| u.key == key) else {
            return false;
        };
        let state = registry.list.remove(i);
        registry.send(Change::Remove(state.id));
        drop(registry);
        state.stats.removed();
        lock(&state.health).wake();
        true
    }

    /// Makes the set exactly `urls`: adds those not in it, removes those
    /// not listed, leaves the others (their health and counters) alone.
    /// Nothing changes if one of `urls` is refused.
    pub fn set(&self, urls: impl IntoIterator<Item = Uri>) -> Result<SetOutcome, InvalidUpstream> {
        // Sets, not scans: a registry's list of thousands stays linear.
        let mut wanted: Vec<(Key, Authority)> = Vec::new();
        let mut named: HashSet<Key> = HashSet::new();
        for url in urls {
            let (key, authority) = normalize(&url)?;
            if named.insert(key.clone()) {
                wanted.push((key, authority));
            }
        }
        let mut outcome = SetOutcome::default();
        let mut registry = lock(&self.registry);
        let mut removed = Vec::new();
        registry.list.retain(|u| {
            let keep = named.contains(&u.key);
            if !keep {
                removed.push(Arc::clone(u));
            }
            keep
        });
        for state in &removed {
            registry.send(Change::Remove(state.id));
            outcome.removed.push(state.uri());
        }
        let present: HashSet<Key> = registry.list.iter().map(|u| u.key.clone()).collect();
        for (key, authority) in wanted {
            if present.contains(&key) {
                continue;
            }
            let state = Arc::new(UpstreamState::new(key, authority));
            outcome.added.push(state.uri());
            registry.list.push(Arc::clone(&state));
            registry.send(Change::Insert(state.id, state));
        }
        drop(registry);
        for state in removed {
            state.stats.removed();
            lock(&state.health).wake();
        }
        Ok(outcome)
    }

    /// The upstreams, in the order they were added.
    pub fn list(&self) -> Vec<Uri> {
        lock(&self.registry).list.iter().map(|u| u.uri()).collect()
    }

    /// How many upstreams there are.
    pub fn len(&self) -> usize {
        lock(&self.registry).list.len()
    }

    /// Whether there is none.
    pub fn is_empty(&self) -> bool {
        lock(&self.registry).list.is_empty()
    }

    /// Each upstream's health and counters, in the order they were added.
    pub fn status(&self) -> Vec<UpstreamStatus> {
        let (list, backoff) = {
            let registry = lock(&self.registry);
            (registry.list.clone(), registry.backoff)
        };
        let now = Instant::now();
        list.iter()
            .map(|u| {
                let (health, consecutive_failures, ejections) = {
                    let h = lock(&u.health);
                    let health = match h.phase() {
                        Phase::Admitted { .. } => UpstreamHealth::Healthy {
                            weight: h.weight(now, &backoff),
                        },
                        Phase::Ejected { until } if until > now => UpstreamHealth::Ejected {
                            remaining: until - now,
                        },
                        Phase::Ejected { .. } | Phase::Probing { .. } => UpstreamHealth::Probing,
                    };
                    (health, h.consecutive_failures(), h.ejections())
                };
                let load =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                UpstreamStatus {
                    url: u.uri(),
                    health,
                    consecutive_failures,
                    requests: load(&u.stats.requests),
                    failures: load(&u.stats.failures),
                    ejections,
                    retries: load(&u.stats.retries),
                    panic_probes: load(&u.stats.panic_probes),
                    in_flight: load(&u.stats.in_flight),
                }
            })
            .collect()
    }

    /// The upstreams' shared states (for the health checks).
    pub(crate) fn states(&self) -> Vec<Arc<UpstreamState>> {
        lock(&self.registry).list.clone()
    }

    /// Whether any upstream is configured, and whether one may take a
    /// request now.
    pub(crate) fn usable(&self) -> (bool, bool) {
        let registry = lock(&self.registry);
        let now = Instant::now();
        let any = !registry.list.is_empty();
        let usable = registry
            .list
            .iter()
            .any(|u| lock(&u.health).admissible(now));
        (any, usable)
    }

    /// Panic mode: when no upstream takes requests and none is being
    /// probed, the one whose back-off ends first is probed at once (see
    /// [`Health::panic_probe`]); with the ejection count it is sent under.
    /// `None` when one is in rotation, due a probe, or being probed, or
    /// when there is none.
    pub(crate) fn panic_probe(&self) -> Option<(Arc<UpstreamState>, u64)> {
        let registry = lock(&self.registry);
        let mut soonest: Option<(Instant, &Arc<UpstreamState>)> = None;
        for u in &registry.list {
            // One in rotation, due, or probing: no panic.
            let until = lock(&u.health).ejected_until()?;
            if soonest.is_none_or(|(first, _)| until < first) {
                soonest = Some((until, u));
            }
        }
        let (_, state) = soonest?;
        let sent_under = lock(&state.health).panic_probe()?;
        state.stats.panic_probe();
        tracing::debug!(upstream = %state.key, "every upstream ejected: probing one early (panic mode)");
        Some((Arc::clone(state), sent_under))
    }

    /// Binds the set to a new balancer: the returned stream gets every
    /// current upstream, then every change.
    pub(crate) fn bind(
        &self,
        backoff: Backoff,
    ) -> Result<mpsc::UnboundedReceiver<SetChange>, BuildError> {
        let mut registry = lock(&self.registry);
        if registry
            .subscriber
            .as_ref()
            .is_some_and(|tx| !tx.is_closed())
        {
            return Err(BuildError::UpstreamsInUse);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        for u in &registry.list {
            let _ = tx.send(Change::Insert(u.id, Arc::clone(u)));
        }
        registry.subscriber = Some(tx);
        registry.backoff = backoff;
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str) -> Result<String, InvalidUpstream> {
        let uri: Uri = s.parse().map_err(|_| InvalidUpstream::NoHost(s.into()))?;
        normalize(&uri).map(|(k, _)| k.to_string())
    }

    #[test]
    fn addresses_are_normalised() {
        assert_eq!(
            key("http://Example.COM").as_deref(),
            Ok("http://example.com:80")
        );
        assert_eq!(
            key("http://127.0.0.1:8080/").as_deref(),
            Ok("http://127.0.0.1:8080")
        );
        assert_eq!(key("http://[::1]:81").as_deref(), Ok("http://[::1]:81"));
    }

    #[test]
    fn addresses_that_cannot_be_upstreams_are_refused() {
        assert!(matches!(
            key("https://a:1"),
            Err(InvalidUpstream::Scheme(_))
        ));
        assert!(matches!(key("/path"), Err(InvalidUpstream::NoHost(_))));
        assert!(matches!(
            key("http://a:1/base"),
            Err(InvalidUpstream::Path(_))
        ));
        assert!(matches!(
            key("http://a:1/?q"),
            Err(InvalidUpstream::Path(_))
        ));
        let err = key("http://user:secret@a:1").err();
        assert_eq!(err, Some(InvalidUpstream::Credentials("a".into())));
        assert!(
            !err.map(|e| e.to_string())
                .unwrap_or_default()
                .contains("secret"),
            "the password never reaches the message"
        );
    }

    #[test]
    fn set_diffs_against_the_current_set() -> Result<(), InvalidUpstream> {
        let u = Upstreams::new();
        let p = |s: &str| s.parse::<Uri>().unwrap_or_default();
        assert!(u.add(p("http://a:1"))?);
        assert!(!u.add(p("http://A:1/"))?, "the same upstream twice");
        u.add(p("http://b:1"))?;
        let out = u.set([p("http://b:1"), p("http://c:1"), p("http://c:1")])?;
        assert_eq!(out.added, [p("http://c:1/")]);
        assert_eq!(out.removed, [p("http://a:1/")]);
        assert_eq!(u.list(), [p("http://b:1/"), p("http://c:1/")]);
        assert!(u.set([p("http://d:1"), p("https://e:1")]).is_err());
        assert_eq!(u.len(), 2, "a refused list changes nothing");
        assert!(u.remove(&p("http://b:1")));
        assert!(!u.remove(&p("http://b:1")));
        Ok(())
    }
}
