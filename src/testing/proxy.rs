//! A fault-injecting TCP proxy for the test ground; see [`FaultProxy`].

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::LocalError;
use super::process::io_err;

/// How long a connection to the upstream may take before the client
/// connection is reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The most bytes one read takes (one chunk).
const CHUNK: usize = 16 * 1024;
/// Chunks read but not yet written, per direction, before reading pauses.
const IN_FLIGHT: usize = 64;

/// What the proxy does with connections, apart from latency.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultMode {
    /// Forward everything (with the configured latency).
    Forward,
    /// Accept new connections and reset them at once; live ones forward.
    DropNew,
    /// New connections are accepted but never connected upstream; live ones
    /// stop forwarding in both directions and are kept open.
    BlackHole,
}

/// Counters of a [`FaultProxy`], for tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProxyStats {
    /// Connections accepted from clients (including dropped ones).
    pub accepted: u64,
    /// Connections reset at accept because of [`FaultProxy::drop_new`].
    pub dropped: u64,
    /// Connections reset by [`FaultProxy::reset`].
    pub reset: u64,
    /// Client connections open now (forwarding, held, or connecting).
    pub live: u64,
    /// Bytes written to the upstream (delivered, not merely read).
    pub bytes_to_upstream: u64,
    /// Bytes written back to clients (delivered, not merely read).
    pub bytes_to_client: u64,
}

#[derive(Clone, Copy, Debug)]
struct Faults {
    mode: FaultMode,
    latency: Duration,
    jitter: Duration,
}

#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    dropped: AtomicU64,
    reset: AtomicU64,
    live: AtomicU64,
    to_upstream: AtomicU64,
    to_client: AtomicU64,
}

/// What the listener and the connection tasks share. It holds no handle of
/// the proxy, so dropping the last [`FaultProxy`] clone ends them.
struct State {
    upstream: SocketAddr,
    seed: u64,
    faults: watch::Sender<Faults>,
    /// Cancelled when the last handle is dropped; parent of `generation`.
    root: CancellationToken,
    /// The token of connections accepted since the last `reset`.
    generation: Mutex<CancellationToken>,
    counters: Counters,
}

impl State {
    fn generation(&self) -> std::sync::MutexGuard<'_, CancellationToken> {
        crate::sync::lock(&self.generation)
    }
}

struct Handle {
    addr: SocketAddr,
    state: Arc<State>,
    _stop: DropGuard,
}

/// A fault-injecting TCP proxy on 127.0.0.1 in front of one upstream.
///
/// It listens on a free 127.0.0.1 port and forwards every
/// connection it accepts to one upstream address (a [`LocalRedis`], a
/// [`LocalCluster`] node, any TCP server). Tests point one group of clients
/// at [`FaultProxy::addr`] instead of the server and change the network under
/// them at runtime:
///
/// | call | new connections | live connections |
/// |---|---|---|
/// | [`set_latency`](FaultProxy::set_latency) | delayed | each chunk, each direction, delayed by `latency ± jitter`, in order |
/// | [`drop_new`](FaultProxy::drop_new) | accepted, then reset at once (RST) | untouched |
/// | [`black_hole`](FaultProxy::black_hole) | accepted, never connected upstream, never answered | stop forwarding both ways; bytes are held, nothing is closed |
/// | [`reset`](FaultProxy::reset) | untouched (one-shot) | closed now with RST on both sides |
/// | [`restore`](FaultProxy::restore) | forwarded | held connections resume: held bytes are delivered in order |
///
/// A [`LocalCluster`] node is fronted the same way: start the proxy on
/// `SocketAddr::from(([127, 0, 0, 1], node.port()))` and connect with
/// `node.config().port(proxy.port())`.
///
/// One proxy fronts one client group, so a partition of one group is one
/// black-holed proxy: "Redis partitioned from instance B only" is instance B
/// connecting through its own proxy while instance A connects directly (or
/// through another proxy).
///
/// The proxy is a cheap [`Clone`] handle; when the last clone is dropped the
/// listener closes (new connects are refused) and every connection task ends,
/// resetting its sockets.
///
/// ```no_run
/// use std::net::SocketAddr;
/// use std::time::Duration;
/// use tower_scale::testing::{FaultProxy, LocalRedis};
///
/// # async fn demo() -> Result<(), tower_scale::testing::LocalError> {
/// let redis = LocalRedis::start()?;
/// // Instance B reaches Redis only through this proxy; instance A directly.
/// let to_b = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port()))).await?;
/// let b_url = format!("redis://127.0.0.1:{}", to_b.port());
///
/// to_b.set_latency(Duration::from_millis(20), Duration::from_millis(5));
/// to_b.black_hole(); // B is partitioned from Redis; A is not
/// // ... B's requests time out, A's succeed ...
/// to_b.restore(); // held connections resume; new ones are forwarded
/// to_b.reset(); // or: every live connection of B sees a reset
/// println!("{} {:?}", b_url, to_b.stats());
/// # Ok(())
/// # }
/// ```
///
/// [`LocalRedis`]: crate::testing::LocalRedis
/// [`LocalCluster`]: crate::testing::LocalCluster
#[derive(Clone)]
pub struct FaultProxy {
    handle: Arc<Handle>,
}

impl fmt::Debug for FaultProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultProxy")
            .field("addr", &self.handle.addr)
            .field("upstream", &self.handle.state.upstream)
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

impl FaultProxy {
    /// Starts forwarding a free 127.0.0.1 port to `upstream`, with jitter
    /// seed 0. Call it inside a tokio runtime: the listener and connection
    /// tasks are spawned on it.
    ///
    /// Each accepted connection gets its own connection to `upstream`, made
    /// when it is accepted (or when a black hole ends). If the upstream
    /// refuses it or does not answer within 5 s, the client connection is
    /// reset. When either side resets or fails, the other side is reset too;
    /// a FIN is passed on as a FIN (half-close works). Every wait inside the
    /// proxy ends on [`reset`](Self::reset) or when the proxy is dropped.
    pub async fn start(upstream: SocketAddr) -> Result<Self, LocalError> {
        Self::start_seeded(upstream, 0).await
    }

    /// Like [`start`](Self::start), with the seed of the jitter. Each
    /// connection and direction draws its delays from its own generator
    /// seeded by `seed`, the connection's accept number and the direction,
    /// so a run with the same traffic sees the same delays.
    pub async fn start_seeded(upstream: SocketAddr, seed: u64) -> Result<Self, LocalError> {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .map_err(|e| io_err("binding the fault proxy to 127.0.0.1:0", e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| io_err("reading the fault proxy's address", e))?;
        let root = CancellationToken::new();
        let (faults, _) = watch::channel(Faults {
            mode: FaultMode::Forward,
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
        });
        let state = Arc::new(State {
            upstream,
            seed,
            faults,
            generation: Mutex::new(root.child_token()),
            root: root.clone(),
            counters: Counters::default(),
        });
        tokio::spawn(accept_loop(listener, Arc::clone(&state)));
        Ok(Self {
            handle: Arc::new(Handle {
                addr,
                state,
                _stop: root.drop_guard(),
            }),
        })
    }

    /// The address clients connect to (127.0.0.1 and [`port`](Self::port)).
    pub fn addr(&self) -> SocketAddr {
        self.handle.addr
    }

    /// The port clients connect to on 127.0.0.1, e.g. for
    /// `redis://127.0.0.1:{port}` or `host=127.0.0.1 port={port}`.
    pub fn port(&self) -> u16 {
        self.handle.addr.port()
    }

    /// The address connections are forwarded to.
    pub fn upstream(&self) -> SocketAddr {
        self.handle.state.upstream
    }

    /// The current mode.
    pub fn mode(&self) -> FaultMode {
        self.handle.state.faults.borrow().mode
    }

    /// Delays every chunk read from either side by `latency` plus a uniform
    /// draw in `[-jitter, +jitter]` (never below zero) before writing it to
    /// the other side. Chunks never overtake each other: a chunk is written
    /// no earlier than the one before it. The delay is one way, so a request
    /// and its answer take `2 × latency` more. Applies to chunks read from
    /// now on, on live and new connections; `(ZERO, ZERO)` turns it off.
    /// Latency is kept across [`restore`](Self::restore).
    pub fn set_latency(&self, latency: Duration, jitter: Duration) {
        self.handle.state.faults.send_modify(|f| {
            f.latency = latency;
            f.jitter = jitter;
        });
    }

    /// New connections are accepted and reset at once (closed with
    /// `SO_LINGER` 0): the client's connect completes, then it sees
    /// `ECONNRESET` on its first read or write, or already from the connect
    /// when the RST wins the race. Live connections keep forwarding. Ends a
    /// black hole: held connections resume.
    pub fn drop_new(&self) {
        self.set_mode(FaultMode::DropNew);
    }

    /// A partition: new connections are accepted (the kernel completes the
    /// handshake) but not connected upstream and never answered; live
    /// connections stop reading and writing in both directions. Bytes
    /// already read are held by the proxy, the rest wait in the kernel
    /// buffers; no FIN or RST is sent to either side. Clients see
    /// timeouts, never a close.
    pub fn black_hole(&self) {
        self.set_mode(FaultMode::BlackHole);
    }

    /// Back to forwarding (latency stays as set). Connections held by a
    /// black hole **resume**: held bytes are delivered in order, and
    /// connections accepted during the black hole are connected upstream
    /// now, with what their clients sent. To close them instead, call
    /// [`reset`](Self::reset) before `restore`.
    pub fn restore(&self) {
        self.set_mode(FaultMode::Forward);
    }

    /// Closes every live connection now, including held ones, with an RST
    /// (`SO_LINGER` 0) on both the client and the upstream socket; held bytes
    /// are discarded. One-shot: the mode is unchanged, and connections
    /// accepted afterwards are handled by it as usual.
    pub fn reset(&self) {
        let state = &self.handle.state;
        let mut generation = state.generation();
        generation.cancel();
        *generation = state.root.child_token();
    }

    /// The counters now.
    pub fn stats(&self) -> ProxyStats {
        let c = &self.handle.state.counters;
        ProxyStats {
            accepted: c.accepted.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            reset: c.reset.load(Ordering::Relaxed),
            live: c.live.load(Ordering::Relaxed),
            bytes_to_upstream: c.to_upstream.load(Ordering::Relaxed),
            bytes_to_client: c.to_client.load(Ordering::Relaxed),
        }
    }

    fn set_mode(&self, mode: FaultMode) {
        self.handle.state.faults.send_modify(|f| f.mode = mode);
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    let mut number: u64 = 0;
    loop {
        let accepted = tokio::select! {
            () = state.root.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(error) => {
                // Out of descriptors or a connection gone before accept:
                // back off a little instead of spinning.
                tracing::debug!(%error, "fault proxy: accept failed");
                tokio::select! {
                    () = state.root.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_millis(10)) => continue,
                }
            }
        };
        state.counters.accepted.fetch_add(1, Ordering::Relaxed);
        number += 1;
        if state.faults.borrow().mode == FaultMode::DropNew {
            state.counters.dropped.fetch_add(1, Ordering::Relaxed);
            abort(&client);
            continue;
        }
        let token = state.generation().clone();
        let live = Live::new(&state);
        tokio::spawn(connection(Arc::clone(&state), client, token, number, live));
    }
}

/// Makes the coming drop of `stream` send an RST instead of a FIN.
fn abort(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

/// Counts a connection in `live` until dropped, however its task ends (also
/// when the runtime drops the task, even before it first ran).
struct Live(Arc<State>);

impl Live {
    fn new(state: &Arc<State>) -> Self {
        state.counters.live.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(state))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.counters.live.fetch_sub(1, Ordering::Relaxed);
    }
}

enum End {
    /// Both directions finished (FIN both ways) or one side failed.
    Done(io::Result<()>),
    /// `reset` was called (or the proxy dropped).
    Cancelled,
}

async fn connection(
    state: Arc<State>,
    mut client: TcpStream,
    token: CancellationToken,
    n: u64,
    _live: Live,
) {
    let mut faults = state.faults.subscribe();
    // Held here while black-holed: accepted, never connected upstream.
    let upstream = tokio::select! {
        () = token.cancelled() => None,
        upstream = async {
            faults.wait_for(|f| f.mode != FaultMode::BlackHole).await.ok()?;
            tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(state.upstream))
                .await
                .ok()?
                .ok()
        } => upstream,
    };
    let Some(mut upstream) = upstream else {
        if token.is_cancelled() && !state.root.is_cancelled() {
            state.counters.reset.fetch_add(1, Ordering::Relaxed);
        }
        abort(&client);
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let end = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let seed = state.seed ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let to_upstream = pump(
            client_read,
            upstream_write,
            state.faults.subscribe(),
            Jitter::new(seed),
            &state.counters.to_upstream,
        );
        let to_client = pump(
            upstream_read,
            client_write,
            state.faults.subscribe(),
            Jitter::new(!seed),
            &state.counters.to_client,
        );
        tokio::select! {
            () = token.cancelled() => End::Cancelled,
            done = async { tokio::try_join!(to_upstream, to_client).map(|_| ()) } => End::Done(done),
        }
    };
    match end {
        End::Done(Ok(())) => {}
        End::Done(Err(error)) => {
            tracing::debug!(%error, "fault proxy: connection failed; resetting both sides");
            abort(&client);
            abort(&upstream);
        }
        End::Cancelled => {
            if !state.root.is_cancelled() {
                state.counters.reset.fetch_add(1, Ordering::Relaxed);
            }
            abort(&client);
            abort(&upstream);
        }
    }
}

/// Copies `from` to `to` chunk by chunk, each chunk written after its delay,
/// nothing read or written while black-holed. Ends with a FIN to `to` after
/// `from` ends.
async fn pump<R, W>(
    mut from: R,
    mut to: W,
    faults: watch::Receiver<Faults>,
    mut jitter: Jitter,
    delivered: &AtomicU64,
) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let (chunks, mut queue) = mpsc::channel::<(Instant, Vec<u8>)>(IN_FLIGHT);
    let mut read_faults = faults.clone();
    let mut write_faults = faults;
    let read = async move {
        let mut last_due = Instant::now();
        loop {
            forwarding(&mut read_faults).await?;
            let mut chunk = Vec::with_capacity(CHUNK);
            if from.read_buf(&mut chunk).await? == 0 {
                // Dropping `chunks` lets the writer drain and send the FIN.
                return Ok::<(), io::Error>(());
            }
            let f = *read_faults.borrow();
            let due = (Instant::now() + jitter.delay(f.latency, f.jitter)).max(last_due);
            last_due = due;
            if chunks.send((due, chunk)).await.is_err() {
                return Ok(());
            }
        }
    };
    let write = async move {
        while let Some((due, chunk)) = queue.recv().await {
            tokio::time::sleep_until(due).await;
            forwarding(&mut write_faults).await?;
            to.write_all(&chunk).await?;
            delivered.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
        to.shutdown().await
    };
    tokio::try_join!(read, write).map(|_| ())
}

/// Waits while the proxy is black-holed.
async fn forwarding(faults: &mut watch::Receiver<Faults>) -> io::Result<()> {
    faults
        .wait_for(|f| f.mode != FaultMode::BlackHole)
        .await
        .map(|_| ())
        .map_err(|_| io::Error::other("the fault proxy is gone"))
}

/// A small seeded generator (SplitMix64) for the jitter.
struct Jitter(u64);

impl Jitter {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// `latency` plus a uniform draw in `[-jitter, +jitter]`, at least zero.
    fn delay(&mut self, latency: Duration, jitter: Duration) -> Duration {
        if jitter.is_zero() {
            return latency;
        }
        let span = u64::try_from(jitter.as_nanos()).unwrap_or(u64::MAX / 2);
        let draw = self.next() % (2 * span + 1);
        if draw >= span {
            latency.saturating_add(Duration::from_nanos(draw - span))
        } else {
            latency.saturating_sub(Duration::from_nanos(span - draw))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_in_its_band_varies_and_repeats_with_the_seed() {
        let latency = Duration::from_millis(50);
        let jitter = Duration::from_millis(10);
        let draws = |seed| {
            let mut j = Jitter::new(seed);
            (0..1000)
                .map(|_| j.delay(latency, jitter))
                .collect::<Vec<_>>()
        };
        let a = draws(7);
        assert!(
            a.iter()
                .all(|d| *d >= Duration::from_millis(40) && *d <= Duration::from_millis(60))
        );
        assert!(a.iter().any(|d| *d < Duration::from_millis(45)));
        assert!(a.iter().any(|d| *d > Duration::from_millis(55)));
        assert_eq!(a, draws(7));
        assert_ne!(a, draws(8));
        let mut j = Jitter::new(1);
        assert_eq!(j.delay(latency, Duration::ZERO), latency);
        // Below zero is clamped, not wrapped.
        let small: Vec<_> = (0..1000)
            .map(|_| j.delay(Duration::from_millis(1), Duration::from_millis(5)))
            .collect();
        assert!(small.iter().all(|d| *d <= Duration::from_millis(6)));
        assert!(small.contains(&Duration::ZERO));
    }
}
