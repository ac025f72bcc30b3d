//! A caching reverse proxy, CDN node and load balancer: the HTTP cache
//! layer in front of [`tower_scale::balance::Balancer`] (tower's p2c over
//! peak-EWMA load) across one or more origins, sharing its cache with a
//! fleet through Redis.
//!
//! ```text
//! cargo run --release --features full --example http_proxy -- \
//!     --listen 127.0.0.1:8010 \
//!     --upstream http://127.0.0.1:8000 --upstream http://127.0.0.1:8001
//! ```
//!
//! Every method, path, query, header and body is forwarded (hop-by-hop
//! headers removed both ways); responses the origin allows are stored and
//! hits are served from the cache, per RFC 9111.
//!
//! ## Upstreams
//!
//! - `--upstream http://HOST:PORT`, repeated for each origin; or
//!   `--upstreams-file PATH`: one `http://HOST:PORT` a line, blank lines
//!   and `#` comments ignored. Both may be given: the `--upstream` ones
//!   are always in the set, the file's join them. At least one upstream in
//!   all is required; a file that cannot be read or holds a bad address
//!   stops the start with status 2.
//! - `SIGHUP` (with `--upstreams-file`) reloads the file: added upstreams
//!   start taking requests (ramped up over 10 s), removed ones take no new
//!   request and finish those in flight, the others keep their health and
//!   counters. A file that cannot be read, is not a regular file, is over
//!   1 MiB, is empty (0 bytes: caught mid-write; a list of none needs a
//!   comment line), holds a bad address or leaves no upstream at all is
//!   refused: the current list stays, and the error goes to stderr (as
//!   does what a reload changed). Replace the file by renaming a complete
//!   one over it.
//! - The origin gets the client's address appended to `X-Forwarded-For`.
//! - Misses are spread over the upstreams in rotation (p2c over
//!   peak-EWMA), on keep-alive connections kept per upstream. An upstream
//!   that refuses, resets, or gets no response head within
//!   `--upstream-timeout SECS` (default 30) is ejected, for 1 s doubled
//!   at each further failure in a row up to 30 s, then re-admitted by one
//!   probe request and a 10 s slow start. `--health-path PATH` adds an
//!   active check: `GET PATH` on every upstream every `--health-interval
//!   SECS` (default 2), anything but a 2xx or 3xx ejecting it.
//! - A request that could not connect is sent once to another upstream;
//!   one reset before its response head too, if its method is idempotent.
//!   Never one whose body was (even partly) sent.
//!
//! An upstream that cannot be reached (refused, reset, closed before a
//! response, no response head in time, or every upstream out of rotation)
//! gives a 502 marked [`UpstreamUnreachable`](tower_scale::http::UpstreamUnreachable):
//! the cache then serves a stale stored response if the origin's
//! directives allow it (a 504 if they forbid it; RFC 9111 §4.2.4), else
//! the client gets the 502. The timeout bounds the connection and the
//! response head; a body that streams after the head is not bounded by it.
//! An unreadable response is an unmarked 502.
//!
//! ## A fleet of nodes
//!
//! - `--redis redis://HOST:PORT` shares the cache with every proxy on the
//!   same Redis (and `--redis-prefix`, default `http_proxy`): a miss here
//!   reads what another node stored (`Cache-Status: NAME; hit; detail=l2`),
//!   fills are written there, and invalidations and purges reach every
//!   node. Redis down never fails a request: the node serves from its own
//!   store and the origin, and stops trusting its own store when it has
//!   not heard the fleet for `--isolation-ttl-ms` (default 1000), so a
//!   purge made elsewhere is honoured after at most that long.
//! - `--purge-token TOKEN` (or `--purge-token-file PATH`, which keeps it
//!   out of the process list) serves the purge API on the same listener
//!   at exactly `POST /_purge` (`{"tags": [...]}`, `{"urls": [...]}` or
//!   `{"all": true}`, `Authorization: Bearer TOKEN`; see
//!   `HttpCacheLayer::purge_router`). Without it, that path goes to the
//!   origin like any other; other methods on it always do.
//! - `--metrics-listen IP:PORT` serves Prometheus text at `GET /metrics` on
//!   a listener of its own (never on the proxied one, where the path is
//!   the origin's). Of the counters, labelled `cache="NAME"` (`--name`,
//!   default `tower-scale`, also the `Cache-Status` name):
//!   L1 hits `tower_scale_cache_hits_total`, L2 hits
//!   `tower_scale_cache_l2_hits_total`, purges received (this node's
//!   route) `tower_scale_cache_purges_total`, purges applied here (each
//!   tag or URL, this node's own and the fleet's)
//!   `tower_scale_cache_invalidations_total`, of which from other nodes
//!   `tower_scale_cache_remote_invalidations_total`; the Redis tier's
//!   `tower_scale_cache_l2_*` are labelled `prefix`. The balancer's, per
//!   upstream (label `upstream="http://HOST:PORT"`):
//!   `tower_scale_upstream_requests_total`,
//!   `tower_scale_upstream_failures_total` (label `kind`),
//!   `tower_scale_upstream_retries_total`,
//!   `tower_scale_upstream_ejections_total`, `tower_scale_upstream_load`
//!   and `tower_scale_upstream_healthy` (see the README's metrics table).
//!
//! ## Deadlines
//!
//! A client must send its whole request head within `--header-timeout
//! SECS` (default 30; the first bytes too, before HTTP/1 or HTTP/2 is
//! known), else its connection is closed, on the proxied and the metrics
//! listeners alike; HTTP/2 connections are pinged every 20 s and closed
//! when a ping goes unanswered for 20 s. The purge route reads its body for
//! at most 10 s (`408`). A failed accept (out of file descriptors) pauses
//! that listener for 50 ms.
//!
//! When ready it prints `listening on http://IP:PORT` as the first line on
//! stdout (then `metrics on http://IP:PORT` with `--metrics-listen`); logs
//! go to stderr. Bad flags (a flag given twice among them) print usage to
//! stderr and exit with status 2; a listener that cannot be bound, or a
//! metrics recorder or `SIGHUP` handler that cannot be installed, exits
//! with status 1.

mod node;
mod serve;
mod upstreams;

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use hyper::Uri;
use tower::ServiceBuilder;
use tower_scale::balance::{Balancer, Upstreams};
use tower_scale::http::HttpCacheLayer;

const USAGE: &str = "usage: http_proxy --listen IP:PORT \
     (--upstream http://HOST:PORT ... | --upstreams-file PATH) \
     [--health-path PATH] [--health-interval SECS] [--max-bytes N] [--max-body N] [--upstream-timeout SECS] [--name NAME] \
     [--redis redis://HOST:PORT] [--redis-prefix PREFIX] [--isolation-ttl-ms MS] \
     [--purge-token TOKEN | --purge-token-file PATH] [--metrics-listen IP:PORT] \
     [--header-timeout SECS]";

struct Args {
    listen: SocketAddr,
    /// `--upstream`, each given.
    upstreams: Vec<Uri>,
    upstreams_file: Option<std::path::PathBuf>,
    health_path: Option<String>,
    health_interval: Option<Duration>,
    max_bytes: u64,
    max_body: usize,
    upstream_timeout: Duration,
    name: String,
    redis: Option<String>,
    redis_prefix: String,
    isolation_ttl: Option<Duration>,
    purge_token: Option<String>,
    metrics_listen: Option<SocketAddr>,
    header_timeout: Duration,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut listen, mut upstreams, mut upstreams_file) = (None, Vec::new(), None);
    let (mut health_path, mut health_interval) = (None, None);
    let (mut max_bytes, mut max_body) = (256u64 << 20, 1usize << 20);
    let mut upstream_timeout = Duration::from_secs(30);
    let mut name = "tower-scale".to_string();
    let (mut redis, mut redis_prefix, mut isolation_ttl) = (None, "http_proxy".to_string(), None);
    let (mut purge_token, mut metrics_listen) = (None, None);
    let mut header_timeout = Duration::from_secs(30);
    let mut seen = std::collections::HashSet::new();
    while let Some(flag) = args.next() {
        // Each setting once: a second one would silently win (a second
        // `--redis` would split the fleet, a second token widen access).
        let setting = match flag.as_str() {
            "--purge-token-file" => "--purge-token",
            other => other,
        };
        // `--upstream` is repeated, once for each origin.
        if setting.starts_with("--") && setting != "--upstream" && !seen.insert(setting.to_string())
        {
            return Err(if setting == "--purge-token" {
                "--purge-token / --purge-token-file given more than once".into()
            } else {
                format!("{flag} given more than once")
            });
        }
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => listen = Some(addr(&flag, value()?)?),
            "--upstream" => upstreams.push(upstreams::parse_url(&value()?)?),
            "--upstreams-file" => upstreams_file = Some(value()?.into()),
            "--health-path" => health_path = Some(value()?),
            "--health-interval" => health_interval = Some(secs(&flag, value()?)?),
            "--max-bytes" => {
                max_bytes = value()?.parse().map_err(|e| format!("--max-bytes: {e}"))?
            }
            "--max-body" => max_body = value()?.parse().map_err(|e| format!("--max-body: {e}"))?,
            "--upstream-timeout" => upstream_timeout = secs(&flag, value()?)?,
            "--name" => name = value()?,
            "--redis" => {
                let url = value()?;
                if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                    return Err("--redis must be redis://HOST:PORT".into());
                }
                redis = Some(url);
            }
            "--redis-prefix" => redis_prefix = value()?,
            "--isolation-ttl-ms" => {
                let ms: u64 = value()?
                    .parse()
                    .map_err(|e| format!("--isolation-ttl-ms: {e}"))?;
                isolation_ttl = Some(Duration::from_millis(ms));
            }
            "--purge-token" => purge_token = Some(value()?),
            "--purge-token-file" => {
                let path = value()?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| format!("--purge-token-file {path}: {e}"))?;
                purge_token = Some(text.trim().to_string());
            }
            "--metrics-listen" => metrics_listen = Some(addr(&flag, value()?)?),
            "--header-timeout" => header_timeout = secs(&flag, value()?)?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown flag {other:?}")),
        }
    }
    if purge_token.as_ref().is_some_and(|t| t.is_empty()) {
        return Err("the purge token must not be empty".into());
    }
    if isolation_ttl.is_some() && redis.is_none() {
        return Err("--isolation-ttl-ms needs --redis".into());
    }
    if health_interval.is_some() && health_path.is_none() {
        return Err("--health-interval needs --health-path".into());
    }
    let listen = listen.ok_or("--listen is required")?;
    if upstreams.is_empty() && upstreams_file.is_none() {
        return Err("--upstream or --upstreams-file is required".into());
    }
    Ok(Args {
        listen,
        upstreams,
        upstreams_file,
        health_path,
        health_interval,
        max_bytes,
        max_body,
        upstream_timeout,
        name,
        redis,
        redis_prefix,
        isolation_ttl,
        purge_token,
        metrics_listen,
        header_timeout,
    })
}

fn addr(flag: &str, value: String) -> Result<SocketAddr, String> {
    value.parse().map_err(|e| format!("{flag}: {e}"))
}

/// A whole number of seconds, at least one.
fn secs(flag: &str, value: String) -> Result<Duration, String> {
    match value.parse::<u64>() {
        Ok(0) => Err(format!("{flag} must be at least 1 second")),
        Ok(secs) => Ok(Duration::from_secs(secs)),
        Err(e) => Err(format!("{flag}: {e}")),
    }
}

/// Bad flags or settings: usage on stderr, status 2.
fn usage_error(message: impl std::fmt::Display) -> ! {
    eprintln!("http_proxy: {message}\n{USAGE}");
    std::process::exit(2);
}

async fn bind(addr: SocketAddr) -> tokio::net::TcpListener {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("http_proxy: cannot listen on {addr}: {e}");
            std::process::exit(1);
        }
    }
}

#[tokio::main]
async fn main() {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(message) if message.is_empty() => {
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
        Err(message) => usage_error(message),
    };
    if args.purge_token.as_ref().is_some_and(|t| t.len() < 16) {
        eprintln!("http_proxy: warning: a purge token under 16 bytes is easy to guess");
    }
    // Before the cache is built: it registers its metrics when it starts.
    let prometheus = args
        .metrics_listen
        .map(|_| metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder());
    let prometheus = match prometheus.transpose() {
        Ok(p) => p,
        // Not a bad flag: the process cannot run as asked.
        Err(e) => {
            eprintln!("http_proxy: cannot install the metrics recorder: {e}");
            std::process::exit(1);
        }
    };
    let layer = match HttpCacheLayer::builder()
        .max_bytes(args.max_bytes)
        .max_body(args.max_body)
        .name(args.name.clone())
        .build()
    {
        Ok(layer) => layer,
        Err(e) => usage_error(e),
    };
    let tier = match &args.redis {
        None => None,
        Some(url) => {
            let mut builder =
                tower_scale::cache::redis::builder(url.clone()).prefix(args.redis_prefix.clone());
            if let Some(ttl) = args.isolation_ttl {
                builder = builder.isolation_ttl(ttl);
            }
            // Never fails because Redis is down: it keeps trying.
            match builder.attach(&layer, layer.redis_codec()).await {
                Ok(tier) => Some(tier),
                Err(e) => usage_error(e),
            }
        }
    };
    // After the recorder: each upstream registers its metrics when added.
    let list = upstreams::List::new(args.upstreams, args.upstreams_file);
    let set = Upstreams::new();
    if let Err(e) = list.apply(&set) {
        usage_error(e);
    }
    let mut balancer = Balancer::builder()
        .upstream_timeout(args.upstream_timeout)
        .health_path(args.health_path);
    if let Some(interval) = args.health_interval {
        balancer = balancer.health_interval(interval);
    }
    let balancer: Balancer = match balancer.build(&set) {
        Ok(balancer) => balancer,
        Err(e) => usage_error(e),
    };
    // Before the readiness line: a SIGHUP sent once it is out must reload,
    // not end the process (its default).
    if list.has_file() {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(hangups) => {
                tokio::spawn(upstreams::reload_on_hangup(hangups, list, set));
            }
            Err(e) => {
                eprintln!("http_proxy: cannot handle SIGHUP: {e}");
                std::process::exit(1);
            }
        }
    }
    let purge = args.purge_token.map(|token| layer.purge_router(token));
    let service = node::Node::new(
        ServiceBuilder::new().layer(layer.clone()).service(balancer),
        purge,
    );
    let listener = bind(args.listen).await;
    let metrics = match (args.metrics_listen, prometheus) {
        (Some(at), Some(handle)) => Some((bind(at).await, handle)),
        _ => None,
    };
    let addr = listener.local_addr().unwrap_or(args.listen);
    println!("listening on http://{addr}");
    if let Some((metrics_listener, handle)) = metrics {
        let at = metrics_listener.local_addr().unwrap_or(addr);
        println!("metrics on http://{at}");
        let app = node::metrics_router(handle, tier.clone());
        let timeout = args.header_timeout;
        tokio::spawn(async move { serve::serve(metrics_listener, app, timeout, "metrics").await });
    }
    let _ = std::io::stdout().flush();
    tokio::select! {
        () = serve::serve(listener, service, args.header_timeout, "proxy") => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
