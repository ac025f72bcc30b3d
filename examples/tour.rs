//! The tour: what tower-scale does, on real servers started for the occasion.
//!
//! ```text
//! cargo run --release --features full --example tour
//! ```
//!
//! It starts the embedded default (a PostgreSQL primary and two streaming
//! replicas from the installed binaries, in temp dirs on free loopback
//! ports), writes on the primary, reads the row back from each replica, and
//! prints what happened and how long it took. Later parts extend it until it
//! shows the whole stack. Everything it started is stopped on exit.

use std::time::{Duration, Instant};

use tower_scale::testing::LocalCluster;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("tour failed: {e}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Error> {
    println!("tower-scale tour");
    println!("================");
    let started = Instant::now();
    let cluster = tokio::task::spawn_blocking(|| LocalCluster::start(2)).await??;
    println!(
        "started a PostgreSQL primary and 2 streaming replicas in {:.2?}",
        started.elapsed()
    );
    for node in cluster.nodes() {
        println!("  {:<10} {}", node.name(), node.url());
    }

    println!("\n1. one write on the primary, read back from every replica");
    let primary = cluster.primary().connect().await?;
    primary
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS users (id bigserial primary key, name text not null)",
        )
        .await?;
    let t = Instant::now();
    let row = primary
        .query_one(
            "INSERT INTO users (name) VALUES ($1) RETURNING id, pg_current_wal_lsn()::text",
            &[&"ada"],
        )
        .await?;
    let (id, lsn): (i64, String) = (row.get(0), row.get(1));
    println!(
        "  primary    INSERT users(id={id}, name='ada') at WAL position {lsn} in {:.2?}",
        t.elapsed()
    );
    let lsn = tower_scale::testing::parse_lsn(&lsn)?;
    for replica in cluster.replicas() {
        let t = Instant::now();
        replica
            .wait_for_replay(lsn, Duration::from_secs(30))
            .await?;
        let caught_up = t.elapsed();
        let client = replica.connect().await?;
        let t = Instant::now();
        let row = client
            .query_one("SELECT name FROM users WHERE id = $1", &[&id])
            .await?;
        let name: String = row.get(0);
        println!(
            "  {:<10} replayed it after {caught_up:.2?}; SELECT found name='{name}' in {:.2?}",
            replica.name(),
            t.elapsed()
        );
    }

    let t = Instant::now();
    drop(cluster);
    println!(
        "\nstopped every server and removed their temp dirs in {:.2?}",
        t.elapsed()
    );
    println!("tour finished in {:.2?}", started.elapsed());
    Ok(())
}
