//! The cache tier in front of a slow "database": hits, misses, coalescing,
//! stale-while-revalidate and invalidation, with the statistics printed.
//!
//! ```text
//! cargo run --release --features full --example cache_service
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
use tower_scale::cache::{CacheLayer, CachePolicy, CacheStats, Storable, Windows};

/// A user row, shared between the cache and every caller (`Arc`).
type Row = Arc<String>;

/// Keys are user ids; each entry is tagged `user:{id}` so writes can
/// invalidate it.
struct UserPolicy;

impl CachePolicy<u64, Row> for UserPolicy {
    type Key = u64;
    fn key(&self, id: &u64) -> Option<u64> {
        Some(*id)
    }
    fn storable(&self, id: &u64, _row: &Row, defaults: &Windows) -> Option<Storable> {
        Some(Storable::new(*defaults).tag(format!("user:{id}")))
    }
}

fn print_stats(label: &str, s: &CacheStats) {
    println!(
        "  {label:<34} hits={} stale={} misses={} coalesced={} refreshes={} stored={} invalidations={}",
        s.hits, s.stale_hits, s.misses, s.coalesced, s.refreshes, s.stored, s.invalidations
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let queries = Arc::new(AtomicUsize::new(0));
    let db = {
        let queries = queries.clone();
        service_fn(move |id: u64| {
            let n = queries.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                // A slow query.
                tokio::time::sleep(Duration::from_millis(50)).await;
                Ok::<_, Infallible>(Arc::new(format!("user {id} (query #{n})")))
            }
        })
    };
    let layer = CacheLayer::builder(UserPolicy)
        .time_to_live(Duration::from_millis(300))
        .stale_while_revalidate(Duration::from_secs(5))
        .max_entries(10_000)
        .build()?;
    let invalidator = layer.invalidator();
    let mut users = ServiceBuilder::new().layer(layer).service(db);

    println!("1. a miss goes to the database, the next read is a hit");
    let t = Instant::now();
    let row = users.ready().await?.call(1).await?;
    println!("  miss: {row} in {:.1?}", t.elapsed());
    let t = Instant::now();
    for _ in 0..10_000 {
        users.ready().await?.call(1).await?;
    }
    println!(
        "  hit:  10,000 reads in {:.1?} ({:.0?} each)",
        t.elapsed(),
        t.elapsed() / 10_000
    );
    print_stats("after a miss and 10,000 hits", &users.stats());

    println!("\n2. 500 concurrent reads of a cold key make one query");
    let before = queries.load(Ordering::SeqCst);
    let t = Instant::now();
    let reads: Vec<_> = (0..500).map(|_| users.clone().oneshot(2)).collect();
    let rows = futures_join(reads).await;
    println!(
        "  {} answers, {} database query, in {:.1?}",
        rows.len(),
        queries.load(Ordering::SeqCst) - before,
        t.elapsed()
    );
    print_stats("after the stampede", &users.stats());

    println!("\n3. past the TTL, stale-while-revalidate answers at once and refreshes once");
    tokio::time::sleep(Duration::from_millis(350)).await;
    let t = Instant::now();
    for _ in 0..100 {
        users.ready().await?.call(1).await?;
    }
    println!("  100 stale reads in {:.1?}", t.elapsed());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let row = users.ready().await?.call(1).await?;
    println!("  after the background refresh: {row}");
    print_stats("after the refresh", &users.stats());

    println!("\n4. a write invalidates by tag; the next read sees the new row");
    invalidator.invalidate_tag("user:1");
    let row = users.ready().await?.call(1).await?;
    println!("  {row}");
    print_stats("at the end", &users.stats());
    println!(
        "\n  database queries in all: {}",
        queries.load(Ordering::SeqCst)
    );
    Ok(())
}

/// Waits for every future (without pulling in a futures crate).
async fn futures_join<F, T, E>(futures: Vec<F>) -> Vec<T>
where
    F: std::future::Future<Output = Result<T, E>> + Send + 'static,
    T: Send + 'static,
    E: Send + 'static + std::fmt::Debug,
{
    let mut set = tokio::task::JoinSet::new();
    for f in futures {
        set.spawn(f);
    }
    let mut out = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(Ok(v)) = r {
            out.push(v);
        }
    }
    out
}
