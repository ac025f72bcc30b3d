//! A node's pools: how they are built, and what they report.

use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, Runtime};
use tokio_postgres::Socket;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

use crate::error::ConfigError;

/// The timeouts and recycling every pool of a cluster is built with.
#[derive(Clone)]
pub(super) struct PoolTimeouts {
    pub(super) create: Duration,
    pub(super) recycle: Duration,
    pub(super) recycling: deadpool_postgres::RecyclingMethod,
}

impl PoolTimeouts {
    pub(super) fn build<T>(
        &self,
        pg: tokio_postgres::Config,
        tls: T,
        size: usize,
        wait: Duration,
    ) -> Result<Pool, ConfigError>
    where
        T: MakeTlsConnect<Socket> + Clone + Sync + Send + 'static,
        T::Stream: Sync + Send,
        T::TlsConnect: Sync + Send,
        <T::TlsConnect as TlsConnect<Socket>>::Future: Send,
    {
        let manager = Manager::from_config(
            pg,
            tls,
            ManagerConfig {
                recycling_method: self.recycling.clone(),
            },
        );
        Pool::builder(manager)
            .max_size(size)
            .wait_timeout(Some(wait))
            .create_timeout(Some(self.create))
            .recycle_timeout(Some(self.recycle))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| ConfigError::OutOfRange {
                field: "pool",
                reason: e.to_string(),
            })
    }
}

/// A node's pooled sessions, in [`NodeStatus`](super::NodeStatus) and the
/// `tower_scale_db_pool_connections{node,state}` gauges. The monitor's
/// probe session is one more, not counted here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct PoolStatus {
    /// The most sessions the pool opens to the node (`pool_size`).
    pub max: usize,
    /// Sessions open now.
    pub open: usize,
    /// Sessions checked out.
    pub in_use: usize,
    /// Sessions open and idle.
    pub idle: usize,
    /// Queries waiting for a session.
    pub waiting: usize,
}
