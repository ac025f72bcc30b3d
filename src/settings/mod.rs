//! Settings from TOML, JSON or the environment (feature `serde`): the
//! cluster, cache, HTTP cache and Redis builders made from a
//! `serde`-deserialisable description, the glue deadpool-postgres users get
//! from its `Config`.
//!
//! Every field is optional except the cluster's `primary`: what is left out
//! keeps the builder's documented default. Durations are humane strings
//! (`"250ms"`, `"30s"`, `"1m 30s"`). Unknown fields are refused, and every
//! error names the field that is wrong. Secrets (the password in a
//! connection URL) never appear in `Debug` output or in errors.
//!
//! ```toml
//! [cluster]
//! primary = "postgresql://app:secret@10.0.0.1/app"
//! replicas = ["postgresql://app:secret@10.0.0.2/app",
//!             { url = "postgresql://app:secret@10.0.0.3/app", name = "eu-b", zone = "eu-1b" }]
//! pool_size = 8
//! read_timeout = "2s"
//!
//! [cache]
//! time_to_live = "60s"
//! max_entries = 100000
//! name = "users"
//! ```
//!
//! The same from the environment, with the prefix `TOWER_SCALE` and `__`
//! between levels (the replicas' URLs separated by white space; from the
//! environment a replica is a URL only):
//!
//! ```text
//! TOWER_SCALE__CLUSTER__PRIMARY=postgresql://app:secret@10.0.0.1/app
//! TOWER_SCALE__CLUSTER__REPLICAS="postgresql://app:secret@10.0.0.2/app postgresql://app:secret@10.0.0.3/app"
//! TOWER_SCALE__CLUSTER__POOL_SIZE=8
//! TOWER_SCALE__CLUSTER__READ_TIMEOUT=2s
//! TOWER_SCALE__CACHE__TIME_TO_LIVE=60s
//! ```
//!
//! ```
//! use tower_scale::cache::CacheLayer;
//! use tower_scale::settings::Settings;
//!
//! let settings = Settings::from_toml(
//!     r#"
//!     [cache]
//!     time_to_live = "90s"
//!     max_entries = 5000
//!     "#,
//! )?;
//! let cache = settings.cache.unwrap_or_default();
//! let builder = cache.apply(CacheLayer::builder(|id: &u64| Some(*id)));
//! # drop(builder);
//! # Ok::<(), tower_scale::settings::SettingsError>(())
//! ```

mod cache;
#[cfg(feature = "postgres")]
mod cluster;

use std::path::Path;

use serde::Deserialize;

pub use self::cache::CacheSettings;
#[cfg(feature = "http")]
pub use self::cache::HttpCacheSettings;
#[cfg(feature = "redis")]
pub use self::cache::RedisSettings;
#[cfg(feature = "postgres")]
pub use self::cluster::{ClusterSettings, NodeSettings};

/// Everything the library can be configured with; each part is optional.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Settings {
    /// The PostgreSQL cluster (feature `postgres`).
    #[cfg(feature = "postgres")]
    #[serde(default)]
    pub cluster: Option<ClusterSettings>,
    /// A read-through cache.
    #[serde(default)]
    pub cache: Option<CacheSettings>,
    /// The HTTP cache (feature `http`).
    #[cfg(feature = "http")]
    #[serde(default)]
    pub http_cache: Option<HttpCacheSettings>,
    /// The shared Redis tier (feature `redis`).
    #[cfg(feature = "redis")]
    #[serde(default)]
    pub redis: Option<RedisSettings>,
}

/// Settings that could not be read or do not make sense; the message names
/// the field and never holds a secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettingsError {
    /// The source could not be read or parsed, or a field has the wrong
    /// type or name.
    #[error("settings: {0}")]
    Load(String),
    /// A field's value is not valid.
    #[error("settings: `{field}`: {reason}")]
    Invalid {
        /// The field, with its path (`cluster.replicas[1]`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl SettingsError {
    #[cfg_attr(
        not(any(feature = "postgres", feature = "http", feature = "redis")),
        allow(dead_code)
    )]
    pub(crate) fn invalid(field: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Invalid {
            field: field.into(),
            reason: crate::redact::secrets(&reason.to_string()),
        }
    }
}

impl From<config::ConfigError> for SettingsError {
    fn from(e: config::ConfigError) -> Self {
        Self::Load(crate::redact::secrets(&e.to_string()))
    }
}

impl Settings {
    /// Settings from a TOML document.
    pub fn from_toml(text: &str) -> Result<Self, SettingsError> {
        Self::from_source(config::File::from_str(text, config::FileFormat::Toml))
    }

    /// Settings from a JSON document.
    pub fn from_json(text: &str) -> Result<Self, SettingsError> {
        Self::from_source(config::File::from_str(text, config::FileFormat::Json))
    }

    /// Settings from a `.toml` or `.json` file (by its extension).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, SettingsError> {
        let path = path.as_ref();
        let format = match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => config::FileFormat::Toml,
            Some("json") => config::FileFormat::Json,
            _ => {
                return Err(SettingsError::Load(format!(
                    "{}: expected a .toml or .json file",
                    path.display()
                )));
            }
        };
        Self::from_source(config::File::from(path).format(format))
    }

    /// Settings from environment variables named `{prefix}__{PART}__{FIELD}`
    /// (`TOWER_SCALE__CLUSTER__POOL_SIZE=8`); the replicas are one variable,
    /// their URLs separated by white space (a URL may hold commas: several
    /// hosts).
    pub fn from_env(prefix: &str) -> Result<Self, SettingsError> {
        // Values stay strings (`try_parsing` would turn an identity
        // `0042` into `42`); numbers and booleans are parsed per field.
        let env = config::Environment::with_prefix(prefix)
            .prefix_separator("__")
            .separator("__");
        Self::from_source(env)
    }

    fn from_source<S>(source: S) -> Result<Self, SettingsError>
    where
        S: config::Source + Send + Sync + 'static,
    {
        Ok(config::Config::builder()
            .add_source(source)
            .build()?
            .try_deserialize()?)
    }
}
