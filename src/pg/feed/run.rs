//! The consumer: one replication session at a time on the current
//! primary, set up, streamed, confirmed only after the caches and their
//! shared tier have the invalidations, and reconnected when it breaks or
//! the primary moves.

use std::sync::Arc;
use std::time::Duration;

use pgwire_replication::{ReplicationClient, ReplicationConfig};
use tokio_postgres::config::{Host, SslMode};
use tokio_util::sync::CancellationToken;

use super::apply::Committed;
use super::setup::{self, SlotState};
use super::sink::Sink;
use super::{
    ChangeFeedBuilder, FeedError, FeedState, FeedStatus, SlotKind, StatusCell, Tables, TagMap,
    initial_status,
};
use crate::pg::cluster::Cluster;

/// The prefix of the logical message that tells whoever reads the slot to
/// flush every cache: written into the WAL right after a new slot's
/// starting point, so a holder that dies before its flush reached every
/// instance leaves it to its successor (the slot is not confirmed past the
/// message until a holder applied and published it).
pub(super) const FLUSH_MESSAGE: &str = "tower-scale-feed:flush";

/// The longest pause between reconnects.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub(super) struct Metrics {
    pub(super) bytes_behind: metrics::Gauge,
    pub(super) holder: metrics::Gauge,
    pub(super) transactions: metrics::Counter,
    pub(super) rows: metrics::Counter,
    pub(super) flushes: metrics::Counter,
}

/// The feed's settings and state, shared by the handle and the task.
pub(crate) struct Shared {
    pub(super) cluster: Cluster,
    tables: Tables,
    publication: String,
    pub(super) slot: String,
    slot_kind: SlotKind,
    pub(super) sinks: Vec<Arc<dyn Sink>>,
    map: Option<Arc<TagMap>>,
    pub(super) row_limit: usize,
    pub(super) lease_poll: Duration,
    timeout: Duration,
    slot_create_timeout: Duration,
    pub(super) publish_timeout: Duration,
    stall_timeout: Duration,
    /// The stream failed in a way the slot cannot get past (its
    /// publication was dropped and made again): the next session makes a
    /// new slot (a slot loss).
    slot_broken: std::sync::atomic::AtomicBool,
    pub(super) status: StatusCell,
    pub(super) changed: tokio::sync::watch::Sender<()>,
    pub(super) stop: CancellationToken,
    /// A slot creation that failed may have made the slot on the server
    /// (its answer lost): the next session treats that slot as new.
    create_uncertain: std::sync::atomic::AtomicBool,
    pub(super) metrics: Metrics,
}

impl Shared {
    pub(super) fn new(b: ChangeFeedBuilder) -> Self {
        let slot = b.slot.clone();
        Self {
            metrics: Metrics {
                bytes_behind: metrics::gauge!("tower_scale_feed_bytes_behind", "slot" => slot.clone()),
                holder: metrics::gauge!("tower_scale_feed_holder", "slot" => slot.clone()),
                transactions: metrics::counter!("tower_scale_feed_transactions_total", "slot" => slot.clone()),
                rows: metrics::counter!("tower_scale_feed_rows_total", "slot" => slot.clone()),
                flushes: metrics::counter!("tower_scale_feed_flushes_total", "slot" => slot.clone()),
            },
            status: StatusCell::new(initial_status(&slot)),
            changed: tokio::sync::watch::Sender::new(()),
            stop: CancellationToken::new(),
            create_uncertain: std::sync::atomic::AtomicBool::new(false),
            cluster: b.cluster,
            tables: b.tables,
            publication: b.publication,
            slot: b.slot,
            slot_kind: b.slot_kind,
            sinks: b.sinks,
            map: b.map,
            row_limit: b.row_limit,
            lease_poll: b.lease_poll,
            timeout: b.timeout,
            slot_create_timeout: b.slot_create_timeout,
            publish_timeout: b.publish_timeout,
            stall_timeout: b.stall_timeout,
            slot_broken: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut FeedStatus)) {
        f(&mut crate::sync::lock(&self.status));
        self.changed.send_replace(());
    }

    pub(super) fn cancel_all(&self) {
        self.stop.cancel();
    }

    fn temporary(&self) -> bool {
        match self.slot_kind {
            SlotKind::Temporary => true,
            SlotKind::Permanent => false,
            // One slot for all only when every cache it feeds hears the
            // holder through a shared tier.
            SlotKind::Auto => {
                self.sinks.is_empty() || !self.sinks.iter().all(|s| s.has_shared_tier())
            }
        }
    }

    /// Invalidates everything in every cache (from `version` on, when
    /// given); counted as a flush unless it repeats one this session made.
    pub(super) fn flush(&self, version: Option<u64>, count: bool) {
        for sink in &self.sinks {
            sink.invalidate_all_at(version);
        }
        if count {
            self.metrics.flushes.increment(1);
            self.update(|s| s.flushes += 1);
        }
    }

    /// Invalidates one committed transaction's tags at `version`.
    pub(super) fn apply(&self, committed: &Committed, version: u64) {
        committed.for_each_change(|change| {
            let tags = match &self.map {
                Some(map) => map(change),
                None => vec![change.default_tag()],
            };
            for tag in tags {
                for sink in &self.sinks {
                    sink.invalidate_tag_at(tag.clone(), version);
                }
            }
        });
    }
}

/// The current primary: its index, name and connection settings.
fn primary(shared: &Shared) -> Result<(usize, String, tokio_postgres::Config), FeedError> {
    let inner = &shared.cluster.inner;
    let idx = inner.primary.load(std::sync::atomic::Ordering::Acquire);
    let node = inner.nodes.get(idx).ok_or(FeedError::NoPrimary)?;
    Ok((idx, node.name.to_string(), node.conn.clone()))
}

/// Waits up to `within` for the monitor to know a primary.
async fn wait_primary(
    shared: &Shared,
    within: Duration,
) -> Result<(usize, String, tokio_postgres::Config), FeedError> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let changed = shared.cluster.inner.changed.notified();
        if let Ok(found) = primary(shared) {
            return Ok(found);
        }
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            return Err(FeedError::NoPrimary);
        }
    }
}

/// The replication session's settings from the node's.
fn replication_config(
    conn: &tokio_postgres::Config,
    slot: &str,
    publication: &str,
    stall: Duration,
) -> Result<ReplicationConfig, FeedError> {
    if conn.get_ssl_mode() == SslMode::Require {
        return Err(FeedError::Tls);
    }
    let host = match conn.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
        None => conn
            .get_hostaddrs()
            .first()
            .map_or_else(|| "localhost".to_owned(), ToString::to_string),
    };
    let port = conn.get_ports().first().copied().unwrap_or(5432);
    let user = conn.get_user().unwrap_or("postgres").to_owned();
    let password = conn
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap_or_default();
    let db = conn
        .get_dbname()
        .map_or_else(|| user.clone(), ToOwned::to_owned);
    Ok(
        ReplicationConfig::new(host, user, password, db, slot, publication)
            .with_port(port)
            .with_status_interval(Duration::from_secs(1))
            // Needed for `feedback_pending_since` (a stop waits for it).
            .with_feedback_observer(pgwire_replication::FeedbackObserver::new(|_| {}))
            .with_wakeup_interval(Duration::from_secs(1))
            .with_application_name("tower-scale-feed")
            .with_options(format!(
                "-c wal_sender_timeout={} -c datestyle=ISO -c timezone=UTC \
                 -c bytea_output=hex -c extra_float_digits=3 -c intervalstyle=postgres \
                 -c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3",
                stall.as_millis()
            )),
    )
}

/// The replication settings of `cluster`'s current primary for a session
/// on `slot` and `publication` (a move's, see `shard::reshard`).
#[cfg(feature = "reshard")]
pub(crate) fn primary_replication_config(
    cluster: &Cluster,
    slot: &str,
    publication: &str,
    stall: Duration,
) -> Result<ReplicationConfig, FeedError> {
    let inner = &cluster.inner;
    let idx = inner.primary.load(std::sync::atomic::Ordering::Acquire);
    let node = inner.nodes.get(idx).ok_or(FeedError::NoPrimary)?;
    replication_config(&node.conn, slot, publication, stall)
}

/// Ends the replication session however the owner leaves.
struct Session(ReplicationClient);

impl Drop for Session {
    fn drop(&mut self) {
        self.0.stop();
        self.0.abort();
    }
}

async fn connect(
    shared: &Shared,
    conn: &tokio_postgres::Config,
    slot: &str,
) -> Result<Session, FeedError> {
    let cfg = replication_config(conn, slot, &shared.publication, shared.stall_timeout)?;
    let client = tokio::time::timeout(shared.timeout, ReplicationClient::connect_gated(cfg))
        .await
        .map_err(|_| FeedError::Timeout(shared.timeout))?
        .map_err(|e| FeedError::Server(e.to_string()))?;
    Ok(Session(client))
}

/// The checks a restart would not fix, and the publication, once.
pub(super) async fn preflight(shared: &Shared) -> Result<(), FeedError> {
    let (_, name, conn) = wait_primary(shared, shared.timeout).await?;
    let mut session = connect(shared, &conn, &shared.slot).await?;
    let client = &mut session.0;
    setup::check_server(client, shared.timeout).await?;
    publish(shared, client).await?;
    shared.update(|s| s.node = Some(name));
    Ok(())
}

/// Makes the publication list the tables that can be published; records
/// the ones left out.
async fn publish(shared: &Shared, client: &mut ReplicationClient) -> Result<(), FeedError> {
    let candidates = setup::candidates(client, &shared.tables, shared.timeout).await?;
    let published: Vec<_> = candidates.iter().filter(|c| c.left_out.is_none()).collect();
    setup::ensure_publication(client, &shared.publication, &published, shared.timeout).await?;
    let left_out: Vec<(String, String)> = candidates
        .iter()
        .filter_map(|c| {
            let why = c.left_out.clone()?;
            Some((super::tags::table_name(&c.schema, &c.name), why))
        })
        .collect();
    for (table, why) in &left_out {
        tracing::warn!(table, why, "change feed: table left out of the publication");
    }
    shared.update(|s| s.left_out = left_out);
    Ok(())
}

/// How a session ended without an error.
pub(super) enum Ended {
    Stopped,
    /// Another instance holds the lease.
    Standby,
    /// The primary moved (or stopped answering): reconnect at once.
    Moved,
    /// The shared tier kept failing: the lease is given up for a while.
    Yielded,
}

/// The feed task: sessions until stopped.
pub(super) async fn run(shared: Arc<Shared>) {
    let stop = shared.stop.clone();
    let mut identity = None;
    let mut backoff = Duration::from_millis(100);
    while !stop.is_cancelled() {
        let outcome = session(&shared, &mut identity).await;
        shared.metrics.holder.set(0.0);
        let pause = match outcome {
            Ok(Ended::Stopped) => break,
            Ok(Ended::Standby) => {
                backoff = Duration::from_millis(100);
                shared.update(|s| {
                    s.state = FeedState::Standby;
                    s.last_error = None;
                });
                shared.lease_poll
            }
            Ok(Ended::Moved) => {
                shared.update(|s| s.state = FeedState::Reconnecting);
                Duration::ZERO
            }
            Ok(Ended::Yielded) => {
                tracing::warn!(
                    "change feed: the shared tier does not publish; giving up the lease"
                );
                shared.update(|s| {
                    s.state = FeedState::Reconnecting;
                    s.last_error = Some("the shared tier did not publish the invalidations".into());
                });
                shared.lease_poll * 8
            }
            Err(e) => {
                if let FeedError::Server(m) = &e
                    && m.contains("publication")
                    && m.contains("does not exist")
                {
                    // Decoding stops at the WAL of a publication that was
                    // dropped (and made again): this slot cannot go on.
                    shared
                        .slot_broken
                        .store(true, std::sync::atomic::Ordering::Release);
                }
                tracing::warn!(error = %e, "change feed: reconnecting");
                shared.update(|s| {
                    s.state = FeedState::Reconnecting;
                    s.last_error = Some(e.to_string());
                });
                let pause = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                pause
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(pause) => {}
        }
    }
    shared.update(|s| s.state = FeedState::Stopped);
}

/// One replication session: lease, setup, slot, stream.
async fn session(
    shared: &Shared,
    last_identity: &mut Option<(String, u32)>,
) -> Result<Ended, FeedError> {
    let (idx, node, conn) = primary(shared)?;
    let temporary = shared.temporary();
    let slot = if temporary {
        format!(
            "{}_{:012x}",
            shared.slot,
            shared.cluster.inner.random() & 0xffff_ffff_ffff
        )
    } else {
        shared.slot.clone()
    };
    if !temporary && lease_held_elsewhere(shared, &slot).await {
        return Ok(Ended::Standby);
    }
    let mut session = connect(shared, &conn, &slot).await?;
    let client = &mut session.0;
    let t = shared.timeout;
    if !temporary {
        let lock = format!(
            "SELECT pg_catalog.pg_try_advisory_lock({})",
            setup::lease_key(&slot)
        );
        if setup::scalar(client, &lock, t).await?.as_deref() != Some("t") {
            return Ok(Ended::Standby);
        }
    }
    shared.update(|s| {
        s.state = FeedState::Starting;
        s.node = Some(node.clone());
        s.slot.clone_from(&slot);
    });
    let id = tokio::time::timeout(t, client.identify_system())
        .await
        .map_err(|_| FeedError::Timeout(t))?
        .map_err(|e| FeedError::Server(e.to_string()))?;
    let identity = (id.system_id, id.timeline);
    setup::check_server(client, t).await?;
    publish(shared, client).await?;
    let uncertain = &shared.create_uncertain;
    // Some(version): every cache is flushed first (from that position on).
    let lost: Option<Option<u64>> = if temporary {
        Some(Some(make_slot(shared, client, &slot, temporary).await?))
    } else {
        match setup::slot_state(client, &slot, t).await? {
            SlotState::Missing => Some(Some(make_slot(shared, client, &slot, temporary).await?)),
            SlotState::Usable
                if shared
                    .slot_broken
                    .swap(false, std::sync::atomic::Ordering::AcqRel) =>
            {
                setup::drop_slot(client, &slot, t).await?;
                Some(Some(make_slot(shared, client, &slot, temporary).await?))
            }
            SlotState::Lost => {
                setup::drop_slot(client, &slot, t).await?;
                Some(Some(make_slot(shared, client, &slot, temporary).await?))
            }
            // Made by a creation whose answer was lost, or by a process
            // that died before it wrote the flush: new all the same.
            SlotState::Usable
                if uncertain.load(std::sync::atomic::Ordering::Acquire)
                    || setup::is_pending(client, &shared.publication, &slot, t).await? =>
            {
                Some(None)
            }
            // The slot is there, but this process last read another
            // server's history (a promotion, a restored backup).
            SlotState::Usable => last_identity
                .as_ref()
                .filter(|last| **last != identity)
                .map(|_| None),
        }
    };
    *last_identity = Some(identity);
    if let Some(version) = lost {
        tracing::warn!(
            slot,
            "change feed: the stream cannot resume; flushing every cache"
        );
        if !temporary {
            // Durable: whoever reads the slot next flushes too, until one
            // holder applied and published it.
            setup::query(
                client,
                &format!(
                    "SELECT pg_catalog.pg_logical_emit_message(false, {}, {})",
                    setup::literal(FLUSH_MESSAGE),
                    setup::literal(&slot)
                ),
                t,
            )
            .await?;
            // Committing the clear also makes the message durable (the WAL
            // is flushed up to the commit).
            setup::mark_pending(client, &shared.publication, &slot, false, t).await?;
        }
        uncertain.store(false, std::sync::atomic::Ordering::Release);
        shared.flush(version, true);
    }
    client
        .start()
        .await
        .map_err(|e| FeedError::Server(e.to_string()))?;
    tokio::time::timeout(t, client.wait_started())
        .await
        .map_err(|_| FeedError::Timeout(t))?
        .map_err(|e| FeedError::Server(e.to_string()))?;
    shared.metrics.holder.set(1.0);
    shared.update(|s| {
        s.state = FeedState::Streaming;
        s.takeovers += 1;
        s.last_error = None;
    });
    super::stream::stream(shared, client, idx, lost.is_some()).await
}

/// Whether another session holds the lease, asked through the cluster's
/// own pool (so instances on standby do not open a replication session,
/// which would take one of the primary's `max_wal_senders`, every poll).
/// False when it cannot tell: the lease itself decides then.
async fn lease_held_elsewhere(shared: &Shared, slot: &str) -> bool {
    let key = u64::from_ne_bytes(setup::lease_key(slot).to_ne_bytes());
    let (high, low) = (key >> 32, key & 0xffff_ffff);
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' \
         AND classid = {high}::int8::oid AND objid = {low}::int8::oid AND objsubid = 1 AND granted \
         AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = current_database()))"
    );
    let db = shared.cluster.db();
    match db.read_one(crate::pg::Consistency::Strong, &sql, &[]).await {
        Ok(row) => row.value.try_get::<_, bool>(0).unwrap_or(false),
        Err(_) => false,
    }
}

/// Creates the slot; until its flush was written, the slot counts as new
/// even if the answer is lost.
async fn make_slot(
    shared: &Shared,
    client: &mut ReplicationClient,
    slot: &str,
    temporary: bool,
) -> Result<u64, FeedError> {
    shared
        .create_uncertain
        .store(true, std::sync::atomic::Ordering::Release);
    if !temporary {
        setup::mark_pending(client, &shared.publication, slot, true, shared.timeout).await?;
    }
    setup::create_slot(client, slot, temporary, shared.slot_create_timeout).await
}

/// Drops the permanent slot (retrying while the stopping session still
/// holds it: it lets go once its last position reached the server).
pub(super) async fn drop_slot(shared: &Shared) -> Result<(), FeedError> {
    let (_, _, conn) = wait_primary(shared, shared.timeout).await?;
    let deadline = tokio::time::Instant::now() + shared.timeout + super::stream::FINAL_FEEDBACK;
    loop {
        let mut session = connect(shared, &conn, &shared.slot).await?;
        let client = &mut session.0;
        let result = match setup::slot_state(client, &shared.slot, shared.timeout).await? {
            SlotState::Missing => return Ok(()),
            _ => setup::drop_slot(client, &shared.slot, shared.timeout).await,
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
