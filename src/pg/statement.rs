//! Statements a pooled session must not run: they would end or change the
//! session for whoever gets it next (an open transaction block, a setting,
//! a prepared statement, a listener, a temporary object) or stall the
//! query protocol (`COPY` from or to the client). Refused by their leading
//! keywords, before anything is sent; and, anywhere in the statement
//! outside literals and comments, a `set_config` call that is not local to
//! the transaction.
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
const SET_CONFIG: &str = "pooled sessions are shared: a session-level setting would leak to \
     other requests (pass a literal true as set_config's third argument, is_local, inside a \
     transaction)";
const TEMPORARY: &str = "pooled sessions are shared: a temporary object would outlive the \
     request and shadow tables for later ones (ON COMMIT DROP, inside a transaction, is fine)";

/// Refuses `sql` if its leading keywords are one of the statements above,
/// or it changes a setting or creates a temporary object for the session.
pub(super) fn check(sql: &str, context: Context) -> Result<(), DbError> {
    leading(sql, context)?;
    let refuse =
        |keyword: &'static str, hint: &'static str| Err(DbError::Refused { keyword, hint });
    // Cheap first: most statements never name either.
    let has = |word: &[u8]| {
        sql.as_bytes()
            .windows(word.len())
            .any(|w| w.eq_ignore_ascii_case(word))
    };
    if !has(b"set_config") && !has(b"temp") {
        return Ok(());
    }
    let tokens = tokens(sql);
    if session_set_config(&tokens) {
        return refuse("set_config", SET_CONFIG);
    }
    if creates_temporary(&tokens) {
        return refuse("TEMPORARY", TEMPORARY);
    }
    Ok(())
}

fn leading(sql: &str, context: Context) -> Result<(), DbError> {
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

/// A token of SQL text, as far as the checks below need.
#[derive(Debug, PartialEq, Eq)]
enum Token {
    /// An unquoted word (keyword or identifier), upper-cased ASCII.
    Word(String),
    /// A quoted identifier, as written.
    Quoted(String),
    /// A literal (string, number, parameter): its content never matters.
    Literal,
    /// Any other character.
    Punct(u8),
}

fn word(t: Option<&Token>, w: &str) -> bool {
    matches!(t, Some(Token::Word(x)) if x == w)
}

/// Whether some `set_config(...)` is not called with a literal `true` as
/// its third (`is_local`) argument: its setting stays with the session.
fn session_set_config(tokens: &[Token]) -> bool {
    for (i, t) in tokens.iter().enumerate() {
        let named = match t {
            Token::Word(w) => w == "SET_CONFIG",
            Token::Quoted(q) => q == "set_config",
            _ => false,
        };
        if !named || tokens.get(i + 1) != Some(&Token::Punct(b'(')) {
            continue;
        }
        let mut depth = 0usize;
        let mut args: Vec<Vec<&Token>> = vec![Vec::new()];
        for t in &tokens[i + 2..] {
            match t {
                Token::Punct(b'(' | b'[') => depth += 1,
                Token::Punct(b')' | b']') if depth == 0 => break,
                Token::Punct(b')' | b']') => depth -= 1,
                Token::Punct(b',') if depth == 0 => {
                    args.push(Vec::new());
                    continue;
                }
                _ => {}
            }
            if let Some(arg) = args.last_mut() {
                arg.push(t);
            }
        }
        let local =
            args.len() == 3 && matches!(args[2].as_slice(), [Token::Word(w)] if w == "TRUE");
        if !local {
            return true;
        }
    }
    false
}

/// `CREATE [OR REPLACE] [GLOBAL | LOCAL] TEMP[ORARY] ...` or a `CREATE`
/// naming `pg_temp`, unless `ON COMMIT DROP`; `SELECT ... INTO [GLOBAL |
/// LOCAL] TEMP[ORARY] ...`.
fn creates_temporary(tokens: &[Token]) -> bool {
    let temp = |t: Option<&Token>| word(t, "TEMP") || word(t, "TEMPORARY");
    let scope = |t: Option<&Token>| word(t, "GLOBAL") || word(t, "LOCAL");
    match tokens.first() {
        Some(Token::Word(w)) if w == "CREATE" => {
            let mut rest = tokens[1..]
                .iter()
                .skip_while(|t| word(Some(t), "OR") || word(Some(t), "REPLACE") || scope(Some(t)));
            let temporary = temp(rest.next())
                || tokens.iter().any(|t| match t {
                    Token::Word(w) => w == "PG_TEMP" || w.starts_with("PG_TEMP_"),
                    Token::Quoted(q) => q == "pg_temp" || q.starts_with("pg_temp_"),
                    _ => false,
                });
            let dropped = tokens.windows(3).any(|w| {
                word(Some(&w[0]), "ON") && word(Some(&w[1]), "COMMIT") && word(Some(&w[2]), "DROP")
            });
            temporary && !dropped
        }
        Some(Token::Word(w)) if w == "SELECT" => tokens.windows(3).any(|w| {
            word(Some(&w[0]), "INTO")
                && (temp(Some(&w[1])) || (scope(Some(&w[1])) && temp(Some(&w[2]))))
        }),
        _ => false,
    }
}

/// The index just past the string literal whose content starts at `i`
/// (`''` doubles a quote; with `backslash`, `\` escapes a character).
fn skip_string(b: &[u8], mut i: usize, backslash: bool) -> usize {
    while i < b.len() {
        match b[i] {
            b'\\' if backslash => i += 2,
            b'\'' if b.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

/// `sql`'s tokens: comments and white space skipped, literals (standard,
/// `E'...'`, dollar-quoted) opaque, quoted identifiers unquoted.
fn tokens(sql: &str) -> Vec<Token> {
    spanned(sql).into_iter().map(|(t, _)| t).collect()
}

/// `sql` without trailing `;` and what follows its last other token
/// (comments, white space): the statement as the body of a subquery.
#[cfg(feature = "shard")]
pub(crate) fn query_body(sql: &str) -> &str {
    let mut spanned = spanned(sql);
    while matches!(spanned.last(), Some((Token::Punct(b';'), _))) {
        spanned.pop();
    }
    spanned
        .last()
        .map_or("", |&(_, end)| sql.get(..end).unwrap_or(sql))
}

/// [`tokens`], each with the index just past it.
fn spanned(sql: &str) -> Vec<(Token, usize)> {
    let b = sql.as_bytes();
    let mut out = Vec::new();
    let mut ends = Vec::new();
    let mut i = 0;
    let is_word = |c: u8| c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80;
    while i < b.len() {
        let c = b[i];
        match c {
            b'-' if b.get(i + 1) == Some(&b'-') => {
                i = b[i..]
                    .iter()
                    .position(|&c| c == b'\n')
                    .map_or(b.len(), |p| i + p);
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                let mut depth = 0usize;
                while i < b.len() {
                    match (b[i], b.get(i + 1)) {
                        (b'/', Some(b'*')) => {
                            depth += 1;
                            i += 2;
                        }
                        (b'*', Some(b'/')) => {
                            depth -= 1;
                            i += 2;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => i += 1,
                    }
                }
            }
            b'\'' => {
                i = skip_string(b, i + 1, false);
                out.push(Token::Literal);
            }
            b'"' => {
                let mut name = Vec::new();
                i += 1;
                while i < b.len() {
                    match (b[i], b.get(i + 1)) {
                        (b'"', Some(b'"')) => {
                            name.push(b'"');
                            i += 2;
                        }
                        (b'"', _) => {
                            i += 1;
                            break;
                        }
                        (c, _) => {
                            name.push(c);
                            i += 1;
                        }
                    }
                }
                out.push(Token::Quoted(String::from_utf8_lossy(&name).into_owned()));
            }
            b'$' => {
                // `$1`, or `$tag$ ... $tag$`.
                let tag_end = b[i + 1..]
                    .iter()
                    .position(|&c| !(c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80))
                    .map(|p| i + 1 + p);
                match tag_end {
                    Some(end)
                        if b[end] == b'$' && !b.get(i + 1).is_some_and(u8::is_ascii_digit) =>
                    {
                        let tag = &b[i..=end];
                        i = b[end + 1..]
                            .windows(tag.len())
                            .position(|w| w == tag)
                            .map_or(b.len(), |p| end + 1 + p + tag.len());
                    }
                    _ => {
                        i += 1;
                        while i < b.len() && b[i].is_ascii_digit() {
                            i += 1;
                        }
                    }
                }
                out.push(Token::Literal);
            }
            c if c.is_ascii_digit() => {
                while i < b.len() && (is_word(b[i]) || b[i] == b'.') {
                    i += 1;
                }
                out.push(Token::Literal);
            }
            c if is_word(c) => {
                let start = i;
                while i < b.len() && is_word(b[i]) {
                    i += 1;
                }
                let w = String::from_utf8_lossy(&b[start..i]).to_ascii_uppercase();
                // `E'...'`: backslash escapes; `U&'...'`, `B'...'`, `X'...'`:
                // plain strings after their prefix.
                if w == "E" && b.get(i) == Some(&b'\'') {
                    i = skip_string(b, i + 1, true);
                    out.push(Token::Literal);
                } else {
                    out.push(Token::Word(w));
                }
            }
            c if c.is_ascii_whitespace() => i += 1,
            c => {
                out.push(Token::Punct(c));
                i += 1;
            }
        }
        ends.resize(out.len(), i);
    }
    out.into_iter().zip(ends).collect()
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

    #[cfg(feature = "shard")]
    #[test]
    fn a_query_body_loses_trailing_semicolons_and_comments_only() {
        assert_eq!(super::query_body("SELECT 1;  -- done\n"), "SELECT 1");
        assert_eq!(super::query_body("SELECT ';' ; ; /* x */"), "SELECT ';'");
        assert_eq!(super::query_body("SELECT $$a;$$"), "SELECT $$a;$$");
        assert_eq!(super::query_body("SELECT 'é' -- é"), "SELECT 'é'");
        assert_eq!(super::query_body(" ; "), "");
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

    #[test]
    fn session_level_set_config_and_temporary_objects_are_refused() {
        use Context::{Pooled, Transaction};
        for sql in [
            "SELECT set_config('search_path', 'evil', false)",
            "select pg_catalog.SET_CONFIG('search_path', 'evil', FALSE)",
            "SELECT \"set_config\"('a.b', 'c', $1)",
            "SELECT set_config('a.b', (SELECT 'x'), 'true')",
            "SELECT set_config(setting_name => 'a.b', new_value => 'c', is_local => true)",
            "SELECT 1, /* ) */ set_config('a.b', 'c', false) FROM t WHERE x = ')'",
            "SELECT set_config('a.b', set_config('c.d', 'e', false), true)",
            "CREATE TEMP TABLE users (id int)",
            "create or replace temporary view v as select 1",
            "CREATE LOCAL TEMPORARY TABLE t AS SELECT 1",
            "CREATE GLOBAL TEMP SEQUENCE s",
            "CREATE TABLE pg_temp.users (id int)",
            "CREATE FUNCTION pg_temp.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
            "SELECT * INTO TEMP t FROM users",
            "SELECT * INTO LOCAL TEMPORARY t FROM users",
        ] {
            assert!(refused(sql, Pooled), "pooled: {sql}");
            assert!(refused(sql, Transaction), "transaction: {sql}");
        }
        for sql in [
            "SELECT set_config('a.b', 'c', true)",
            "SELECT set_config('a.b', concat('c', 'd'), TRUE), 'set_config(x, y, false)'",
            "SELECT $$ set_config('a', 'b', false) $$, E'\\' set_config(', 1",
            "-- set_config('a', 'b', false)\nSELECT 1",
            "SELECT set_config_value FROM settings",
            "CREATE TEMP TABLE t (id int) ON COMMIT DROP",
            "CREATE TABLE temp (id int)",
            "INSERT INTO temp VALUES (1)",
            "SELECT temp FROM readings WHERE note = 'INTO TEMP'",
            "SELECT $1::text, temp FROM x",
        ] {
            assert!(!refused(sql, Pooled), "pooled: {sql}");
            assert!(!refused(sql, Transaction), "transaction: {sql}");
        }
    }
}
