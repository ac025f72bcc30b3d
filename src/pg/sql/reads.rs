//! The plan of each statement text, remembered for a while, and how a
//! read is keyed and tagged by it before it reaches the cache.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::ReadCaching;
use super::analyze::{MAX_SQL_LEN, analyze};
use super::catalog::{self, KeySource, LookupFailed, Plan};
use super::key::param_text;
use crate::pg::db::Db;
use crate::pg::feed::tags;
use crate::pg::lsn::Consistency;
use crate::pg::query::{Access, Query};
use crate::sync::{read, write};

/// Statement texts whose plan is remembered at once; past it the
/// remembered plans are forgotten (they are looked up again).
const MAX_STATEMENTS: usize = 1024;
/// The statement text the remembered plans hold at most, in bytes; past it
/// they are forgotten too.
pub(super) const MAX_PLAN_BYTES: usize = 4 * 1024 * 1024;

/// Which reads are tagged by their tables, and the plans so far.
#[derive(Debug)]
pub(crate) struct TableTagging {
    mode: ReadCaching,
    ttl: Duration,
    /// Only tables this publication covers are cached.
    publication: Option<String>,
    plans: RwLock<Plans>,
}

/// The remembered plans and the bytes of statement text they hold.
#[derive(Debug, Default)]
struct Plans {
    map: HashMap<Arc<str>, Slot>,
    bytes: usize,
}

impl Plans {
    fn insert(&mut self, sql: Arc<str>, slot: Slot) {
        let len = sql.len();
        if self.map.insert(sql, slot).is_none() {
            self.bytes += len;
        }
    }

    fn remove(&mut self, sql: &str) {
        if self.map.remove(sql).is_some() {
            self.bytes -= sql.len();
        }
    }

    /// Room for `len` more bytes, forgetting every plan that is not being
    /// looked up if needed; `false` if there is none even so.
    fn make_room(&mut self, len: usize) -> bool {
        let full = |p: &Self| p.map.len() >= MAX_STATEMENTS || p.bytes + len > MAX_PLAN_BYTES;
        if full(self) {
            self.map.retain(|_, slot| matches!(slot, Slot::Pending));
            self.bytes = self.map.keys().map(|k| k.len()).sum();
        }
        !full(self)
    }
}

#[derive(Debug)]
enum Slot {
    /// The first lookup is under way: reads of the statement meanwhile go
    /// uncached (rather than wait for it or ask the catalog again).
    Pending,
    /// The plan, trusted until `until`; past it one read looks it up again
    /// (`refreshing`) while the others keep using it.
    Ready {
        plan: Arc<Plan>,
        until: Instant,
        refreshing: bool,
    },
}

/// What to do with a read.
pub(crate) enum Step {
    /// On to the cache as it is now (keyed and tagged, or not cached).
    Go(Query),
    /// Its statement's plan must be looked up first ([`TableTagging::look_up`]),
    /// by whoever holds the lookup: dropped unused, it clears the mark.
    LookUp(Query, PendingLookup),
}

impl TableTagging {
    pub(crate) fn new(mode: ReadCaching, ttl: Duration, publication: Option<String>) -> Self {
        Self {
            mode,
            ttl,
            publication,
            plans: RwLock::new(Plans::default()),
        }
    }

    /// Whether `query` is cached by its tables: a read the cache may
    /// answer (`Any`, `ReadYourWrites`), with no key of its own, marked or
    /// under [`ReadCaching::AllAnalyzable`].
    fn wants(&self, query: &Query) -> bool {
        matches!(
            query.access,
            Access::Read(Consistency::Any | Consistency::ReadYourWrites(_))
        ) && query.cache_key.is_none()
            && (query.cache_by_tables || self.mode == ReadCaching::AllAnalyzable)
    }

    /// Keys and tags `query` by its statement's plan if it is known.
    pub(crate) fn step(self: &Arc<Self>, query: Query) -> Step {
        // Too long to be analysed: not cached, and not remembered.
        if !self.wants(&query) || query.sql.len() > MAX_SQL_LEN {
            return Step::Go(query);
        }
        let known = match read(&self.plans).map.get(&query.sql) {
            Some(Slot::Ready {
                plan,
                until,
                refreshing,
            }) if *refreshing || Instant::now() < *until => Some(Arc::clone(plan)),
            Some(Slot::Pending) => return Step::Go(query),
            _ => None,
        };
        let plan = match known {
            Some(plan) => plan,
            None => {
                let mut plans = write(&self.plans);
                match plans.map.get_mut(&query.sql) {
                    // Another read got here first.
                    Some(Slot::Pending) => return Step::Go(query),
                    Some(Slot::Ready {
                        plan,
                        until,
                        refreshing,
                    }) => {
                        if *refreshing || Instant::now() < *until {
                            Arc::clone(plan)
                        } else {
                            *refreshing = true;
                            let pending = self.pending(&query);
                            return Step::LookUp(query, pending);
                        }
                    }
                    None => {
                        if !plans.make_room(query.sql.len()) {
                            return Step::Go(query);
                        }
                        plans.insert(Arc::clone(&query.sql), Slot::Pending);
                        let pending = self.pending(&query);
                        return Step::LookUp(query, pending);
                    }
                }
            }
        };
        Step::Go(apply(&plan, query))
    }

    fn pending(self: &Arc<Self>, query: &Query) -> PendingLookup {
        PendingLookup {
            tagging: Arc::clone(self),
            sql: Some(Arc::clone(&query.sql)),
        }
    }

    /// Looks up the plan of `query`'s statement, remembers it, and keys and
    /// tags `query` by it. A lookup that fails leaves `query` uncached and
    /// is not remembered.
    pub(crate) async fn look_up(db: &Db, query: Query, mut pending: PendingLookup) -> Query {
        let publication = pending.tagging.publication.as_deref();
        let plan = match analyze(&query.sql) {
            None => Ok(Plan::NotCached),
            Some(shape) => catalog::plan(db, &query.sql, &shape, publication).await,
        };
        match plan {
            Ok(plan) => {
                let plan = Arc::new(plan);
                pending.ready(Arc::clone(&plan));
                apply(&plan, query)
            }
            Err(LookupFailed) => query,
        }
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        read(&self.plans).bytes
    }
}

/// A lookup under way, made when the statement is marked: dropped before
/// it finished (failed, the caller gave up, or its future was never
/// polled), it clears its statement's mark so a later read tries again.
pub(crate) struct PendingLookup {
    tagging: Arc<TableTagging>,
    sql: Option<Arc<str>>,
}

impl PendingLookup {
    fn ready(&mut self, plan: Arc<Plan>) {
        if let Some(sql) = self.sql.take() {
            let until = Instant::now() + self.tagging.ttl;
            let ready = Slot::Ready {
                plan,
                until,
                refreshing: false,
            };
            let mut plans = write(&self.tagging.plans);
            // Forgotten meanwhile (to make room): remembered again only if
            // there is room.
            if plans.map.contains_key(&sql) || plans.make_room(sql.len()) {
                plans.insert(sql, ready);
            }
        }
    }
}

impl Drop for PendingLookup {
    fn drop(&mut self) {
        if let Some(sql) = self.sql.take() {
            let mut plans = write(&self.tagging.plans);
            match plans.map.get_mut(&sql) {
                Some(Slot::Pending) => plans.remove(&sql),
                // The old plan stays; the next read past its time retries.
                Some(Slot::Ready { refreshing, .. }) => *refreshing = false,
                None => {}
            }
        }
    }
}

/// `query` keyed and tagged by `plan` (unchanged if it is not cached).
fn apply(plan: &Plan, mut query: Query) -> Query {
    let tables = match plan {
        Plan::NotCached => return query,
        Plan::Tables(tables) => tables,
        Plan::Row {
            table,
            key,
            fallback,
        } => match row_key(key, &query) {
            Some(key) => {
                let row = tags::row_tag(table, &key);
                query.cache_key = Some(Arc::from(row.as_str()));
                query.tags.push(row);
                query.tags.push(tags::whole_table_tag(table));
                return query;
            }
            None => fallback,
        },
    };
    // The key name is a tag too (QueryPolicy): one of the tables'.
    query.cache_key = tables.first().map(|t| Arc::from(t.as_str()));
    query.tags.extend(tables.iter().cloned());
    query
}

/// The row's key as the change feed spells it, from `query`'s parameters
/// and the statement's literals.
fn row_key(sources: &[KeySource], query: &Query) -> Option<String> {
    let mut values: Vec<Option<String>> = Vec::with_capacity(sources.len());
    for source in sources {
        values.push(match source {
            KeySource::Param { index, ty } => {
                let param = query.params.get(*index)?;
                param_text(&**param, ty)?
            }
            KeySource::Literal(text) => Some(text.clone()),
        });
    }
    Some(tags::row_key(values.iter().map(Option::as_deref)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Tag;
    use tokio_postgres::types::Type;

    fn tables(names: &[&str]) -> Arc<[Tag]> {
        names.iter().map(|n| Tag::from(*n)).collect()
    }

    fn tag_names(q: &Query) -> Vec<&str> {
        q.tags.iter().map(Tag::as_str).collect()
    }

    #[test]
    fn a_row_plan_keys_by_the_row_and_falls_back_to_the_table() {
        let plan = Plan::Row {
            table: "docs".into(),
            key: vec![
                KeySource::Param {
                    index: 1,
                    ty: Type::TEXT,
                },
                KeySource::Literal("7".into()),
            ],
            fallback: tables(&["docs"]),
        };
        let read = Query::read("SELECT", Consistency::Any)
            .bind(0i64)
            .bind("a,b");
        let q = apply(&plan, read);
        assert_eq!(q.cache_key.as_deref(), Some("docs:a\\,b,7"));
        assert_eq!(tag_names(&q), ["docs:a\\,b,7", "docs:*"]);
        // A parameter that does not encode as the column's type: the table.
        let read = Query::read("SELECT", Consistency::Any)
            .bind(0i64)
            .bind(1.5f64);
        let q = apply(&plan, read);
        assert_eq!(q.cache_key.as_deref(), Some("docs"));
        assert_eq!(tag_names(&q), ["docs"]);
        // A missing parameter: the table (the query fails anyway).
        let q = apply(&plan, Query::read("SELECT", Consistency::Any));
        assert_eq!(tag_names(&q), ["docs"]);
    }

    #[test]
    fn a_table_plan_tags_every_table_and_not_cached_leaves_the_read_alone() {
        let q = apply(
            &Plan::Tables(tables(&["a", "app.b"])),
            Query::read("SELECT", Consistency::Any).tag("mine"),
        );
        assert_eq!(q.cache_key.as_deref(), Some("a"));
        assert_eq!(tag_names(&q), ["mine", "a", "app.b"]);
        let q = apply(&Plan::NotCached, Query::read("SELECT", Consistency::Any));
        assert!(q.cache_key.is_none() && q.tags.is_empty());
    }

    #[test]
    fn only_marked_reads_without_a_key_are_tagged_unless_all_are() {
        let marked = TableTagging::new(ReadCaching::Marked, Duration::from_secs(60), None);
        let all = TableTagging::new(ReadCaching::AllAnalyzable, Duration::from_secs(60), None);
        let plain = Query::read("SELECT 1", Consistency::Any);
        assert!(!marked.wants(&plain));
        assert!(all.wants(&plain));
        assert!(marked.wants(&plain.clone().cache_by_tables()));
        let keyed = plain.clone().cache_by_tables().cache_key("mine");
        assert!(!marked.wants(&keyed) && !all.wants(&keyed));
        let strong = Query::read("SELECT 1", Consistency::Strong).cache_by_tables();
        assert!(!marked.wants(&strong) && !all.wants(&strong));
        let bounded = Query::read(
            "SELECT 1",
            Consistency::BoundedStaleness(Duration::from_secs(1)),
        );
        assert!(!all.wants(&bounded));
        assert!(!all.wants(&Query::write("UPDATE t SET a = 1").cache_by_tables()));
    }

    fn tagging(ttl: Duration) -> Arc<TableTagging> {
        Arc::new(TableTagging::new(ReadCaching::Marked, ttl, None))
    }

    /// What `step` says for `sql`, and the lookup to finish if it is one.
    fn step(t: &Arc<TableTagging>, sql: &str) -> (&'static str, Option<PendingLookup>) {
        match t.step(Query::read(sql, Consistency::Any).cache_by_tables()) {
            Step::LookUp(_, pending) => ("look up", Some(pending)),
            Step::Go(q) if q.cache_key.is_some() => ("cached", None),
            Step::Go(_) => ("uncached", None),
        }
    }

    #[test]
    fn one_lookup_at_a_time_per_statement_and_plans_expire() {
        let sql = "SELECT a FROM t";
        let tagging = tagging(Duration::from_millis(50));
        let (what, lookup) = step(&tagging, sql);
        assert_eq!(what, "look up");
        // Meanwhile: uncached, no second lookup.
        assert_eq!(step(&tagging, sql).0, "uncached");
        // A lookup given up on clears its mark.
        drop(lookup);
        let (what, lookup) = step(&tagging, sql);
        assert_eq!(what, "look up");
        lookup
            .unwrap()
            .ready(Arc::new(Plan::Tables(tables(&["t"]))));
        assert_eq!(step(&tagging, sql).0, "cached");
        // Expired: one read looks it up again, the others keep the plan.
        std::thread::sleep(Duration::from_millis(60));
        let (what, lookup) = step(&tagging, sql);
        assert_eq!(what, "look up");
        assert_eq!(step(&tagging, sql).0, "cached");
        // That lookup failed: the next read tries again.
        drop(lookup);
        let (what, lookup) = step(&tagging, sql);
        assert_eq!(what, "look up");
        lookup.unwrap().ready(Arc::new(Plan::NotCached));
        assert_eq!(step(&tagging, sql).0, "uncached");
    }

    #[test]
    fn a_lookup_whose_step_is_dropped_unused_clears_the_mark() {
        let tagging = tagging(Duration::from_secs(60));
        let read = || Query::read("SELECT a FROM t", Consistency::Any).cache_by_tables();
        // The future that would run the lookup is dropped before its
        // first poll: the step itself goes.
        let first = tagging.step(read());
        assert!(matches!(first, Step::LookUp(..)));
        drop(first);
        assert!(
            matches!(tagging.step(read()), Step::LookUp(..)),
            "the statement stayed marked"
        );
    }

    #[test]
    fn plans_hold_a_bounded_amount_of_statement_text() {
        let tagging = tagging(Duration::from_secs(60));
        // Over the analysis limit: not cached, and not remembered.
        let huge = format!("SELECT a FROM t WHERE a = '{}'", "x".repeat(MAX_SQL_LEN));
        assert_eq!(step(&tagging, &huge).0, "uncached");
        assert_eq!(tagging.bytes(), 0);
        // Many long statements, each remembered: the total stays bounded.
        let long = |i: usize| {
            format!(
                "SELECT a FROM t WHERE a = '{}' AND b = {i}",
                "x".repeat(200_000)
            )
        };
        for i in 0..64 {
            let (what, lookup) = step(&tagging, &long(i));
            assert_eq!(what, "look up");
            lookup
                .unwrap()
                .ready(Arc::new(Plan::Tables(tables(&["t"]))));
            assert!(
                tagging.bytes() <= MAX_PLAN_BYTES,
                "{} bytes",
                tagging.bytes()
            );
        }
        assert_eq!(step(&tagging, &long(63)).0, "cached");
        let held: usize = read(&tagging.plans).map.keys().map(|k| k.len()).sum();
        assert_eq!(held, tagging.bytes());
    }
}
