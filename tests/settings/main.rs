//! Settings from TOML, JSON and the environment build the same cluster,
//! cache, HTTP cache and Redis tier as the builders (compared field by
//! field, through each builder's `Debug`); a wrong field is named; a
//! password never shows.

use std::time::Duration;

use tower_scale::cache::CacheLayer;
use tower_scale::http::HttpCacheLayer;
use tower_scale::pg::{Cluster, NodeConfig};
use tower_scale::settings::{Settings, SettingsError};

const PRIMARY: &str = "postgresql://app:pa55-w0rd@10.0.0.1:5432/app";
const REPLICA: &str = "postgresql://app:pa55-w0rd@10.0.0.2:5432/app";
const SECRET: &str = "pa55-w0rd";

const TOML: &str = r#"
[cluster]
primary = "postgresql://app:pa55-w0rd@10.0.0.1:5432/app"
replicas = ["postgresql://app:pa55-w0rd@10.0.0.2:5432/app"]
zone = "eu-1a"
local_region = "eu"
local_wait = "100ms"
identity = "0042"
pool_size = 8
read_timeout = "2s"
read_your_writes_wait = "250ms"
statement_timeout = "0s"
fallback_to_primary = false

[cache]
time_to_live = "90s"
stale_while_revalidate = "1m 30s"
max_entries = 5000
ttl_jitter = 0.1
early_refresh = 0

[http_cache]
max_bytes = 1048576
cache_status = false
tag_header = "x-tags"
targeted_fields = ["myapp-cdn-cache-control", "cdn-cache-control"]
strip_targeted_fields = false
max_stale_if_unreachable = "2h"

[redis]
url = "redis://:pa55-w0rd@127.0.0.1:6379/0"
prefix = "users"
isolation_ttl = "500ms"
lease_ttl = "3s"
"#;

const JSON: &str = r#"{
  "cluster": {
    "primary": "postgresql://app:pa55-w0rd@10.0.0.1:5432/app",
    "replicas": [{"url": "postgresql://app:pa55-w0rd@10.0.0.2:5432/app"}],
    "zone": "eu-1a",
    "local_region": "eu",
    "local_wait": "100ms",
    "identity": "0042",
    "pool_size": 8,
    "read_timeout": "2s",
    "read_your_writes_wait": "250ms",
    "statement_timeout": "0s",
    "fallback_to_primary": false
  },
  "cache": {"time_to_live": "90s", "stale_while_revalidate": "90s", "max_entries": 5000,
            "ttl_jitter": 0.1, "early_refresh": 0},
  "http_cache": {"max_bytes": 1048576, "cache_status": false, "tag_header": "x-tags",
                 "targeted_fields": ["myapp-cdn-cache-control", "cdn-cache-control"],
                 "strip_targeted_fields": false, "max_stale_if_unreachable": "2h"},
  "redis": {"url": "redis://:pa55-w0rd@127.0.0.1:6379/0", "prefix": "users",
            "isolation_ttl": "500ms", "lease_ttl": "3s"}
}"#;

const ENV: &[(&str, &str)] = &[
    ("TSTEST__CLUSTER__PRIMARY", PRIMARY),
    ("TSTEST__CLUSTER__REPLICAS", REPLICA),
    ("TSTEST__CLUSTER__ZONE", "eu-1a"),
    ("TSTEST__CLUSTER__LOCAL_REGION", "eu"),
    ("TSTEST__CLUSTER__LOCAL_WAIT", "100ms"),
    ("TSTEST__CLUSTER__IDENTITY", "0042"),
    ("TSTEST__CLUSTER__POOL_SIZE", "8"),
    ("TSTEST__CLUSTER__READ_TIMEOUT", "2s"),
    ("TSTEST__CLUSTER__READ_YOUR_WRITES_WAIT", "250ms"),
    ("TSTEST__CLUSTER__STATEMENT_TIMEOUT", "0s"),
    ("TSTEST__CLUSTER__FALLBACK_TO_PRIMARY", "false"),
    ("TSTEST__CACHE__TIME_TO_LIVE", "90s"),
    ("TSTEST__CACHE__STALE_WHILE_REVALIDATE", "90s"),
    ("TSTEST__CACHE__MAX_ENTRIES", "5000"),
    ("TSTEST__CACHE__TTL_JITTER", "0.1"),
    ("TSTEST__CACHE__EARLY_REFRESH", "0"),
    ("TSTEST__HTTP_CACHE__MAX_BYTES", "1048576"),
    ("TSTEST__HTTP_CACHE__CACHE_STATUS", "false"),
    ("TSTEST__HTTP_CACHE__TAG_HEADER", "x-tags"),
    (
        "TSTEST__HTTP_CACHE__TARGETED_FIELDS",
        "myapp-cdn-cache-control, cdn-cache-control",
    ),
    ("TSTEST__HTTP_CACHE__STRIP_TARGETED_FIELDS", "false"),
    ("TSTEST__HTTP_CACHE__MAX_STALE_IF_UNREACHABLE", "2h"),
    ("TSTEST__REDIS__URL", "redis://:pa55-w0rd@127.0.0.1:6379/0"),
    ("TSTEST__REDIS__PREFIX", "users"),
    ("TSTEST__REDIS__ISOLATION_TTL", "500ms"),
    ("TSTEST__REDIS__LEASE_TTL", "3s"),
];

/// The builders made by hand, as `Debug` text.
fn by_hand() -> [String; 4] {
    let cluster = Cluster::builder()
        .primary(NodeConfig::from_url(PRIMARY).unwrap())
        .replica(NodeConfig::from_url(REPLICA).unwrap())
        .zone("eu-1a")
        .local_region("eu")
        .local_wait(Duration::from_millis(100))
        .identity("0042")
        .pool_size(8)
        .read_timeout(Duration::from_secs(2))
        .read_your_writes_wait(Duration::from_millis(250))
        .statement_timeout(None)
        .fallback_to_primary(false);
    let cache = CacheLayer::builder(|id: &u64| Some(*id))
        .time_to_live(Duration::from_secs(90))
        .stale_while_revalidate(Duration::from_secs(90))
        .max_entries(5000)
        .ttl_jitter(0.1)
        .no_early_refresh();
    let http = HttpCacheLayer::builder()
        .max_bytes(1 << 20)
        .cache_status(false)
        .tag_header(http::HeaderName::from_static("x-tags"))
        .targeted_fields(["myapp-cdn-cache-control", "cdn-cache-control"])
        .strip_targeted_fields(false)
        .max_stale_if_unreachable(Duration::from_secs(2 * 3600));
    let redis = tower_scale::cache::redis::builder("redis://:pa55-w0rd@127.0.0.1:6379/0")
        .prefix("users")
        .isolation_ttl(Duration::from_millis(500))
        .lease(Duration::from_secs(3), Duration::from_secs(2));
    [
        format!("{cluster:?}"),
        format!("{cache:?}"),
        format!("{http:?}"),
        format!("{redis:?}"),
    ]
}

fn built(settings: &Settings) -> [String; 4] {
    let cluster = settings
        .cluster
        .as_ref()
        .expect("cluster")
        .builder()
        .unwrap();
    let cache = settings
        .cache
        .as_ref()
        .expect("cache")
        .apply(CacheLayer::builder(|id: &u64| Some(*id)));
    let http = settings
        .http_cache
        .as_ref()
        .expect("http")
        .builder()
        .unwrap();
    let redis = settings.redis.as_ref().expect("redis").builder().unwrap();
    [
        format!("{cluster:?}"),
        format!("{cache:?}"),
        format!("{http:?}"),
        format!("{redis:?}"),
    ]
}

#[test]
fn toml_json_and_the_environment_build_what_the_builders_build() {
    let expected = by_hand();
    let from_toml = Settings::from_toml(TOML).unwrap();
    let from_json = Settings::from_json(JSON).unwrap();
    for (k, v) in ENV {
        // SAFETY-free: edition 2024 makes set_var unsafe; this test binary
        // sets only its own TSTEST variables, before reading them.
        unsafe { std::env::set_var(k, v) };
    }
    let from_env = Settings::from_env("TSTEST").unwrap();
    assert_eq!(from_toml, from_json, "TOML and JSON differ");
    assert_eq!(from_toml, from_env, "TOML and the environment differ");
    for (what, settings) in [
        ("toml", &from_toml),
        ("json", &from_json),
        ("env", &from_env),
    ] {
        let got = built(settings);
        for (i, part) in ["cluster", "cache", "http_cache", "redis"]
            .iter()
            .enumerate()
        {
            assert_eq!(got[i], expected[i], "{what}: {part}");
        }
    }
    // A file by its extension.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tower-scale.toml");
    std::fs::write(&path, TOML).unwrap();
    assert_eq!(Settings::from_file(&path).unwrap(), from_toml);
}

#[test]
fn a_wrong_field_is_named_and_no_password_shows() {
    let cases = [
        (
            "[cluster]\nprimary = \"postgresql://app:pa55-w0rd@h/db\"\npool_sise = 3\n",
            "pool_sise",
        ),
        (
            "[cluster]\nprimary = \"postgresql://app:pa55-w0rd@h/db\"\npool_size = \"many\"\n",
            "pool_size",
        ),
        (
            "[cluster]\nprimary = \"postgresql://app:pa55-w0rd@h/db\"\nread_timeout = \"soon\"\n",
            "read_timeout",
        ),
        (
            "[cluster]\nprimary = \"postgresql://app:pa55-w0rd@h/db\"\npool_size = 0\n",
            "cluster.pool_size",
        ),
        (
            "[cluster]\nprimary = \"postgresql://app:pa55-w0rd@h:notaport/db\"\n",
            "cluster.primary",
        ),
        (
            "[cluster]\nprimary = \"postgresql://app:pa55-w0rd@h/db\"\nreplicas = [\"host=h password=pa55-w0rd port=x\"]\n",
            "cluster.replicas[0]",
        ),
        (
            "[http_cache]\ntag_header = \"no spaces allowed\"\n",
            "http_cache.tag_header",
        ),
        (
            "[http_cache]\ntargeted_fields = [\"no spaces allowed\"]\n",
            "http_cache.targeted_fields",
        ),
        ("[redis]\nurl = \"http://:pa55-w0rd@h\"\n", "redis.url"),
        ("[cache]\nttl = \"1s\"\n", "ttl"),
        ("[caches]\n", "caches"),
        (
            "[cluster]\nprimary = \"postgresql://app:pa55-w0rd@h/db\"\nreplicas = [{ url = \"postgresql://app:pa55-w0rd@h2/db\", nmae = \"b\" }]\n",
            "replicas",
        ),
        (
            "[cluster]\nprimary = \"postgresql://app:pa55-w0rd@h/db\"\nreplicas = [\"\"]\n",
            "cluster.replicas[0]",
        ),
        // A URL put where a number goes: the error quotes it, redacted.
        (
            "[cluster]\nprimary = \"postgresql://app:pa55-w0rd@h/db\"\npool_size = \"postgresql://app:pa55-w0rd@h/db\"\n",
            "pool_size",
        ),
    ];
    for (toml, field) in cases {
        let err = match Settings::from_toml(toml) {
            Err(e) => e,
            Ok(s) => {
                let cluster = s.cluster.as_ref().map(|c| c.builder().map(drop));
                let http = s.http_cache.as_ref().map(|h| h.builder().map(drop));
                let redis = s.redis.as_ref().map(|r| r.builder().map(drop));
                match [cluster, http, redis]
                    .into_iter()
                    .flatten()
                    .find_map(Result::err)
                {
                    Some(e) => e,
                    None => panic!("accepted: {toml}"),
                }
            }
        };
        let text = err.to_string();
        eprintln!("{text}");
        assert!(text.contains(field), "{text:?} does not name {field}");
        assert!(!text.contains(SECRET), "{text:?} shows the password");
        assert!(
            !format!("{err:?}").contains(SECRET),
            "{err:?} shows the password"
        );
        assert!(matches!(
            err,
            SettingsError::Load(_) | SettingsError::Invalid { .. }
        ));
    }
    let settings = Settings::from_toml(TOML).unwrap();
    let shown = format!("{settings:?}");
    assert!(!shown.contains(SECRET), "{shown}");
    assert!(shown.contains("app:***@10.0.0.1"), "{shown}");
    let built = built(&settings).join("\n");
    assert!(
        !built.contains(SECRET),
        "a builder shows the password: {built}"
    );
}

#[test]
fn replicas_from_the_environment_are_separated_by_white_space() {
    // SAFETY-free: this test's own TSTEST2 variables only.
    unsafe {
        std::env::set_var("TSTEST2__CLUSTER__PRIMARY", PRIMARY);
        std::env::set_var(
            "TSTEST2__CLUSTER__REPLICAS",
            format!("{REPLICA}  postgresql://app@h3,h4/app"),
        );
    }
    let settings = Settings::from_env("TSTEST2").unwrap();
    let cluster = settings.cluster.unwrap();
    let urls: Vec<&str> = cluster.replicas.iter().map(|r| r.url.as_str()).collect();
    assert_eq!(urls, [REPLICA, "postgresql://app@h3,h4/app"]);
    drop(cluster.builder().unwrap());
}
