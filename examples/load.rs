//! The load report: the `axum_users` service against a bare axum router,
//! in one process, under the same load generator.
//!
//! ```text
//! cargo run --release --features full --example load -- [--connections N] [--seconds S]
//! ```
//!
//! It starts a LocalCluster (a primary and two streaming replicas, as
//! separate PostgreSQL processes on free loopback ports), seeds the
//! `users` table, then serves two apps from one Tokio runtime whose single
//! worker (and blocking threads) are pinned to core 0, with the same
//! `axum::serve` settings (`TCP_NODELAY`): the `axum_users` service as
//! the example serves it (`users_app::service` in
//! `examples/common/users_app.rs`, with its metrics recorder installed)
//! and a bare axum `Router` whose `GET /users/{id}` returns the static
//! body a cached read of a hot user returns. The generator (keep-alive
//! HTTP/1.1 connections written and parsed by hand, wrk-style,
//! `examples/common/load_client.rs`, which says why not hyper's client)
//! runs on a current-thread runtime pinned to core 1. The PostgreSQL
//! processes are not pinned: the scheduler puts them where it can, so
//! under the database scenarios they share both cores with the two sides.
//!
//! Scenarios (S seconds each, default 3; the ceiling and the cached GET
//! are measured in six alternating stretches each, so that drift on a
//! shared machine hits both alike; each stretch follows 200 ms of warm-up
//! on the same connections):
//! - `ceiling`: the bare router;
//! - `cached GET`: `GET /users/{id}` over 64 hot ids, all in the users cache;
//! - `uncached GET`: every request a new id, read from a replica;
//! - `PUT`: `PUT /users/{id}` on the primary;
//! - `mixed 90/10 + tokens`: each connection a client keeping its token
//!   cookie, nine hot reads to one write.
//!
//! For each it prints requests/s, p50, p99, the ratio to the ceiling, the
//! CPU each side used and how busy it was (share of one core: server
//! threads, generator thread; a side 100% busy never waited for the
//! other, so the side that is and the one that is not show where the
//! limit was), the PostgreSQL processes' CPU, the server's CPU per request
//! and its ratio to the ceiling's (the figure least moved by other load
//! on the machine), and who served the answers; and writes
//! `target/load/report.svg`. Any request that fails (a wrong status, an
//! uncached read the cache answered, a timeout of 2 s, a transport error)
//! is counted and makes the example exit with status 1. Ctrl-C stops the
//! run; every server it started is stopped on the way out, on a panic too.

#[path = "common/load_chart.rs"]
mod load_chart;
#[path = "common/load_client.rs"]
mod load_client;
#[path = "common/load_cpu.rs"]
mod load_cpu;
#[path = "common/users.rs"]
mod users;
#[path = "common/users_app.rs"]
mod users_app;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use load_client::{HOT_IDS, Plan, Scenario, Tally, UNCACHED_FIRST};
use load_cpu::{Cpu, Probe, pin};
use tower_scale::testing::LocalCluster;

/// Users seeded before the run: the uncached GET reads each once.
const SEEDED: i64 = 150_000;
/// Load before each measured stretch, not counted.
const WARM_UP: Duration = Duration::from_millis(200);
/// The ceiling and the cached GET alternate in this many stretches each,
/// so that what else runs on the machine weighs on both alike.
const ROUNDS: u32 = 6;

struct Options {
    connections: usize,
    seconds: f64,
}

fn options() -> Options {
    let usage = "usage: load [--connections N] [--seconds S]";
    let mut o = Options {
        connections: 128,
        seconds: 3.0,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next();
        let parsed = match (flag.as_str(), value.as_deref()) {
            ("--connections", Some(v)) => v
                .parse()
                .ok()
                .filter(|n| (1..=1024).contains(n))
                .map(|n| o.connections = n),
            ("--seconds", Some(v)) => v
                .parse()
                .ok()
                .filter(|s: &f64| (0.2..=600.0).contains(s))
                .map(|s| o.seconds = s),
            _ => None,
        };
        if parsed.is_none() {
            eprintln!("load: bad flag {flag:?} (connections 1..=1024, seconds 0.2..=600)\n{usage}");
            std::process::exit(2);
        }
    }
    o
}

/// One scenario's result.
struct Outcome {
    scenario: Scenario,
    tally: Tally,
    wall: Duration,
    cpu: Cpu,
}

impl Outcome {
    fn rps(&self) -> f64 {
        self.tally.latencies_us.len() as f64 / self.wall.as_secs_f64()
    }
    fn percentile_ms(&self, p: f64) -> f64 {
        let l = &self.tally.latencies_us;
        if l.is_empty() {
            return 0.0;
        }
        let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
        f64::from(l[i]) / 1000.0
    }
    fn share(&self, ns: u64) -> f64 {
        ns as f64 / self.wall.as_nanos() as f64 * 100.0
    }
    /// CPU microseconds per answered request.
    fn per_request_us(&self, ns: u64) -> f64 {
        let n = self.tally.latencies_us.len().max(1) as f64;
        ns as f64 / n / 1000.0
    }
}

/// Drives `scenario` against `addr` with `connections` connections on the
/// generator runtime: `warm_up`, then `length` measured. The connections
/// stay open from one to the other, so the measured stretch has neither
/// connection set-up nor the tail of the last answers in it; the CPU
/// probes are read at its start and end.
#[allow(clippy::too_many_arguments)]
fn drive(
    client: &tokio::runtime::Runtime,
    scenario: Scenario,
    addr: SocketAddr,
    connections: usize,
    warm_up: Duration,
    length: Duration,
    next_uncached: &AtomicI64,
    stop: &Arc<AtomicBool>,
    postmasters: &Arc<[u32]>,
) -> (Tally, Cpu, Duration) {
    let measure_from = Instant::now() + warm_up;
    let plan = Arc::new(Plan {
        scenario,
        addr,
        measure_from,
        deadline: measure_from + length,
        next_uncached: AtomicI64::new(next_uncached.load(Ordering::Relaxed)),
        last_seeded: SEEDED,
        stop: Arc::clone(stop),
    });
    let (tally, cpu, wall) = client.block_on(async {
        let postmasters = Arc::clone(postmasters);
        let deadline = plan.deadline;
        let probe = tokio::spawn(async move {
            tokio::time::sleep_until(measure_from.into()).await;
            let probe = Probe::start(&postmasters);
            let started = Instant::now();
            tokio::time::sleep_until(deadline.into()).await;
            let cpu = probe.stop();
            (cpu, started.elapsed())
        });
        let tasks: Vec<_> = (0..connections)
            .map(|i| tokio::spawn(load_client::connection(Arc::clone(&plan), i)))
            .collect();
        let mut all = Tally::default();
        for t in tasks {
            match t.await {
                Ok(t) => all.merge(t),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => {
                    all.errors += 1;
                    all.last_error = Some(e.to_string());
                }
            }
        }
        let (cpu, wall) = match probe.await {
            Ok(measured) => measured,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => (Cpu::default(), length),
        };
        (all, cpu, wall)
    });
    next_uncached.store(
        plan.next_uncached.load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
    (tally, cpu, wall)
}

/// Measures `scenario` for `length` (after a warm-up) and adds the result
/// to `into` (the ceiling and the cached GET are measured in stretches).
#[allow(clippy::too_many_arguments)]
fn measure(
    client: &tokio::runtime::Runtime,
    scenario: Scenario,
    addr: SocketAddr,
    o: &Options,
    length: Duration,
    next_uncached: &AtomicI64,
    stop: &Arc<AtomicBool>,
    postmasters: &Arc<[u32]>,
    into: &mut Option<Outcome>,
) {
    let (tally, cpu, wall) = drive(
        client,
        scenario,
        addr,
        o.connections,
        WARM_UP,
        length,
        next_uncached,
        stop,
        postmasters,
    );
    match into {
        Some(out) => {
            out.tally.merge(tally);
            out.wall += wall;
            out.cpu.server += cpu.server;
            out.cpu.client += cpu.client;
            out.cpu.server_wait += cpu.server_wait;
            out.cpu.client_wait += cpu.client_wait;
            out.cpu.postgres += cpu.postgres;
        }
        None => {
            *into = Some(Outcome {
                scenario,
                tally,
                wall,
                cpu,
            })
        }
    }
}

/// The body a cached read of the first hot user answers with.
fn static_body() -> &'static str {
    static BODY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BODY.get_or_init(|| {
        let id = HOT_IDS.start;
        serde_json::json!({ "id": id, "name": load_client::name_of(id) }).to_string()
    })
}

async fn serve<S>(
    app: S,
    stop: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)>
where
    S: tower::Service<
            axum::extract::Request,
            Response = axum::response::Response,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = users_app::serve_until(listener, app, async move {
        let mut stop = stop;
        let _ = stop.wait_for(|s| *s).await;
    });
    let task = tokio::spawn(async move {
        if let Err(e) = server.await {
            eprintln!("load: server: {e}");
        }
    });
    Ok((addr, task))
}

/// Seeds [`SEEDED`] users named [`load_client::name_of`] their id and
/// waits until every replica has them.
async fn seed(backend: &users::Backend, local: &LocalCluster) -> Result<(), users::BoxError> {
    backend
        .db
        .execute(
            "INSERT INTO users (id, name) SELECT g, 'user ' || lpad(g::text, 6, '0') \
             FROM generate_series(1, $1::bigint) g",
            &[&SEEDED],
        )
        .await?;
    backend
        .db
        .execute("SELECT setval('users_id_seq', $1::bigint)", &[&SEEDED])
        .await?;
    for replica in local.replicas() {
        let (client, conn) = replica.config().connect(tokio_postgres::NoTls).await?;
        let conn = tokio::spawn(conn);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let row = client
                .query_one("SELECT count(*) FROM users WHERE id = $1", &[&SEEDED])
                .await?;
            if row.get::<_, i64>(0) == 1 {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("replica {} did not catch up in 30 s", replica.name()).into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(client);
        let _ = conn.await;
    }
    Ok(())
}

fn main() {
    let o = options();
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("load: fewer than 2 cores: server and generator will share one");
    }
    let server = match server_runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("load: could not start the server runtime: {e}");
            std::process::exit(1);
        }
    };
    // Ctrl-C, from now on, stops the run; the way out stops the servers
    // (a Ctrl-C while the cluster starts is seen once it has).
    let stop = Arc::new(AtomicBool::new(false));
    let interrupted = Arc::clone(&stop);
    server.spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("load: interrupted, stopping");
            interrupted.store(true, Ordering::Relaxed);
        }
    });
    // Started from the unpinned main thread, so the PostgreSQL processes
    // do not inherit a pinned affinity.
    let local = match LocalCluster::start(2) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("load: could not start the LocalCluster: {e}");
            std::process::exit(1);
        }
    };
    let code = match run(&o, &local, server, stop) {
        Ok(true) => 0,
        Ok(false) => 1,
        Err(e) => {
            eprintln!("load: {e}");
            1
        }
    };
    // `local` stops its servers when dropped, here or while a panic unwinds.
    drop(local);
    std::process::exit(code);
}

/// The server side: a multi-thread runtime with one worker; it and its
/// blocking threads are named `load-server` and pinned to core 0.
fn server_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .thread_name("load-server")
        .on_thread_start(|| pin(0))
        .build()
}

/// Runs every scenario; `Ok(false)` if any request failed.
fn run(
    o: &Options,
    local: &LocalCluster,
    server: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
) -> Result<bool, users::BoxError> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let args = users::Args::in_process(local);
    let (backend, users_addr, ceiling_addr, servers) = server.block_on(async {
        let metrics = users::install_metrics()?;
        let backend = users::backend(&args).await?;
        seed(&backend, local).await?;
        let app = users_app::service(&backend, metrics);
        let ceiling = Router::new().route(
            "/users/{id}",
            get(|| async { ([(CONTENT_TYPE, "application/json")], static_body()) }),
        );
        let (users_addr, a) = serve(app, stop_rx.clone()).await?;
        let (ceiling_addr, b) = serve(ceiling, stop_rx.clone()).await?;
        Ok::<_, users::BoxError>((backend, users_addr, ceiling_addr, [a, b]))
    })?;
    let postmasters: Arc<[u32]> = local.nodes().iter().filter_map(|n| n.pid()).collect();
    let report = std::thread::Builder::new()
        .name("load-client".into())
        .spawn({
            let stop = Arc::clone(&stop);
            let connections = o.connections;
            let seconds = o.seconds;
            move || -> Result<Vec<Outcome>, String> {
                pin(1);
                let client = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let o = Options {
                    connections,
                    seconds,
                };
                let next = AtomicI64::new(UNCACHED_FIRST);
                let full = Duration::from_secs_f64(o.seconds);
                let stretch = full / ROUNDS;
                let (mut ceiling, mut cached) = (None, None);
                for _ in 0..ROUNDS {
                    measure(
                        &client,
                        Scenario::Ceiling,
                        ceiling_addr,
                        &o,
                        stretch,
                        &next,
                        &stop,
                        &postmasters,
                        &mut ceiling,
                    );
                    measure(
                        &client,
                        Scenario::CachedGet,
                        users_addr,
                        &o,
                        stretch,
                        &next,
                        &stop,
                        &postmasters,
                        &mut cached,
                    );
                }
                let mut out: Vec<Outcome> = [ceiling, cached].into_iter().flatten().collect();
                for s in [Scenario::UncachedGet, Scenario::Put, Scenario::Mixed] {
                    let mut one = None;
                    measure(
                        &client,
                        s,
                        users_addr,
                        &o,
                        full,
                        &next,
                        &stop,
                        &postmasters,
                        &mut one,
                    );
                    out.extend(one);
                }
                Ok(out)
            }
        })?
        .join();
    // Stop the servers before anything else, whatever happened.
    let _ = stop_tx.send(true);
    server.block_on(async {
        for s in servers {
            if tokio::time::timeout(Duration::from_secs(5), s)
                .await
                .is_err()
            {
                eprintln!("load: a server did not stop within 5 s");
            }
        }
    });
    backend.cluster.shutdown();
    drop(backend);
    server.shutdown_timeout(Duration::from_secs(5));
    let mut outcomes = match report {
        Ok(r) => r?,
        Err(panic) => std::panic::resume_unwind(panic),
    };
    for out in &mut outcomes {
        out.tally.latencies_us.sort_unstable();
    }
    let interrupted = stop.load(Ordering::Relaxed);
    print_table(o, &outcomes);
    let chart = chart_path();
    match write_chart(&chart, o, &outcomes) {
        Ok(()) => println!("chart: {}", chart.display()),
        Err(e) => eprintln!("load: could not write {}: {e}", chart.display()),
    }
    let failed: Vec<&Outcome> = outcomes
        .iter()
        .filter(|out| out.tally.failures() > 0 || out.tally.exhausted)
        .collect();
    for out in &failed {
        let t = &out.tally;
        eprintln!(
            "load: {} failed: {} wrong answers {:?} (status 0: the cache answered an uncached read), {} timeouts, {} errors{}{}",
            out.scenario.name(),
            t.wrong_status.iter().map(|(_, n)| n).sum::<u64>(),
            t.wrong_status,
            t.timeouts,
            t.errors,
            t.last_error
                .as_ref()
                .map_or(String::new(), |e| format!(" (last: {e})")),
            if t.exhausted {
                "; ran out of seeded ids (use fewer --seconds)"
            } else {
                ""
            },
        );
    }
    if interrupted {
        eprintln!("load: interrupted: the figures are partial");
    }
    Ok(failed.is_empty() && !interrupted)
}

fn print_table(o: &Options, outcomes: &[Outcome]) {
    let ceiling = outcomes
        .iter()
        .find(|out| out.scenario == Scenario::Ceiling);
    let ceiling_rps = ceiling.map_or(0.0, Outcome::rps);
    let ceiling_cost = ceiling.map_or(0.0, |out| out.per_request_us(out.cpu.server));
    println!(
        "\n{} connections, {} s per scenario; server on core 0, generator on core 1",
        o.connections, o.seconds
    );
    println!(
        "{:<21} {:>10} {:>7} {:>7} {:>6} | {:>10} {:>10} {:>8} | {:>10} {:>9} | {:>5}",
        "scenario",
        "requests/s",
        "p50 ms",
        "p99 ms",
        "ratio",
        "server",
        "client",
        "postgres",
        "server/req",
        "cpu ratio",
        "fails"
    );
    for out in outcomes {
        let cost = out.per_request_us(out.cpu.server);
        let server = format!(
            "{:.0}%/{:.0}%",
            out.share(out.cpu.server),
            out.share(out.cpu.server + out.cpu.server_wait)
        );
        let client = format!(
            "{:.0}%/{:.0}%",
            out.share(out.cpu.client),
            out.share(out.cpu.client + out.cpu.client_wait)
        );
        println!(
            "{:<21} {:>10.0} {:>7.3} {:>7.3} {:>5.2}x | {:>10} {:>10} {:>7.0}% | {:>8.2}us {:>8.2}x | {:>5}",
            out.scenario.name(),
            out.rps(),
            out.percentile_ms(0.50),
            out.percentile_ms(0.99),
            if ceiling_rps > 0.0 {
                out.rps() / ceiling_rps
            } else {
                0.0
            },
            server,
            client,
            out.share(out.cpu.postgres),
            cost,
            if cost > 0.0 { ceiling_cost / cost } else { 0.0 },
            out.tally.failures(),
        );
    }
    println!(
        "ratio: requests/s over the ceiling's. server, client: CPU used / busy (on the core or \
         waiting for it: 100% busy means that side never waited for the other), in % of one core; \
         server is this process's server threads, client the generator thread. postgres: the \
         cluster's processes' CPU. server/req: server CPU per request. cpu ratio: the ceiling's \
         server CPU per request over this scenario's."
    );
    println!("served by (x-served-by):");
    for out in outcomes
        .iter()
        .filter(|out| out.scenario != Scenario::Ceiling)
    {
        let mut by: Vec<String> = out
            .tally
            .served_by
            .iter()
            .map(|(b, n)| format!("{} {n}", String::from_utf8_lossy(b)))
            .collect();
        by.sort();
        println!("  {:<20} {}", out.scenario.name(), by.join(", "));
    }
}

/// `target/load/report.svg` in this crate.
fn chart_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/load/report.svg")
}

fn write_chart(
    path: &std::path::Path,
    o: &Options,
    outcomes: &[Outcome],
) -> Result<(), Box<dyn std::error::Error>> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let ceiling = outcomes
        .iter()
        .find(|out| out.scenario == Scenario::Ceiling)
        .map_or(0.0, Outcome::rps);
    let bars: Vec<load_chart::Bar> = outcomes
        .iter()
        .map(|out| load_chart::Bar {
            name: out.scenario.name(),
            requests_per_second: out.rps(),
            ratio: if ceiling > 0.0 {
                out.rps() / ceiling
            } else {
                0.0
            },
            p99_ms: out.percentile_ms(0.99),
        })
        .collect();
    let title = format!(
        "tower-scale load report: {} connections, {} s per scenario, server and generator on one core each",
        o.connections, o.seconds
    );
    load_chart::write_svg(path, &bars, &title)
}
