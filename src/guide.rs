#![doc = include_str!("../docs/guide/index.md")]
//!
//! ## The pages
//!
//! 1. [One server](step1_one_server)
//! 2. [The database on its own](step2_database_on_its_own)
//! 3. [A cache in front of reads](step3_cache_in_front_of_reads)
//! 4. [Read replicas with read-your-writes](step4_read_replicas)
//! 5. [A stateless web tier](step5_stateless_web_tier)
//! 6. [Several instances, one Redis tier](step6_shared_redis_tier)
//! 7. [HTTP caching as a CDN tier](step7_http_cache_tier)
//! 8. [Operations](operations): PostgreSQL settings, metrics to alert on,
//!    what happens in each failure
//! 9. [What next](what_next): the parts still being built
//!
//! The `axum_users` example the pages build on also runs background work
//! on the job queue (`tower_scale::queue`, feature `queue`): `POST /users`
//! enqueues a `welcome` job in the insert's own transaction, so the job
//! exists if and only if the user does; a worker in the same process
//! (`--workers N`, default 2) reads the user from a replica at the job's
//! token, sets `welcomed_at` idempotently and invalidates `user:{id}` like
//! any write, and users answer `"welcomed": true` from then on. A worker
//! killed mid-job stops renewing its lease and another runs the job again
//! (the tour's step 8 shows it).

#[doc = include_str!("../docs/guide/01-one-server.md")]
pub mod step1_one_server {}

#[doc = include_str!("../docs/guide/02-database-on-its-own.md")]
pub mod step2_database_on_its_own {}

#[doc = include_str!("../docs/guide/03-cache-in-front-of-reads.md")]
pub mod step3_cache_in_front_of_reads {}

#[doc = include_str!("../docs/guide/04-read-replicas.md")]
pub mod step4_read_replicas {}

#[doc = include_str!("../docs/guide/05-stateless-web-tier.md")]
pub mod step5_stateless_web_tier {}

#[doc = include_str!("../docs/guide/06-shared-redis-tier.md")]
pub mod step6_shared_redis_tier {}

#[doc = include_str!("../docs/guide/07-http-cache-tier.md")]
pub mod step7_http_cache_tier {}

#[cfg(feature = "change-feed")]
#[doc = include_str!("../docs/guide/08-change-feed.md")]
pub mod step8_change_feed {}

#[doc = include_str!("../docs/guide/operations.md")]
pub mod operations {}

#[doc = include_str!("../docs/guide/what-next.md")]
pub mod what_next {}
