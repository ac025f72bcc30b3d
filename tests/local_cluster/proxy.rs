//! The fault proxy, mode by mode, against tiny loopback servers and a real
//! `redis-server`. Every wait has a deadline; the only fixed sleeps are the
//! windows in which something must NOT happen.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout};
use tower_scale::testing::{FaultMode, FaultProxy, LocalRedis};

/// The most any expected event may take.
const DEADLINE: Duration = Duration::from_secs(3);
/// How long something must not happen to count as not happening.
const WINDOW: Duration = Duration::from_millis(200);

/// Polls `cond` until it holds, failing the test after [`DEADLINE`].
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// An echo server on loopback; counts the connections it accepted.
async fn echo_server() -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

async fn connect(proxy: &FaultProxy) -> TcpStream {
    let stream = timeout(DEADLINE, TcpStream::connect(proxy.addr()))
        .await
        .expect("connect in time")
        .expect("connect");
    stream.set_nodelay(true).unwrap();
    stream
}

async fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    timeout(DEADLINE, stream.read_exact(&mut buf))
        .await
        .expect("bytes in time")
        .expect("read");
    buf
}

async fn echo(stream: &mut TcpStream, msg: &[u8]) {
    stream.write_all(msg).await.unwrap();
    assert_eq!(read_n(stream, msg.len()).await, msg);
}

/// Nothing arrives on `stream` for [`WINDOW`], and it is not closed either.
async fn silent(stream: &mut TcpStream, what: &str) {
    let mut buf = [0; 64];
    if let Ok(read) = timeout(WINDOW, stream.read(&mut buf)).await {
        panic!("{what}: expected no bytes and no close for {WINDOW:?}, got {read:?}");
    }
}

/// The next read on `stream` reports a reset, within [`DEADLINE`].
async fn sees_reset(stream: &mut TcpStream, what: &str) {
    let mut buf = [0; 64];
    let read = timeout(DEADLINE, stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: no reset within {DEADLINE:?}"));
    match read {
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("{what}: expected a reset, got {other:?}"),
    }
}

/// The next read on `stream` reports a close (FIN or RST), within [`DEADLINE`].
async fn sees_close(stream: &mut TcpStream, what: &str) {
    let mut buf = [0; 64];
    let read = timeout(DEADLINE, stream.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{what}: not closed within {DEADLINE:?}"));
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "{what}: expected a close, got {read:?}"
    );
}

/// A proxy in front of a bare listener, so the test holds both ends of each
/// proxied connection.
async fn proxy_to_listener() -> (FaultProxy, TcpListener) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = FaultProxy::start(listener.local_addr().unwrap())
        .await
        .unwrap();
    (proxy, listener)
}

async fn accept(listener: &TcpListener) -> TcpStream {
    let (stream, _) = timeout(DEADLINE, listener.accept())
        .await
        .expect("the proxy connects upstream in time")
        .unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_both_ways_counts_and_passes_half_close() {
    let (upstream, upstream_accepted) = echo_server().await;
    let proxy = FaultProxy::start(upstream).await.unwrap();
    assert_eq!(proxy.upstream(), upstream);
    assert_eq!(proxy.addr().port(), proxy.port());
    assert!(proxy.addr().ip().is_loopback());
    assert_eq!(proxy.mode(), FaultMode::Forward);

    let mut client = connect(&proxy).await;
    echo(&mut client, b"hello").await;
    echo(&mut client, &vec![7u8; 100_000]).await;
    until("byte counters", || {
        let s = proxy.stats();
        s.bytes_to_upstream == 100_005 && s.bytes_to_client == 100_005
    })
    .await;
    let stats = proxy.stats();
    assert_eq!((stats.accepted, stats.live, stats.dropped), (1, 1, 0));
    assert_eq!(upstream_accepted.load(Ordering::SeqCst), 1);

    // Our FIN reaches the echo server, whose FIN comes back as a clean EOF.
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    timeout(DEADLINE, client.read_to_end(&mut rest))
        .await
        .expect("EOF in time")
        .expect("a clean EOF, not a reset");
    assert!(rest.is_empty());
    until("the connection task to end", || proxy.stats().live == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_delays_each_chunk_and_jitter_never_reorders() {
    let (upstream, _) = echo_server().await;
    let proxy = FaultProxy::start_seeded(upstream, 42).await.unwrap();
    let mut client = connect(&proxy).await;
    echo(&mut client, b"warm").await;

    let latency = Duration::from_millis(100);
    let jitter = Duration::from_millis(20);
    proxy.set_latency(latency, jitter);
    let started = Instant::now();
    echo(&mut client, b"ping").await;
    let slow = started.elapsed();
    // One way each: at least 2 × (latency - jitter) for the round trip.
    assert!(slow >= Duration::from_millis(160), "round trip {slow:?}");

    // 100 small chunks 1 ms apart, each with its own draw in ±20 ms: without
    // the in-order rule, later chunks would overtake earlier ones.
    let sent: Vec<u8> = (0u32..100).flat_map(|i| i.to_be_bytes()).collect();
    let (mut read, mut write) = client.into_split();
    let writer = {
        let sent = sent.clone();
        tokio::spawn(async move {
            for chunk in sent.chunks(4) {
                write.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            write
        })
    };
    let mut got = vec![0; sent.len()];
    timeout(DEADLINE, read.read_exact(&mut got))
        .await
        .expect("all chunks in time")
        .unwrap();
    assert_eq!(got, sent, "chunks came back out of order");
    let mut client = read.reunite(writer.await.unwrap()).unwrap();

    proxy.set_latency(Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    echo(&mut client, b"fast").await;
    let fast = started.elapsed();
    assert!(
        fast < Duration::from_millis(160),
        "no latency, yet {fast:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_new_resets_new_connections_and_spares_live_ones() {
    let (upstream, upstream_accepted) = echo_server().await;
    let proxy = FaultProxy::start(upstream).await.unwrap();
    let mut live = connect(&proxy).await;
    echo(&mut live, b"before").await;

    proxy.drop_new();
    assert_eq!(proxy.mode(), FaultMode::DropNew);
    // The RST may already be there when the connect completes.
    match timeout(DEADLINE, TcpStream::connect(proxy.addr()))
        .await
        .expect("connect or reset in time")
    {
        Ok(mut refused) => sees_reset(&mut refused, "a new connection under drop_new").await,
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}"),
    }
    until("the drop to be counted", || proxy.stats().dropped == 1).await;
    echo(&mut live, b"during").await;
    assert_eq!(upstream_accepted.load(Ordering::SeqCst), 1);

    proxy.restore();
    let mut again = connect(&proxy).await;
    echo(&mut again, b"after").await;
    let stats = proxy.stats();
    assert_eq!((stats.accepted, stats.dropped, stats.live), (3, 1, 2));
    assert_eq!(upstream_accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_closes_every_live_connection_with_an_rst() {
    let (proxy, listener) = proxy_to_listener().await;
    let mut a = connect(&proxy).await;
    let mut a_server = accept(&listener).await;
    let mut b = connect(&proxy).await;
    let _b_server = accept(&listener).await;
    a.write_all(b"x").await.unwrap();
    assert_eq!(read_n(&mut a_server, 1).await, b"x");

    proxy.reset();
    sees_reset(&mut a, "client a").await;
    sees_reset(&mut b, "client b").await;
    sees_reset(&mut a_server, "the upstream side of a").await;
    until("both connections to end", || proxy.stats().live == 0).await;
    assert_eq!(proxy.stats().reset, 2);

    // One-shot: the mode is unchanged and new connections forward.
    assert_eq!(proxy.mode(), FaultMode::Forward);
    let mut c = connect(&proxy).await;
    let mut c_server = accept(&listener).await;
    c.write_all(b"y").await.unwrap();
    assert_eq!(read_n(&mut c_server, 1).await, b"y");
    c_server.write_all(b"z").await.unwrap();
    assert_eq!(read_n(&mut c, 1).await, b"z");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_holds_bytes_both_ways_and_restore_resumes_them() {
    let (proxy, listener) = proxy_to_listener().await;
    let mut client = connect(&proxy).await;
    let mut server = accept(&listener).await;
    client.write_all(b"a").await.unwrap();
    assert_eq!(read_n(&mut server, 1).await, b"a");
    until("the first byte to be counted", || {
        proxy.stats().bytes_to_upstream == 1
    })
    .await;

    proxy.black_hole();
    assert_eq!(proxy.mode(), FaultMode::BlackHole);
    client.write_all(b"up").await.unwrap();
    server.write_all(b"down").await.unwrap();
    // A new connection is accepted but not connected upstream.
    let mut late = connect(&proxy).await;
    late.write_all(b"late").await.unwrap();
    let no_accept = async {
        assert!(
            timeout(WINDOW, listener.accept()).await.is_err(),
            "a black-holed connection reached the upstream"
        );
    };
    tokio::join!(
        silent(&mut client, "client"),
        silent(&mut server, "server"),
        silent(&mut late, "new connection"),
        no_accept,
    );
    let stats = proxy.stats();
    assert_eq!((stats.bytes_to_upstream, stats.bytes_to_client), (1, 0));
    assert_eq!((stats.accepted, stats.live), (2, 2));

    // Restore: held bytes are delivered, the held new connection connects.
    proxy.restore();
    assert_eq!(read_n(&mut server, 2).await, b"up");
    assert_eq!(read_n(&mut client, 4).await, b"down");
    let mut late_server = accept(&listener).await;
    assert_eq!(read_n(&mut late_server, 4).await, b"late");
    late_server.write_all(b"ok").await.unwrap();
    assert_eq!(read_n(&mut late, 2).await, b"ok");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_stops_the_listener_and_every_connection() {
    let (proxy, listener) = proxy_to_listener().await;
    let addr = proxy.addr();
    let mut client = connect(&proxy).await;
    let mut server = accept(&listener).await;

    // A clone shares the proxy; dropping it stops nothing.
    let clone = proxy.clone();
    clone.black_hole();
    assert_eq!(proxy.mode(), FaultMode::BlackHole);
    drop(clone);
    let mut held = connect(&proxy).await;
    proxy.restore();
    let _held_server = accept(&listener).await;
    client.write_all(b"still").await.unwrap();
    assert_eq!(read_n(&mut server, 5).await, b"still");

    proxy.black_hole();
    let mut never_connected = connect(&proxy).await;
    drop(proxy);
    sees_close(&mut client, "a forwarding client").await;
    sees_close(&mut server, "the upstream side").await;
    sees_close(&mut held, "a resumed client").await;
    sees_close(&mut never_connected, "a black-holed new client").await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => break,
            other => assert!(
                Instant::now() < deadline,
                "the listener is still open: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends an inline `PING` and waits up to `wait` for `+PONG`.
async fn ping(stream: &mut TcpStream, wait: Duration) -> Result<(), String> {
    stream
        .write_all(b"PING\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0; 7];
    match timeout(wait, stream.read_exact(&mut buf)).await {
        Err(_) => Err("timed out".into()),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(_)) if &buf == b"+PONG\r\n" => Ok(()),
        Ok(Ok(_)) => Err(format!("odd answer {buf:?}")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_redis_through_the_proxy() {
    let redis = LocalRedis::start().expect("redis");
    let proxy = FaultProxy::start(SocketAddr::from(([127, 0, 0, 1], redis.port())))
        .await
        .unwrap();
    let client_timeout = Duration::from_millis(300);

    let mut first = connect(&proxy).await;
    ping(&mut first, DEADLINE)
        .await
        .expect("PING through the proxy");

    proxy.black_hole();
    let mut during = connect(&proxy).await;
    let (old, new) = tokio::join!(
        ping(&mut first, client_timeout),
        ping(&mut during, client_timeout)
    );
    assert_eq!(old, Err("timed out".into()), "live connection");
    assert_eq!(new, Err("timed out".into()), "new connection");

    proxy.restore();
    let mut fresh = connect(&proxy).await;
    ping(&mut fresh, DEADLINE)
        .await
        .expect("a new connection after restore");
    // The held PING of the first connection is answered late (resume).
    assert_eq!(read_n(&mut first, 7).await, b"+PONG\r\n");

    proxy.reset();
    sees_reset(&mut fresh, "a redis client after reset").await;
    let after = ping(&mut first, DEADLINE).await;
    assert!(after.is_err(), "PING on a reset connection: {after:?}");
}
