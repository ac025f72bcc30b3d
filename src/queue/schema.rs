//! The jobs table and every statement on it, spelled once per table.

use crate::error::ConfigError;

/// The statements of one jobs table (its name validated and quoted).
#[derive(Debug)]
pub(crate) struct Sql {
    /// The table as written in SQL (`"name"` or `"schema"."name"`).
    pub(crate) table: String,
    /// The notification channel: the table's name as given.
    pub(crate) channel: String,
    pub(crate) create: Vec<String>,
    pub(crate) enqueue: String,
    pub(crate) existing: String,
    pub(crate) claim: String,
    pub(crate) complete: String,
    pub(crate) fail: String,
    pub(crate) release: String,
    pub(crate) heartbeat: String,
    pub(crate) orphans: String,
    pub(crate) reap: String,
    pub(crate) depth: String,
    pub(crate) dead: String,
    pub(crate) retry_dead: String,
}

/// Checks a table name: `name` or `schema.name`, each part lower-case
/// ASCII letters, digits and `_`, not starting with a digit, at most 48
/// bytes (index names add a suffix within PostgreSQL's 63), and the whole
/// at most 63 bytes (it is the notification channel's name).
pub(crate) fn check_table(name: &str) -> Result<(Option<&str>, &str), ConfigError> {
    let bad = |reason: &str| ConfigError::OutOfRange {
        field: "queue table",
        reason: format!("{name:?}: {reason}"),
    };
    if name.len() > 63 {
        return Err(bad(
            "at most 63 bytes in all (the name is also its NOTIFY channel's)",
        ));
    }
    let (schema, table) = match name.split_once('.') {
        Some((s, t)) => (Some(s), t),
        None => (None, name),
    };
    for part in schema.iter().chain(std::iter::once(&table)) {
        if part.is_empty() || part.len() > 48 {
            return Err(bad("each part must be 1 to 48 bytes"));
        }
        if part.starts_with(|c: char| c.is_ascii_digit())
            || !part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(bad(
                "use lower-case letters, digits and `_`, not starting with a digit",
            ));
        }
    }
    Ok((schema, table))
}

impl Sql {
    pub(crate) fn new(name: &str) -> Result<Self, ConfigError> {
        let (schema, bare) = check_table(name)?;
        let t = match schema {
            Some(s) => format!("\"{s}\".\"{bare}\""),
            None => format!("\"{bare}\""),
        };
        let create = vec![
            format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                queue text NOT NULL,
                payload jsonb NOT NULL,
                priority smallint NOT NULL DEFAULT 0,
                run_at timestamptz NOT NULL,
                state text NOT NULL DEFAULT 'ready' CHECK (state IN ('ready', 'running', 'dead')),
                attempts integer NOT NULL DEFAULT 0,
                max_attempts integer NOT NULL CHECK (max_attempts > 0),
                lease_until timestamptz,
                owner bigint,
                idempotency_key text,
                last_error text,
                enqueued_at timestamptz NOT NULL
             ) WITH (fillfactor = 80, autovacuum_vacuum_scale_factor = 0.01,
                     autovacuum_vacuum_threshold = 1000, autovacuum_vacuum_cost_delay = 0)"
            ),
            format!(
                "CREATE UNIQUE INDEX IF NOT EXISTS \"{bare}_idempotency\" ON {t}
                 (queue, idempotency_key) WHERE idempotency_key IS NOT NULL"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS \"{bare}_ready\" ON {t}
                 (queue, priority DESC, run_at, id) WHERE state = 'ready'"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS \"{bare}_lease\" ON {t}
                 (queue, lease_until) WHERE state = 'running'"
            ),
        ];
        Ok(Self {
            channel: name.to_string(),
            create,
            // $8: notify now (the job is due); notified at commit.
            enqueue: format!(
                "WITH ins AS (
                    INSERT INTO {t} (queue, payload, priority, run_at, max_attempts,
                                     idempotency_key, enqueued_at)
                    VALUES ($1, $2, $3, $4, $5, $6, $7)
                    ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL
                    DO NOTHING
                    RETURNING id
                 )
                 SELECT id, CASE WHEN $8 THEN pg_notify($9, $1)::text END FROM ins"
            ),
            existing: format!("SELECT id FROM {t} WHERE queue = $1 AND idempotency_key = $2"),
            // $6: jobs this worker finished, deleted in the same round trip.
            // Every statement on a batch of ids names them with `id = ANY`
            // as well as through `unnest`: an index condition, so the
            // planner never hash-joins the whole table (it did, under a
            // backlog: 16 ms a claim). And it says "running" as "neither
            // ready nor dead" (the same, by the CHECK): `state = 'running'`
            // matches the lease index's predicate, and the planner ANDed a
            // bitmap scan of that whole index (dead entries included) with
            // the ids' lookup, 10% of the server's time under load (perf).
            claim: format!(
                "WITH done AS (
                    DELETE FROM {t} AS d USING unnest($6::bigint[], $7::int[]) AS f(id, n)
                    WHERE d.id = ANY($6) AND d.id = f.id AND d.attempts = f.n AND d.owner = $5
                      AND d.state <> 'ready' AND d.state <> 'dead'
                 ),
                 c AS (
                    SELECT id FROM {t}
                    WHERE queue = $1 AND state = 'ready' AND run_at <= $2
                    ORDER BY priority DESC, run_at, id
                    LIMIT $3
                    FOR UPDATE SKIP LOCKED
                 )
                 UPDATE {t} AS j
                 SET state = 'running', attempts = j.attempts + 1, lease_until = $4, owner = $5
                 FROM c WHERE j.id = c.id
                 RETURNING j.id, j.payload, j.attempts, j.max_attempts, j.priority,
                           j.enqueued_at, j.run_at"
            ),
            complete: format!(
                "DELETE FROM {t} AS d USING unnest($1::bigint[], $2::int[]) AS f(id, n)
                 WHERE d.id = ANY($1) AND d.id = f.id AND d.attempts = f.n AND d.owner = $3 AND d.state <> 'ready' AND d.state <> 'dead'"
            ),
            fail: format!(
                "UPDATE {t} AS j SET
                    state = CASE WHEN j.attempts >= j.max_attempts THEN 'dead' ELSE 'ready' END,
                    run_at = CASE WHEN j.attempts >= j.max_attempts THEN j.run_at ELSE f.at END,
                    last_error = f.err, owner = NULL, lease_until = NULL
                 FROM unnest($1::bigint[], $2::text[], $3::timestamptz[], $5::int[])
                      AS f(id, err, at, n)
                 WHERE j.id = ANY($1) AND j.id = f.id AND j.attempts = f.n AND j.owner = $4 AND j.state <> 'ready' AND j.state <> 'dead'
                 RETURNING j.state"
            ),
            release: format!(
                "UPDATE {t} AS j SET state = 'ready', owner = NULL, lease_until = NULL,
                    attempts = greatest(j.attempts - 1, 0)
                 FROM unnest($1::bigint[], $3::int[]) AS f(id, n)
                 WHERE j.id = ANY($1) AND j.id = f.id AND j.attempts = f.n AND j.owner = $2
                   AND j.state <> 'ready' AND j.state <> 'dead'"
            ),
            heartbeat: format!(
                "UPDATE {t} AS j SET lease_until = $3
                 FROM unnest($1::bigint[], $4::int[]) AS f(id, n)
                 WHERE j.id = ANY($1) AND j.id = f.id AND j.attempts = f.n AND j.owner = $2
                   AND j.state <> 'ready' AND j.state <> 'dead'
                 RETURNING j.id"
            ),
            // A claim whose outcome is unknown: what this worker holds
            // but does not track was claimed by it and never started.
            orphans: format!(
                "UPDATE {t} SET state = 'ready', owner = NULL, lease_until = NULL,
                    attempts = greatest(attempts - 1, 0)
                 WHERE queue = $1 AND owner = $2 AND state = 'running' AND id <> ALL($3)"
            ),
            reap: format!(
                "UPDATE {t} SET
                    state = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'ready' END,
                    last_error = 'lease expired: the worker holding it stopped renewing it',
                    owner = NULL, lease_until = NULL
                 WHERE queue = $1 AND state = 'running' AND lease_until < $2
                 RETURNING state"
            ),
            depth: format!(
                "SELECT count(*) FILTER (WHERE state = 'ready' AND run_at <= $2),
                        count(*) FILTER (WHERE state = 'ready' AND run_at > $2),
                        count(*) FILTER (WHERE state = 'running'),
                        count(*) FILTER (WHERE state = 'dead'),
                        min(run_at) FILTER (WHERE state = 'ready' AND run_at <= $2)
                 FROM {t} WHERE queue = $1"
            ),
            dead: format!(
                "SELECT id, payload, attempts, last_error, enqueued_at FROM {t}
                 WHERE queue = $1 AND state = 'dead' ORDER BY id LIMIT $2"
            ),
            retry_dead: format!(
                "UPDATE {t} SET state = 'ready', attempts = 0, run_at = $3, last_error = NULL
                 WHERE id = $2 AND queue = $1 AND state = 'dead'"
            ),
            table: t,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_checked() {
        for good in ["jobs", "tower_scale_jobs", "app.jobs", "_x1"] {
            assert!(check_table(good).is_ok(), "{good}");
        }
        let long = format!("{}.{}", "s".repeat(30), "t".repeat(40));
        for bad in [
            long.as_str(),
            "",
            "Jobs",
            "1jobs",
            "jobs;drop",
            "a.b.c",
            "j\"x",
            ".jobs",
            "jobs.",
            "a b",
            &"x".repeat(49),
        ] {
            assert!(check_table(bad).is_err(), "{bad:?}");
        }
        let sql = Sql::new("app.jobs").unwrap();
        assert_eq!(sql.table, "\"app\".\"jobs\"");
        assert!(sql.create[2].contains("\"jobs_ready\" ON \"app\".\"jobs\""));
    }
}
