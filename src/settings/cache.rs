//! The cache, HTTP cache and Redis tier from settings.

use std::time::Duration;

use serde::Deserialize;

#[cfg(any(feature = "http", feature = "redis"))]
use super::SettingsError;
use crate::cache::CacheLayerBuilder;
#[cfg(feature = "redis")]
use crate::redact;

/// A read-through cache's settings: the setters of [`CacheLayerBuilder`],
/// each optional. The key function (and a weigher) stay in code: apply the
/// settings to a builder made with them.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct CacheSettings {
    /// [`CacheLayerBuilder::time_to_live`].
    #[serde(default, with = "humantime_serde")]
    pub time_to_live: Option<Duration>,
    /// [`CacheLayerBuilder::stale_while_revalidate`].
    #[serde(default, with = "humantime_serde")]
    pub stale_while_revalidate: Option<Duration>,
    /// [`CacheLayerBuilder::stale_if_error`].
    #[serde(default, with = "humantime_serde")]
    pub stale_if_error: Option<Duration>,
    /// [`CacheLayerBuilder::negative_ttl`].
    #[serde(default, with = "humantime_serde")]
    pub negative_ttl: Option<Duration>,
    /// [`CacheLayerBuilder::max_entries`] (ignored by a builder bounded
    /// by weight).
    #[serde(default)]
    pub max_entries: Option<u64>,
    /// [`CacheLayerBuilder::name`].
    #[serde(default)]
    pub name: Option<String>,
    /// [`CacheLayerBuilder::metrics_interval`].
    #[serde(default, with = "humantime_serde")]
    pub metrics_interval: Option<Duration>,
    /// [`CacheLayerBuilder::early_refresh`]; `0` turns it off.
    #[serde(default)]
    pub early_refresh: Option<f64>,
    /// [`CacheLayerBuilder::ttl_jitter`].
    #[serde(default)]
    pub ttl_jitter: Option<f64>,
    /// [`CacheLayerBuilder::max_tracked_invalidations`].
    #[serde(default)]
    pub max_tracked_invalidations: Option<usize>,
}

impl CacheSettings {
    /// `builder` with these settings applied (`build` validates them).
    pub fn apply<P>(&self, builder: CacheLayerBuilder<P>) -> CacheLayerBuilder<P> {
        let mut b = self.apply_weighted(builder);
        if let Some(n) = self.max_entries {
            b = b.max_entries(n);
        }
        b
    }

    /// Like [`apply`](Self::apply), for a builder bounded by weight
    /// ([`CacheLayerBuilder::max_weight`]): `max_entries` does not apply.
    pub fn apply_weighted<P, W>(
        &self,
        builder: CacheLayerBuilder<P, W>,
    ) -> CacheLayerBuilder<P, W> {
        let mut b = builder;
        if let Some(d) = self.time_to_live {
            b = b.time_to_live(d);
        }
        if let Some(d) = self.stale_while_revalidate {
            b = b.stale_while_revalidate(d);
        }
        if let Some(d) = self.stale_if_error {
            b = b.stale_if_error(d);
        }
        if let Some(d) = self.negative_ttl {
            b = b.negative_ttl(d);
        }
        if let Some(name) = &self.name {
            b = b.name(name.clone());
        }
        if let Some(d) = self.metrics_interval {
            b = b.metrics_interval(d);
        }
        match self.early_refresh {
            Some(0.0) => b = b.no_early_refresh(),
            Some(beta) => b = b.early_refresh(beta),
            None => {}
        }
        if let Some(f) = self.ttl_jitter {
            b = b.ttl_jitter(f);
        }
        if let Some(n) = self.max_tracked_invalidations {
            b = b.max_tracked_invalidations(n);
        }
        b
    }
}

/// The HTTP cache's settings: the setters of
/// [`HttpCacheLayerBuilder`](crate::http::HttpCacheLayerBuilder), each
/// optional.
#[cfg(feature = "http")]
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct HttpCacheSettings {
    /// `max_bytes`.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// `max_body`.
    #[serde(default)]
    pub max_body: Option<usize>,
    /// `private()` when true.
    #[serde(default)]
    pub private: Option<bool>,
    /// `default_scheme`.
    #[serde(default)]
    pub default_scheme: Option<String>,
    /// The heuristic freshness fraction (`heuristic`); `0` turns it off.
    #[serde(default)]
    pub heuristic_fraction: Option<f64>,
    /// The heuristic freshness cap (`heuristic`; default one day).
    #[serde(default, with = "humantime_serde")]
    pub heuristic_max: Option<Duration>,
    /// `share_set_cookie`.
    #[serde(default)]
    pub share_set_cookie: Option<bool>,
    /// `tag_header`.
    #[serde(default)]
    pub tag_header: Option<String>,
    /// `pass_tag_header`.
    #[serde(default)]
    pub pass_tag_header: Option<bool>,
    /// `targeted_fields` (the RFC 9213 target list, in order; empty: off):
    /// a list, or one string of names separated by white space or commas
    /// (how the environment gives it).
    #[serde(default, deserialize_with = "field_names")]
    pub targeted_fields: Option<Vec<String>>,
    /// `strip_targeted_fields`.
    #[serde(default)]
    pub strip_targeted_fields: Option<bool>,
    /// `name`.
    #[serde(default)]
    pub name: Option<String>,
    /// `metrics_interval`.
    #[serde(default, with = "humantime_serde")]
    pub metrics_interval: Option<Duration>,
    /// `cache_status`.
    #[serde(default)]
    pub cache_status: Option<bool>,
    /// `mark_hits`.
    #[serde(default)]
    pub mark_hits: Option<bool>,
    /// `max_stale_if_unreachable` (default one day; `0s`: never).
    #[serde(default, with = "humantime_serde")]
    pub max_stale_if_unreachable: Option<Duration>,
}

/// A list of names, or one string of them separated by white space or
/// commas.
#[cfg(feature = "http")]
fn field_names<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        List(Vec<String>),
        Text(String),
    }
    Ok(Some(match Names::deserialize(d)? {
        Names::List(list) => list,
        Names::Text(text) => text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|name| !name.is_empty())
            .map(str::to_string)
            .collect(),
    }))
}

#[cfg(feature = "http")]
impl HttpCacheSettings {
    /// The builder these settings describe.
    pub fn builder(&self) -> Result<crate::http::HttpCacheLayerBuilder, SettingsError> {
        let mut b = crate::http::HttpCacheLayer::builder();
        if let Some(n) = self.max_bytes {
            b = b.max_bytes(n);
        }
        if let Some(n) = self.max_body {
            b = b.max_body(n);
        }
        if self.private == Some(true) {
            b = b.private();
        }
        if let Some(scheme) = &self.default_scheme {
            b = b.default_scheme(scheme.clone());
        }
        if self.heuristic_fraction.is_some() || self.heuristic_max.is_some() {
            let fraction = self.heuristic_fraction.unwrap_or(0.1);
            if !(0.0..=1.0).contains(&fraction) {
                return Err(SettingsError::invalid(
                    "http_cache.heuristic_fraction",
                    "must be between 0 and 1",
                ));
            }
            b = b.heuristic(
                (fraction > 0.0).then_some(fraction),
                self.heuristic_max
                    .unwrap_or(Duration::from_secs(24 * 60 * 60)),
            );
        }
        if let Some(yes) = self.share_set_cookie {
            b = b.share_set_cookie(yes);
        }
        if let Some(name) = &self.tag_header {
            let header = http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                SettingsError::invalid("http_cache.tag_header", "not a header name")
            })?;
            b = b.tag_header(header);
        }
        if let Some(yes) = self.pass_tag_header {
            b = b.pass_tag_header(yes);
        }
        if let Some(names) = &self.targeted_fields {
            if let Some(bad) = names
                .iter()
                .find(|n| http::HeaderName::from_bytes(n.as_bytes()).is_err())
            {
                return Err(SettingsError::invalid(
                    "http_cache.targeted_fields",
                    format!("{bad:?} is not a header name"),
                ));
            }
            b = b.targeted_fields(names);
        }
        if let Some(strip) = self.strip_targeted_fields {
            b = b.strip_targeted_fields(strip);
        }
        if let Some(name) = &self.name {
            b = b.name(name.clone());
        }
        if let Some(d) = self.metrics_interval {
            b = b.metrics_interval(d);
        }
        if let Some(on) = self.cache_status {
            b = b.cache_status(on);
        }
        if let Some(yes) = self.mark_hits {
            b = b.mark_hits(yes);
        }
        if let Some(bound) = self.max_stale_if_unreachable {
            b = b.max_stale_if_unreachable(bound);
        }
        Ok(b)
    }
}

/// The shared Redis tier's settings: the setters of
/// [`RedisTierBuilder`](crate::cache::redis::RedisTierBuilder).
#[cfg(feature = "redis")]
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisSettings {
    /// `redis://[:password@]host:port[/db]` (the password is never shown).
    pub url: String,
    /// `prefix`.
    #[serde(default)]
    pub prefix: Option<String>,
    /// `timeout` of each call.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// `isolation_ttl`.
    #[serde(default, with = "humantime_serde")]
    pub isolation_ttl: Option<Duration>,
    /// `max_queued_invalidations`.
    #[serde(default)]
    pub max_queued_invalidations: Option<usize>,
    /// The fill lease's lifetime (`lease`; default 5 s).
    #[serde(default, with = "humantime_serde")]
    pub lease_ttl: Option<Duration>,
    /// How long others wait for a leased fill (`lease`; default 2 s).
    #[serde(default, with = "humantime_serde")]
    pub lease_wait: Option<Duration>,
    /// Failures that open the circuit (`circuit`; default 5).
    #[serde(default)]
    pub circuit_failures: Option<u32>,
    /// How long the circuit stays open (`circuit`; default 1 s).
    #[serde(default, with = "humantime_serde")]
    pub circuit_open_for: Option<Duration>,
}

#[cfg(feature = "redis")]
impl std::fmt::Debug for RedisSettings {
    /// The URL with its password replaced by `***`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSettings")
            .field("url", &redact::secrets(&self.url))
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("isolation_ttl", &self.isolation_ttl)
            .field("max_queued_invalidations", &self.max_queued_invalidations)
            .field("lease_ttl", &self.lease_ttl)
            .field("lease_wait", &self.lease_wait)
            .field("circuit_failures", &self.circuit_failures)
            .field("circuit_open_for", &self.circuit_open_for)
            .finish()
    }
}

#[cfg(feature = "redis")]
impl RedisSettings {
    /// The builder these settings describe.
    pub fn builder(&self) -> Result<crate::cache::redis::RedisTierBuilder, SettingsError> {
        if !(self.url.starts_with("redis://")
            || self.url.starts_with("rediss://")
            || self.url.starts_with("unix://")
            || self.url.starts_with("redis+unix://"))
        {
            return Err(SettingsError::invalid(
                "redis.url",
                "expected a redis://, rediss:// or unix:// URL",
            ));
        }
        let mut b = crate::cache::redis::builder(self.url.clone());
        if let Some(prefix) = &self.prefix {
            b = b.prefix(prefix.clone());
        }
        if let Some(d) = self.timeout {
            b = b.timeout(d);
        }
        if let Some(d) = self.isolation_ttl {
            b = b.isolation_ttl(d);
        }
        if let Some(n) = self.max_queued_invalidations {
            b = b.max_queued_invalidations(n);
        }
        if self.lease_ttl.is_some() || self.lease_wait.is_some() {
            b = b.lease(
                self.lease_ttl.unwrap_or(Duration::from_secs(5)),
                self.lease_wait.unwrap_or(Duration::from_secs(2)),
            );
        }
        if self.circuit_failures.is_some() || self.circuit_open_for.is_some() {
            b = b.circuit(
                self.circuit_failures.unwrap_or(5),
                self.circuit_open_for.unwrap_or(Duration::from_secs(1)),
            );
        }
        Ok(b)
    }
}
