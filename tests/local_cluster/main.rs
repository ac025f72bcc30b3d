//! Tests of the test-support servers themselves (feature `local-cluster`).
#![cfg(feature = "local-cluster")]

mod proxy;

use std::time::{Duration, Instant};

use tower_scale::testing::{LocalCluster, LocalRedis, Node};

const WAIT: Duration = Duration::from_secs(30);

async fn count_rows(node: &Node, table: &str) -> i64 {
    let client = node.connect().await.expect("connect");
    client
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .expect("count")
        .get(0)
}

fn pids_alive(pids: &[u32]) -> Vec<u32> {
    pids.iter()
        .copied()
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_on_the_primary_are_read_on_each_replica() {
    let started = Instant::now();
    let cluster = LocalCluster::start(2).expect("cluster");
    eprintln!(
        "LocalCluster with 2 replicas started in {:?}",
        started.elapsed()
    );
    let primary = cluster.primary().connect().await.unwrap();
    primary
        .batch_execute("CREATE TABLE items (id int primary key, name text); INSERT INTO items VALUES (1, 'one')")
        .await
        .unwrap();
    cluster.wait_for_replicas(WAIT).await.unwrap();
    for replica in cluster.replicas() {
        let client = replica.connect().await.unwrap();
        let name: String = client
            .query_one("SELECT name FROM items WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(name, "one", "on {}", replica.name());
        let in_recovery: bool = client
            .query_one("SELECT pg_is_in_recovery()", &[])
            .await
            .unwrap()
            .get(0);
        assert!(in_recovery, "{} is a standby", replica.name());
    }
    assert_eq!(cluster.replica(0).name(), "replica-1");
    assert_eq!(cluster.replica(1).name(), "replica-2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_replica_really_lags() {
    let cluster = LocalCluster::builder()
        .replicas(1)
        .apply_delay(0, Duration::from_millis(1500))
        .start()
        .expect("cluster");
    let primary = cluster.primary().connect().await.unwrap();
    primary
        .batch_execute("CREATE TABLE lag (id int)")
        .await
        .unwrap();
    cluster.wait_for_replicas(WAIT).await.unwrap();
    primary
        .batch_execute("INSERT INTO lag VALUES (1)")
        .await
        .unwrap();
    // The row is committed on the primary, but the replica applies it only
    // after the delay: it must be missing right now.
    assert_eq!(count_rows(cluster.primary(), "lag").await, 1);
    assert_eq!(
        count_rows(cluster.replica(0), "lag").await,
        0,
        "the delayed replica already shows the row"
    );
    let waited = Instant::now();
    cluster.wait_for_replica(0, WAIT).await.unwrap();
    eprintln!("delayed replica caught up after {:?}", waited.elapsed());
    assert_eq!(count_rows(cluster.replica(0), "lag").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promote_turns_a_replica_into_a_writable_primary() {
    let cluster = LocalCluster::start(1).expect("cluster");
    let replica = cluster.replica(0);
    let client = replica.connect().await.unwrap();
    let err = client
        .batch_execute("CREATE TABLE before_promote (id int)")
        .await
        .expect_err("a standby refuses writes");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::READ_ONLY_SQL_TRANSACTION)
    );
    cluster.primary().stop().expect("clean stop");
    assert!(!cluster.primary().is_running());
    replica.promote().await.expect("promote");
    let client = replica.connect().await.unwrap();
    client
        .batch_execute("CREATE TABLE after_promote (id int); INSERT INTO after_promote VALUES (1)")
        .await
        .expect("the promoted replica takes writes");
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery);
    // The stopped primary comes back on its own port.
    cluster.primary().start().expect("restart");
    assert_eq!(
        count_rows(
            cluster.primary(),
            "pg_class WHERE relname = 'after_promote'"
        )
        .await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_pause_and_restart() {
    let cluster = LocalCluster::start(1).expect("cluster");
    let replica = cluster.replica(0);
    // Paused: a connection attempt does not get an answer.
    replica.pause().unwrap();
    let mut config = replica.config();
    config.connect_timeout(Duration::from_millis(300));
    let paused = tokio::time::timeout(
        Duration::from_secs(2),
        config.connect(tokio_postgres::NoTls),
    )
    .await;
    assert!(
        !matches!(paused, Ok(Ok(_))),
        "a paused server must not complete a connection"
    );
    replica.resume().unwrap();
    replica.connect().await.expect("answers after resume");
    // Killed: every server process is gone; it starts again and catches up.
    let pids = {
        let pid = replica.pid().unwrap();
        let mut all = vec![pid];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            if let Ok(stat) = std::fs::read_to_string(entry.path().join("stat"))
                && let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..])
                && rest.split_whitespace().nth(1) == Some(&pid.to_string())
            {
                all.push(entry.file_name().to_str().unwrap().parse().unwrap());
            }
        }
        all
    };
    assert!(pids.len() > 1, "a running server has child processes");
    replica.kill().unwrap();
    assert!(
        pids_alive(&pids).is_empty(),
        "killed processes remain: {pids:?}"
    );
    assert!(replica.connect().await.is_err());
    replica.start().unwrap();
    let primary = cluster.primary().connect().await.unwrap();
    primary
        .batch_execute("CREATE TABLE after_kill (id int)")
        .await
        .unwrap();
    cluster.wait_for_replicas(WAIT).await.unwrap();
    assert_eq!(count_rows(replica, "after_kill").await, 0);
}

#[test]
fn after_drop_no_server_process_or_dir_remains() {
    let cluster = LocalCluster::start(1).expect("cluster");
    let redis = LocalRedis::start().expect("redis");
    let mut pids: Vec<u32> = cluster.nodes().iter().filter_map(Node::pid).collect();
    pids.extend(redis.pid());
    let dirs: Vec<_> = cluster
        .nodes()
        .iter()
        .map(|n| n.dir().to_path_buf())
        .chain([redis.dir().to_path_buf()])
        .collect();
    assert_eq!(pids.len(), 3);
    assert!(dirs.iter().all(|d| d.exists()));
    drop(cluster);
    drop(redis);
    assert!(
        pids_alive(&pids).is_empty(),
        "processes left: {:?}",
        pids_alive(&pids)
    );
    for dir in dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[test]
fn teardown_also_happens_when_a_test_panics() {
    let mut seen = None;
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = LocalCluster::start(0).expect("cluster");
        seen = Some((
            cluster.primary().pid().unwrap(),
            cluster.primary().dir().to_path_buf(),
        ));
        panic!("a failing test");
    }));
    assert!(result.is_err());
    let (pid, dir) = seen.unwrap();
    assert!(pids_alive(&[pid]).is_empty());
    assert!(!dir.exists());
}

#[test]
fn redis_stop_kill_and_start_again() {
    use std::io::{Read, Write};
    let redis = LocalRedis::start().expect("redis");
    let ping = |port: u16| -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
    };
    assert!(ping(redis.port()));
    assert!(redis.url().starts_with("redis://127.0.0.1:"));
    redis.kill().unwrap();
    assert!(!ping(redis.port()));
    redis.start_again().unwrap();
    assert!(ping(redis.port()));
    redis.stop().unwrap();
    assert!(!redis.is_running());
    assert!(!ping(redis.port()));
}

#[test]
fn shared_clusters_are_reused_while_alive() {
    let a = LocalCluster::shared("reuse", LocalCluster::builder).unwrap();
    let b = LocalCluster::shared("reuse", || panic!("must reuse the live cluster")).unwrap();
    assert!(std::sync::Arc::ptr_eq(&a, &b));
    let pid = a.primary().pid().unwrap();
    drop(a);
    drop(b);
    assert!(
        pids_alive(&[pid]).is_empty(),
        "the last guard tears it down"
    );
}

/// Run in a child process by `servers_of_a_crashed_run_are_swept`: starts a
/// server, reports it, and aborts without running any destructor.
#[test]
#[ignore = "helper run in a child process"]
fn crash_helper() {
    if std::env::var_os("TOWER_SCALE_CRASH_HELPER").is_none() {
        return;
    }
    let cluster = LocalCluster::start(0).expect("cluster");
    let redis = LocalRedis::start().expect("redis");
    println!(
        "CRASHED {} {} {} {}",
        cluster.primary().pid().unwrap(),
        cluster.primary().dir().display(),
        redis.pid().unwrap(),
        redis.dir().display()
    );
    std::process::abort();
}

#[test]
fn servers_of_a_crashed_run_are_swept() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_helper", "--ignored", "--nocapture"])
        .env("TOWER_SCALE_CRASH_HELPER", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CRASHED "))
        .unwrap_or_else(|| panic!("helper printed no report: {stdout}"));
    let parts: Vec<&str> = line.split(' ').collect();
    let (pg_pid, pg_dir) = (
        parts[0].parse::<u32>().unwrap(),
        std::path::PathBuf::from(parts[1]),
    );
    let (redis_pid, redis_dir) = (
        parts[2].parse::<u32>().unwrap(),
        std::path::PathBuf::from(parts[3]),
    );
    assert!(!out.status.success(), "the helper aborted");
    assert_eq!(pids_alive(&[pg_pid, redis_pid]).len(), 2, "orphans run on");
    assert!(pg_dir.exists() && redis_dir.exists());
    // The next start sweeps what the dead run left.
    let _redis = LocalRedis::start().unwrap();
    assert!(
        pids_alive(&[pg_pid, redis_pid]).is_empty(),
        "orphans were not killed"
    );
    assert!(
        !pg_dir.exists() && !redis_dir.exists(),
        "orphan dirs were not removed"
    );
}

/// Set in the child process of
/// [`servers_of_a_killed_process_stop_within_seconds`].
const CHILD_ENV: &str = "TOWER_SCALE_WATCHDOG_CHILD";

/// The child's part (run only as that child): starts a LocalCluster and a
/// LocalRedis, prints their server pids on one line, then waits to be killed.
#[test]
#[ignore = "run by servers_of_a_killed_process_stop_within_seconds as its child"]
fn watchdog_child() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let cluster = LocalCluster::start(1).expect("cluster");
    let redis = LocalRedis::start().expect("redis");
    let mut pids: Vec<u32> = cluster.nodes().iter().filter_map(|n| n.pid()).collect();
    pids.extend(redis.pid());
    let line: Vec<String> = pids.iter().map(u32::to_string).collect();
    println!("pids {}", line.join(" "));
    use std::io::Write;
    std::io::stdout().flush().expect("flush");
    // Killed from outside; never returns on its own.
    loop {
        std::thread::park();
    }
}

/// A process that started servers and is then SIGKILLed (no destructor
/// runs) leaves none of them running: its watchdog sees the pipe from the
/// dead process close and stops them, within a few seconds.
#[test]
fn servers_of_a_killed_process_stop_within_seconds() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "watchdog_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, "1")
        .env("TOWER_SCALE_TMPDIR", tmp.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the child");
    let stdout = child.stdout.take().expect("stdout");
    let mut pids = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read the child's output");
        if let Some(rest) = line.strip_prefix("pids ") {
            pids = rest
                .split_whitespace()
                .map(|p| p.parse::<u32>().expect("pid"))
                .collect();
            break;
        }
    }
    assert_eq!(pids.len(), 3, "the child did not report its servers");
    assert_eq!(pids_alive(&pids), pids, "the servers run before the kill");
    // A decoy that looks like a server, recorded (with another start time,
    // as a process that reused a server's pid would be) in a dir marked
    // as the child's: the watchdog removes the dir and spares the decoy.
    let mut decoy = Command::new("sh")
        .args(["-c", "sleep 60", "postgres-decoy"])
        .spawn()
        .expect("decoy");
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).expect("stat");
    let start = stat[stat.rfind(')').expect("stat") + 2..]
        .split_whitespace()
        .nth(19)
        .expect("start time")
        .to_string();
    let fake = tmp.path().join("tower-scale-decoy-x");
    std::fs::create_dir(&fake).expect("fake dir");
    std::fs::write(
        fake.join("tower-scale.owner"),
        format!("{} {start}", child.id()),
    )
    .unwrap();
    std::fs::write(fake.join("tower-scale.server"), format!("{} 1", decoy.id())).unwrap();
    let killed = Instant::now();
    child.kill().expect("SIGKILL the child");
    child.wait().expect("reap the child");
    let deadline = killed + Duration::from_secs(10);
    while !pids_alive(&pids).is_empty() {
        assert!(
            Instant::now() < deadline,
            "servers {:?} still run 10 s after their process was killed",
            pids_alive(&pids)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "the servers of a SIGKILLed process ({pids:?}) were gone {:?} after the kill",
        killed.elapsed()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.exists() {
        assert!(Instant::now() < deadline, "the marked dir was not removed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        pids_alive(&[decoy.id()]),
        [decoy.id()],
        "the watchdog killed a process that only reused a recorded pid"
    );
    decoy.kill().expect("stop the decoy");
    decoy.wait().expect("reap the decoy");
}

/// The primary runs with `wal_level = logical`: a publication and a
/// `pgoutput` slot can be made, and a committed change is decoded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_decodes_changes_for_logical_replication() {
    let cluster = LocalCluster::start(0).expect("cluster");
    let primary = cluster.primary().connect().await.unwrap();
    let level: String = primary
        .query_one("SHOW wal_level", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(level, "logical");
    // One statement each: a slot cannot be made in a transaction that wrote.
    for sql in [
        "CREATE TABLE feed_t (id int primary key, v text)",
        "CREATE PUBLICATION feed_pub FOR TABLE feed_t",
        "SELECT pg_create_logical_replication_slot('feed_slot', 'pgoutput')",
        "INSERT INTO feed_t VALUES (1, 'a')",
    ] {
        primary.batch_execute(sql).await.unwrap();
    }
    let changes: i64 = primary
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_binary_changes('feed_slot', NULL, NULL, \
             'proto_version', '1', 'publication_names', 'feed_pub')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // BEGIN, RELATION, INSERT, COMMIT.
    assert!(changes >= 3, "{changes} decoded messages");
    primary
        .batch_execute("SELECT pg_drop_replication_slot('feed_slot')")
        .await
        .unwrap();
}
