//! The primary partitioned: instance A stays with it and keeps writing,
//! instance B loses it, a replica is promoted (by the test, as an operator
//! or orchestrator would). After the heal the old primary, on the older
//! timeline, gets no write from an instance that has seen the new one, even
//! when the new primary is unreachable; it is reported and not read from.
//! The writes A got acknowledged by the old primary during the partition
//! are the data at risk.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tower_scale::pg::{Cluster, Consistency};
use tower_scale::testing::LocalCluster;

use super::{DEADLINE, instance, ms, until};

/// What one instance's writer saw.
#[derive(Debug, Default)]
struct Writes {
    /// (seq, node) of every acknowledged write.
    acked: Vec<(i64, String)>,
    /// Acknowledged by the old primary after this instance had seen the
    /// new timeline: must stay empty.
    to_old_after_seen: Vec<i64>,
    failed: u64,
}

/// Whether `cluster` has seen the promoted replica as its primary (from
/// then on it must never write to the old one).
fn seen_new_timeline(cluster: &Cluster) -> bool {
    cluster.primary_name().as_deref() == Some("replica-1")
}

fn writer(
    name: &'static str,
    cluster: Cluster,
    stop: Arc<AtomicBool>,
    seq: Arc<AtomicU64>,
    writes: Arc<Mutex<Writes>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let db = cluster.db();
        let mut seen = false;
        while !stop.load(Ordering::SeqCst) {
            // Latched: checked before the write is sent.
            seen |= seen_new_timeline(&cluster);
            let n = seq.fetch_add(1, Ordering::SeqCst) as i64;
            let r = db
                .execute(
                    "INSERT INTO w (instance, seq, after_seen) VALUES ($1, $2, $3)",
                    &[&name, &n, &seen],
                )
                .await;
            let mut w = writes.lock().await;
            match r {
                Ok(done) => {
                    if seen && &*done.served_by == "primary" {
                        w.to_old_after_seen.push(n);
                    }
                    w.acked.push((n, done.served_by.to_string()));
                }
                Err(_) => w.failed += 1,
            }
            drop(w);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
}

async fn rows(client: &tokio_postgres::Client, filter: &str) -> HashSet<(String, i64)> {
    client
        .query(&format!("SELECT instance, seq FROM w {filter}"), &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_primary_is_fenced_by_its_timeline_and_its_writes_are_counted_at_risk() {
    let local = LocalCluster::builder()
        .replicas(1)
        .client_groups(2)
        .replication_proxies(true)
        .start()
        .unwrap();
    let (group_a, group_b) = (local.client_group(0), local.client_group(1));
    let labels = [("a", "a1"), ("a", "a1")];
    let configure = |b: tower_scale::pg::ClusterBuilder| {
        b.local_region("a")
            .write_timeout(Duration::from_secs(1))
            .read_timeout(Duration::from_secs(1))
            .primary_wait(Duration::from_millis(300))
            .probe_timeout(Duration::from_millis(300))
    };
    let a = instance(group_a, &labels, configure).await;
    let b = instance(group_b, &labels, configure).await;
    a.db()
        .execute(
            "CREATE TABLE w (instance text, seq bigint, after_seen bool NOT NULL, PRIMARY KEY (instance, seq))",
            &[],
        )
        .await
        .unwrap();
    local.wait_for_replicas(DEADLINE).await.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (seq_a, seq_b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (writes_a, writes_b) = (
        Arc::new(Mutex::new(Writes::default())),
        Arc::new(Mutex::new(Writes::default())),
    );
    let writers = [
        writer("a", a.clone(), stop.clone(), seq_a, writes_a.clone()),
        writer("b", b.clone(), stop.clone(), seq_b, writes_b.clone()),
    ];
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The partition: the old primary keeps instance A only.
    group_b.proxy(0).black_hole();
    group_a.proxy(1).black_hole();
    let replication = local.replication_proxy(0).unwrap();
    replication.black_hole();
    let partitioned = Instant::now();
    until("B loses the primary", DEADLINE, async || {
        b.status().iter().any(|n| n.name == "primary" && !n.healthy)
    })
    .await;
    local.replica(0).promote().await.unwrap();
    let promoted = Instant::now();
    let b_saw = until("B writes to the promoted replica", DEADLINE, async || {
        seen_new_timeline(&b)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;

    // The heal: both instances see two primaries; the higher timeline wins.
    group_b.proxy(0).restore();
    group_a.proxy(1).restore();
    replication.restore();
    let healed = Instant::now();
    let a_saw = until("A moves to the new timeline", DEADLINE, async || {
        seen_new_timeline(&a)
    })
    .await;
    until(
        "both instances fence the old primary",
        DEADLINE,
        async || {
            [&a, &b].iter().all(|c| {
                c.status()
                    .iter()
                    .any(|n| n.name == "primary" && n.healthy && n.fenced)
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The new primary unreachable from both: the old one, healthy and
    // claiming to be a primary, must still get nothing.
    group_a.proxy(1).black_hole();
    group_b.proxy(1).black_hole();
    until(
        "the new primary out of rotation on both",
        DEADLINE,
        async || {
            [&a, &b].iter().all(|c| {
                c.status()
                    .iter()
                    .any(|n| n.name == "replica-1" && !n.healthy)
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    for c in [&a, &b] {
        assert_ne!(c.primary_name().as_deref(), Some("primary"));
    }
    group_a.proxy(1).restore();
    group_b.proxy(1).restore();
    until("both back on the new primary", DEADLINE, async || {
        seen_new_timeline(&a) && seen_new_timeline(&b)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    for w in writers {
        w.await.unwrap();
    }

    // Reads are not served by the old primary.
    for c in [&a, &b] {
        for consistency in [Consistency::Any, Consistency::Strong] {
            let r = c
                .db()
                .read_one(consistency, "SELECT pg_is_in_recovery()", &[])
                .await
                .unwrap();
            assert_eq!(&*r.served_by, "replica-1");
        }
    }

    let old = local.primary().connect().await.unwrap();
    let new = local.replica(0).connect().await.unwrap();
    let after_seen_on_old = rows(&old, "WHERE after_seen").await;
    let (on_old, on_new) = (rows(&old, "").await, rows(&new, "").await);
    let at_risk: HashSet<_> = on_old.difference(&on_new).collect();
    let (wa, wb) = (writes_a.lock().await, writes_b.lock().await);
    let acked_at_risk = wa
        .acked
        .iter()
        .filter(|(n, node)| node == "primary" && at_risk.contains(&("a".to_string(), *n)))
        .count();
    let count = |w: &Writes, node: &str| w.acked.iter().filter(|(_, n)| n == node).count();
    println!(
        "partition: B saw the new timeline {:.0} ms after the promotion ({:.0} ms after the partition), \
         A {:.0} ms after the heal; both fenced the old primary",
        ms(b_saw),
        ms(promoted - partitioned),
        ms(a_saw),
    );
    let _ = healed;
    println!(
        "writes acknowledged: A {} by the old primary, {} by the new ({} failed); B {} by the old, {} by the new ({} failed)",
        count(&wa, "primary"),
        count(&wa, "replica-1"),
        wa.failed,
        count(&wb, "primary"),
        count(&wb, "replica-1"),
        wb.failed,
    );
    println!(
        "data at risk: {} writes acknowledged by the old primary are not on the new one ({} of them acknowledged to A); \
         writes sent to the old primary after an instance saw the new timeline: {}",
        at_risk.len(),
        acked_at_risk,
        after_seen_on_old.len() + wa.to_old_after_seen.len() + wb.to_old_after_seen.len(),
    );
    assert!(after_seen_on_old.is_empty(), "{after_seen_on_old:?}");
    assert!(wa.to_old_after_seen.is_empty() && wb.to_old_after_seen.is_empty());
    assert!(
        acked_at_risk > 0,
        "A wrote nothing to the old primary during the partition: the scenario did not happen"
    );
    // Every write B had acknowledged by the new primary is there.
    for (n, node) in &wb.acked {
        if node == "replica-1" {
            assert!(on_new.contains(&("b".to_string(), *n)));
        }
    }
}
