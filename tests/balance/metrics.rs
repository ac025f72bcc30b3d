//! The per-upstream metrics of the README's table, through the `metrics`
//! facade.

use std::collections::BTreeMap;
use std::time::Duration;

use metrics_util::debugging::{DebugValue, DebuggingRecorder};
use tower_scale::balance::Upstreams;

use crate::{Origin, builder, get, refusing_url, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_upstream_counters_and_gauges() {
    let good = Origin::start("good").await;
    let refusing = refusing_url().await;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // The handles are registered when an upstream is added: they report
    // to the recorder current then (a local one here, so that other tests
    // in this binary do not mix in).
    let set = Upstreams::new();
    metrics::with_local_recorder(&recorder, || {
        set.add(good.url()).unwrap();
        set.add(refusing.clone()).unwrap();
    });
    // Slower than the refusing upstream's assumed 1 ms: p2c tries that one
    // by the second request.
    good.set_delay(Duration::from_millis(5));
    let balancer = builder()
        .ejection_base(Duration::from_secs(30))
        .ejection_max(Duration::from_secs(30))
        .build(&set)
        .unwrap();
    let mut sent = 0;
    while set.status()[1].failures == 0 {
        assert_eq!(send(&balancer, get("/m")).await.status, 200);
        sent += 1;
        assert!(sent < 100, "the refusing upstream was never tried");
    }
    for _ in 0..10 {
        assert_eq!(send(&balancer, get("/m")).await.status, 200);
    }
    let mut values = BTreeMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        let key = key.key();
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let value = match value {
            DebugValue::Counter(n) => n as f64,
            DebugValue::Gauge(g) => g.into_inner(),
            DebugValue::Histogram(h) => h.len() as f64,
        };
        values.insert(format!("{}{{{}}}", key.name(), labels.join(",")), value);
    }
    for (k, v) in &values {
        println!("{k} {v}");
    }
    let g = format!("upstream=http://{}", good.addr);
    let r = format!(
        "upstream=http://{}",
        refusing.authority().map(|a| a.as_str()).unwrap_or_default()
    );
    let get = |name: &str, labels: &str| {
        values
            .get(&format!("{name}{{{labels}}}"))
            .copied()
            .unwrap_or_else(|| panic!("{name}{{{labels}}} not reported"))
    };
    let total = sent as f64 + 10.0;
    assert_eq!(get("tower_scale_upstream_requests_total", &g), total);
    assert_eq!(get("tower_scale_upstream_requests_total", &r), 1.0);
    assert_eq!(
        get(
            "tower_scale_upstream_failures_total",
            &format!("{r},kind=connect")
        ),
        1.0
    );
    assert_eq!(
        get(
            "tower_scale_upstream_failures_total",
            &format!("{g},kind=connect")
        ),
        0.0
    );
    assert_eq!(get("tower_scale_upstream_retries_total", &r), 1.0);
    assert_eq!(get("tower_scale_upstream_ejections_total", &r), 1.0);
    assert_eq!(get("tower_scale_upstream_ejections_total", &g), 0.0);
    assert_eq!(get("tower_scale_upstream_healthy", &r), 0.0);
    assert_eq!(get("tower_scale_upstream_healthy", &g), 1.0);
    assert_eq!(get("tower_scale_upstream_load", &g), 0.0);
    // A removed upstream's gauges go to zero.
    set.remove(&good.url());
    let healthy = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .find(|(k, _, _, _)| {
            k.key().name() == "tower_scale_upstream_healthy"
                && k.key()
                    .labels()
                    .any(|l| format!("upstream={}", l.value()) == g)
        })
        .map(|(_, _, _, v)| v);
    assert!(matches!(healthy, Some(DebugValue::Gauge(v)) if v.into_inner() == 0.0));
}
