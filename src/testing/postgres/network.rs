//! The network of a [`LocalCluster`](super::LocalCluster): fault proxies in
//! front of its nodes, per client group and on each replica's replication
//! connection, running on a thread of their own.

use std::net::SocketAddr;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::oneshot;

use super::Node;
use crate::testing::proxy::FaultProxy;
use crate::testing::{LocalError, process::io_err};

/// How long starting one proxy may take.
const PROXY_START: Duration = Duration::from_secs(10);

/// A current-thread runtime on its own thread, where the cluster's proxies
/// run: they outlive the runtime of the test that started the cluster (a
/// shared cluster serves several), and starting them needs no runtime.
#[derive(Debug)]
pub(super) struct ProxyRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ProxyRuntime {
    pub(super) fn start() -> Result<Self, LocalError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| io_err("building the proxies' runtime", e))?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("local-cluster-proxies".into())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| io_err("spawning the proxies' thread", e))?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// A proxy in front of `port` on 127.0.0.1. Blocking (briefly).
    pub(super) fn proxy(&self, port: u16) -> Result<FaultProxy, LocalError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.handle.spawn(async move {
            let _ = tx.send(FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], port))).await);
        });
        rx.recv_timeout(PROXY_START).map_err(|_| {
            LocalError::Timeout(format!("a fault proxy to port {port} did not start"))
        })?
    }
}

impl Drop for ProxyRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One group of clients (an application instance, a data center) and its
/// own [`FaultProxy`] in front of every node of a
/// [`LocalCluster`](super::LocalCluster): latency or a partition set on one
/// group's proxy touches that group only.
///
/// Made by [`LocalClusterBuilder::client_groups`](super::LocalClusterBuilder::client_groups);
/// the proxies are indexed like [`LocalCluster::nodes`](super::LocalCluster::nodes):
/// 0 is the primary, `1 + i` is replica `i`.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_scale::testing::LocalCluster;
///
/// let local = LocalCluster::builder().replicas(2).client_groups(1).start()?;
/// let app = local.client_group(0);
/// // Replica 1 (node 2) is 20 ms away from this group, each way.
/// app.proxy(2).set_latency(Duration::from_millis(20), Duration::ZERO);
/// let client = app.config(2); // connect through the proxy
/// # let _ = client;
/// app.proxy(0).black_hole(); // the group loses the primary
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct ClientGroup {
    /// One per node, in node order.
    proxies: Vec<FaultProxy>,
}

impl ClientGroup {
    pub(super) fn new(runtime: &ProxyRuntime, nodes: &[Node]) -> Result<Self, LocalError> {
        let mut proxies = Vec::with_capacity(nodes.len());
        for node in nodes {
            proxies.push(runtime.proxy(node.port())?);
        }
        Ok(Self { proxies })
    }

    /// The proxy in front of node `index` (0 the primary, `1 + i` replica `i`).
    ///
    /// # Panics
    /// If there is no such node (a bug in the test).
    pub fn proxy(&self, index: usize) -> &FaultProxy {
        self.proxies.get(index).unwrap_or_else(|| {
            panic!(
                "no node {index}: the cluster has {} nodes",
                self.proxies.len()
            )
        })
    }

    /// Every proxy, in node order.
    pub fn proxies(&self) -> &[FaultProxy] {
        &self.proxies
    }

    /// How this group reaches node `index`: its configuration with the
    /// proxy's port.
    ///
    /// # Panics
    /// If there is no such node (a bug in the test).
    pub fn config(&self, index: usize) -> tokio_postgres::Config {
        super::node::config_on(self.proxy(index).port())
    }
}
