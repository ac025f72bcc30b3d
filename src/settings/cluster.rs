//! [`ClusterSettings`]: a [`ClusterBuilder`] from settings.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::SettingsError;
use crate::pg::{Cluster, ClusterBuilder, NodeConfig};
use crate::redact;

/// One node: a connection URL (`postgresql://user:password@host:port/db`)
/// or key-value string, with an optional name, zone and region. In TOML or JSON a
/// plain string is a node with only a URL.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(from = "NodeRepr")]
pub struct NodeSettings {
    /// How to connect (holds the password: never shown).
    pub url: String,
    /// The node's name (default `primary`, `replica-1`, ... in order).
    pub name: Option<String>,
    /// Its zone label.
    pub zone: Option<String>,
    /// Its region label ([`NodeConfig::region`]).
    pub region: Option<String>,
}

impl fmt::Debug for NodeSettings {
    /// The URL with its password replaced by `***`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeSettings")
            .field("url", &redact::secrets(&self.url))
            .field("name", &self.name)
            .field("zone", &self.zone)
            .field("region", &self.region)
            .finish()
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NodeRepr {
    Url(String),
    Full(NodeFull),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFull {
    url: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    region: Option<String>,
}

impl From<NodeRepr> for NodeSettings {
    fn from(repr: NodeRepr) -> Self {
        match repr {
            NodeRepr::Url(url) => Self {
                url,
                name: None,
                zone: None,
                region: None,
            },
            NodeRepr::Full(NodeFull {
                url,
                name,
                zone,
                region,
            }) => Self {
                url,
                name,
                zone,
                region,
            },
        }
    }
}

/// A list of nodes, or one string of URLs separated by white space (how
/// the environment gives it).
fn nodes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<NodeSettings>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Nodes {
        List(Vec<NodeSettings>),
        Urls(String),
    }
    Ok(match Nodes::deserialize(d)? {
        Nodes::List(list) => list,
        Nodes::Urls(text) => text
            .split_whitespace()
            .map(|url| NodeSettings {
                url: url.to_string(),
                name: None,
                zone: None,
                region: None,
            })
            .collect(),
    })
}

impl NodeSettings {
    fn node(&self, field: &str) -> Result<NodeConfig, SettingsError> {
        if self.url.trim().is_empty() {
            return Err(SettingsError::invalid(field, "an empty connection string"));
        }
        // The parser's message never holds the URL, but redact anyway.
        let mut node = NodeConfig::from_url(&self.url).map_err(|e| {
            SettingsError::invalid(field, format!("not a PostgreSQL connection string ({e})"))
        })?;
        if let Some(name) = &self.name {
            node = node.name(name.clone());
        }
        if let Some(zone) = &self.zone {
            node = node.zone(zone.clone());
        }
        if let Some(region) = &self.region {
            node = node.region(region.clone());
        }
        Ok(node)
    }
}

/// A [`Cluster`]'s settings: the setters of [`ClusterBuilder`], each
/// optional (left out, the builder's default).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ClusterSettings {
    /// The primary.
    pub primary: NodeSettings,
    /// The replicas (from one string: URLs separated by white space).
    #[serde(default, deserialize_with = "nodes")]
    pub replicas: Vec<NodeSettings>,
    /// [`ClusterBuilder::zone`].
    #[serde(default)]
    pub zone: Option<String>,
    /// [`ClusterBuilder::local_region`].
    #[serde(default)]
    pub local_region: Option<String>,
    /// [`ClusterBuilder::local_wait`].
    #[serde(default, with = "humantime_serde")]
    pub local_wait: Option<Duration>,
    /// [`ClusterBuilder::identity`].
    #[serde(default)]
    pub identity: Option<String>,
    /// [`ClusterBuilder::pool_size`].
    #[serde(default)]
    pub pool_size: Option<usize>,
    /// [`ClusterBuilder::pool_wait_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub pool_wait_timeout: Option<Duration>,
    /// [`ClusterBuilder::pool_create_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub pool_create_timeout: Option<Duration>,
    /// [`ClusterBuilder::pool_recycle_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub pool_recycle_timeout: Option<Duration>,
    /// [`ClusterBuilder::statement_timeout`] (`"0s"` turns it off).
    #[serde(default, with = "humantime_serde")]
    pub statement_timeout: Option<Duration>,
    /// [`ClusterBuilder::probe_interval`].
    #[serde(default, with = "humantime_serde")]
    pub probe_interval: Option<Duration>,
    /// [`ClusterBuilder::probe_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub probe_timeout: Option<Duration>,
    /// [`ClusterBuilder::lag_budget`].
    #[serde(default, with = "humantime_serde")]
    pub lag_budget: Option<Duration>,
    /// [`ClusterBuilder::readmission_ramp`].
    #[serde(default, with = "humantime_serde")]
    pub readmission_ramp: Option<Duration>,
    /// [`ClusterBuilder::read_your_writes_wait`].
    #[serde(default, with = "humantime_serde")]
    pub read_your_writes_wait: Option<Duration>,
    /// [`ClusterBuilder::primary_wait`].
    #[serde(default, with = "humantime_serde")]
    pub primary_wait: Option<Duration>,
    /// [`ClusterBuilder::fallback_to_primary`].
    #[serde(default)]
    pub fallback_to_primary: Option<bool>,
    /// [`ClusterBuilder::read_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub read_timeout: Option<Duration>,
    /// [`ClusterBuilder::write_timeout`].
    #[serde(default, with = "humantime_serde")]
    pub write_timeout: Option<Duration>,
}

/// A [`ClusterBuilder`] setter taking a duration.
type SetDuration = fn(ClusterBuilder, Duration) -> ClusterBuilder;

impl ClusterSettings {
    /// The builder these settings describe (its `build` validates the rest).
    ///
    /// ```no_run
    /// use tower_scale::settings::Settings;
    ///
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// let settings = Settings::from_env("TOWER_SCALE")?;
    /// let Some(cluster) = settings.cluster else {
    ///     return Err("set TOWER_SCALE__CLUSTER__PRIMARY".into());
    /// };
    /// let cluster = cluster.builder()?.build().await?;
    /// # drop(cluster);
    /// # Ok(())
    /// # }
    /// ```
    pub fn builder(&self) -> Result<ClusterBuilder, SettingsError> {
        let mut b = Cluster::builder().primary(self.primary.node("cluster.primary")?);
        for (i, replica) in self.replicas.iter().enumerate() {
            b = b.replica(replica.node(&format!("cluster.replicas[{i}]"))?);
        }
        if let Some(zone) = &self.zone {
            b = b.zone(zone.clone());
        }
        if let Some(region) = &self.local_region {
            b = b.local_region(region.clone());
        }
        if let Some(identity) = &self.identity {
            b = b.identity(identity.clone());
        }
        if let Some(n) = self.pool_size {
            if n == 0 {
                return Err(SettingsError::invalid(
                    "cluster.pool_size",
                    "must be at least 1",
                ));
            }
            b = b.pool_size(n);
        }
        let durations: [(Option<Duration>, SetDuration); 13] = [
            (self.local_wait, ClusterBuilder::local_wait),
            (self.pool_wait_timeout, ClusterBuilder::pool_wait_timeout),
            (
                self.pool_create_timeout,
                ClusterBuilder::pool_create_timeout,
            ),
            (
                self.pool_recycle_timeout,
                ClusterBuilder::pool_recycle_timeout,
            ),
            (self.probe_interval, ClusterBuilder::probe_interval),
            (self.probe_timeout, ClusterBuilder::probe_timeout),
            (self.lag_budget, ClusterBuilder::lag_budget),
            (self.readmission_ramp, ClusterBuilder::readmission_ramp),
            (
                self.read_your_writes_wait,
                ClusterBuilder::read_your_writes_wait,
            ),
            (self.primary_wait, ClusterBuilder::primary_wait),
            (self.read_timeout, ClusterBuilder::read_timeout),
            (self.write_timeout, ClusterBuilder::write_timeout),
            (self.statement_timeout, |b, d| {
                b.statement_timeout((!d.is_zero()).then_some(d))
            }),
        ];
        for (value, set) in durations {
            if let Some(d) = value {
                b = set(b, d);
            }
        }
        if let Some(yes) = self.fallback_to_primary {
            b = b.fallback_to_primary(yes);
        }
        Ok(b)
    }
}
