//! Statements a pooled session must not run: they would end or change the
//! session for whoever gets it next (an open transaction block, a setting,
//! a prepared statement, a listener) or stall the query protocol (`COPY`
//! from or to the client). Refused by their leading keywords, before
//! anything is sent.
//!
//! An autocommit `BEGIN` left the session inside a transaction block: every
//! later write on it was answered as committed, with a token, and never
//! committed. Inside a transaction, `ROLLBACK` then `BEGIN` let `commit`
//! succeed though the first half had been rolled back.

use super::error::DbError;

/// Where a statement is about to run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Context {
    /// An autocommit write or a read on a pooled session.
    Pooled,
    /// Inside a [`Transaction`](super::Transaction).
    Transaction,
}

const USE_TRANSACTION: &str = "use Db::transaction() and its commit() or rollback()";
const USE_COMMIT: &str =
    "end the transaction with its commit() or rollback() (savepoints are fine)";
const SESSION_STATE: &str = "pooled sessions are shared: session state would leak to other \
     requests (use SET LOCAL inside a transaction, or set it per node in the connection options)";
const NO_COPY: &str = "COPY to or from the client cannot run through this query protocol";

/// Refuses `sql` if its leading keywords are one of the statements above.
pub(super) fn check(sql: &str, context: Context) -> Result<(), DbError> {
    let mut words = Words::new(sql);
    let Some(first) = words.next() else {
        return Ok(());
    };
    let refuse =
        |keyword: &'static str, hint: &'static str| Err(DbError::Refused { keyword, hint });
    let pooled = context == Context::Pooled;
    match first.as_str() {
        "BEGIN" => refuse("BEGIN", if pooled { USE_TRANSACTION } else { USE_COMMIT }),
        "START" => refuse(
            "START TRANSACTION",
            if pooled { USE_TRANSACTION } else { USE_COMMIT },
        ),
        "COMMIT" | "END" => refuse("COMMIT", if pooled { USE_TRANSACTION } else { USE_COMMIT }),
        "ABORT" => refuse("ABORT", if pooled { USE_TRANSACTION } else { USE_COMMIT }),
        "ROLLBACK" => {
            // `ROLLBACK TO [SAVEPOINT] name` stays inside the transaction.
            if !pooled && words.next().as_deref() == Some("TO") {
                Ok(())
            } else {
                refuse(
                    "ROLLBACK",
                    if pooled { USE_TRANSACTION } else { USE_COMMIT },
                )
            }
        }
        "SAVEPOINT" | "RELEASE" if pooled => refuse("SAVEPOINT", USE_TRANSACTION),
        "PREPARE" => {
            if words.next().as_deref() == Some("TRANSACTION") {
                refuse("PREPARE TRANSACTION", USE_COMMIT)
            } else {
                refuse("PREPARE", SESSION_STATE)
            }
        }
        "SET" => match words.next().as_deref() {
            // Both end with the transaction.
            Some("LOCAL" | "TRANSACTION" | "CONSTRAINTS") if !pooled => Ok(()),
            _ => refuse("SET", SESSION_STATE),
        },
        "RESET" => refuse("RESET", SESSION_STATE),
        "DISCARD" => refuse("DISCARD", SESSION_STATE),
        "DEALLOCATE" => refuse("DEALLOCATE", SESSION_STATE),
        "LISTEN" => refuse("LISTEN", SESSION_STATE),
        "UNLISTEN" => refuse("UNLISTEN", SESSION_STATE),
        "COPY" if words.any(|w| w == "STDIN" || w == "STDOUT") => refuse("COPY", NO_COPY),
        _ => Ok(()),
    }
}

/// The words of SQL text, upper-cased ASCII, skipping white space and
/// comments (`-- ...` and nested `/* ... */`); anything else (quotes,
/// punctuation) separates words.
struct Words<'a> {
    rest: &'a [u8],
}

impl<'a> Words<'a> {
    fn new(sql: &'a str) -> Self {
        Self {
            rest: sql.as_bytes(),
        }
    }

    fn skip_comments(&mut self) {
        loop {
            let before = self.rest.len();
            while let [c, tail @ ..] = self.rest
                && !c.is_ascii_alphanumeric()
                && *c != b'_'
                && *c != b'-'
                && *c != b'/'
            {
                self.rest = tail;
            }
            match self.rest {
                [b'-', b'-', tail @ ..] => {
                    let end = tail.iter().position(|&c| c == b'\n').unwrap_or(tail.len());
                    self.rest = &tail[end..];
                }
                [b'/', b'*', tail @ ..] => {
                    let mut depth = 1usize;
                    let mut i = 0;
                    while i < tail.len() && depth > 0 {
                        match (tail[i], tail.get(i + 1)) {
                            (b'/', Some(b'*')) => {
                                depth += 1;
                                i += 2;
                            }
                            (b'*', Some(b'/')) => {
                                depth -= 1;
                                i += 2;
                            }
                            _ => i += 1,
                        }
                    }
                    self.rest = &tail[i..];
                }
                [b'-' | b'/', tail @ ..] => self.rest = tail,
                _ => {}
            }
            if self.rest.len() == before {
                return;
            }
        }
    }
}

impl Iterator for Words<'_> {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        self.skip_comments();
        let end = self
            .rest
            .iter()
            .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
            .unwrap_or(self.rest.len());
        if end == 0 {
            return None;
        }
        let word = String::from_utf8_lossy(&self.rest[..end]).to_ascii_uppercase();
        self.rest = &self.rest[end..];
        Some(word)
    }
}

#[cfg(test)]
mod tests {
    use super::{Context, check};

    fn refused(sql: &str, context: Context) -> bool {
        check(sql, context).is_err()
    }

    #[test]
    fn transaction_control_and_session_state_are_refused_where_they_would_leak() {
        use Context::{Pooled, Transaction};
        for sql in [
            "BEGIN",
            "  begin isolation level repeatable read",
            "/* a /* nested */ comment */ BEGIN",
            "-- note\nStart Transaction",
            "COMMIT",
            "end",
            "ROLLBACK",
            "abort",
            "SAVEPOINT a",
            "RELEASE a",
            "PREPARE TRANSACTION 'x'",
            "PREPARE q AS SELECT 1",
            "SET search_path = evil",
            "set local statement_timeout = 1",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "RESET ALL",
            "DISCARD ALL",
            "DEALLOCATE ALL",
            "LISTEN c",
            "UNLISTEN *",
            "COPY t FROM STDIN",
            "copy (select 1) to stdout",
        ] {
            assert!(refused(sql, Pooled), "pooled: {sql}");
        }
        for sql in [
            "BEGIN",
            "COMMIT",
            "END",
            "ROLLBACK",
            "ABORT",
            "PREPARE TRANSACTION 'x'",
            "SET search_path = evil",
            "RESET ALL",
            "COPY t FROM STDIN",
        ] {
            assert!(refused(sql, Transaction), "transaction: {sql}");
        }
        for sql in [
            "SAVEPOINT a",
            "RELEASE SAVEPOINT a",
            "ROLLBACK TO SAVEPOINT a",
            "rollback to a",
            "SET LOCAL statement_timeout = 1000",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
        ] {
            assert!(!refused(sql, Transaction), "transaction: {sql}");
        }
        for sql in [
            "",
            "SELECT 1",
            "select 'BEGIN'",
            "-- BEGIN\nSELECT 1",
            "/* COMMIT */ UPDATE t SET n = 1",
            "INSERT INTO settings (k) VALUES ('SET')",
            "WITH x AS (SELECT 1) SELECT * FROM x",
            "COPY t TO '/tmp/file'",
            "beginning",
            "/* unterminated",
            "-",
        ] {
            assert!(!refused(sql, Pooled), "pooled: {sql}");
        }
    }
}
