//! From pgoutput messages to the tags one committed transaction
//! invalidates, in bounded memory.

use std::collections::{HashMap, HashSet};

use super::pgoutput::{Malformed, Message, Relation, Value, decode};
use super::tags::{Change, row_key, table_name};

/// A relation as the feed keeps it: its tag name and where its key is.
struct Known {
    table: String,
    /// Indexes of the replica-identity columns; empty when rows cannot be
    /// told apart (identity `full` or `nothing`): every change is then a
    /// whole-table change.
    key_columns: Vec<usize>,
}

/// What one table's changes in the open transaction come to.
#[derive(Default)]
struct Touched {
    rows: HashSet<String>,
    whole: bool,
}

/// The open transaction's changes, and the relations seen on this stream.
pub(crate) struct Decoder {
    relations: HashMap<u32, Known>,
    open: HashMap<u32, Touched>,
    /// Rows of one table tracked one by one in a transaction; past it the
    /// table is invalidated whole.
    row_limit: usize,
    rows: u64,
}

/// What a committed transaction invalidates: per table, whether the whole
/// table changed or which rows.
pub(crate) struct Committed {
    pub(crate) tables: Vec<(String, bool, Vec<String>)>,
    pub(crate) rows: u64,
}

impl Committed {
    /// Every change, in the order the tags are sent: per table the table,
    /// then its rows or the whole table.
    pub(crate) fn for_each_change(&self, mut f: impl FnMut(Change<'_>)) {
        for (table, whole, rows) in &self.tables {
            f(Change::Table { table });
            if *whole {
                f(Change::Whole { table });
            } else {
                for key in rows {
                    f(Change::Row { table, key });
                }
            }
        }
    }
}

impl Decoder {
    pub(crate) fn new(row_limit: usize) -> Self {
        Self {
            relations: HashMap::new(),
            open: HashMap::new(),
            row_limit: row_limit.max(1),
            rows: 0,
        }
    }

    /// A transaction begins (anything left open was not committed: it is
    /// dropped).
    pub(crate) fn begin(&mut self) {
        self.open.clear();
        self.rows = 0;
    }

    /// One XLogData payload of the open transaction.
    pub(crate) fn message(&mut self, data: &[u8]) -> Result<(), Malformed> {
        match decode(data)? {
            Message::Relation(rel) => {
                let id = rel.id;
                self.relations.insert(id, known(&rel));
                // A relation message comes before the first change of the
                // table on this stream and after its schema changed: the
                // feed cannot tell which, so it is a whole-table change.
                self.touched(id).whole = true;
            }
            Message::Change {
                relation, old, new, ..
            } => {
                self.rows += 1;
                let Some(known) = self.relations.get(&relation) else {
                    return Err(Malformed("change to a relation not described first"));
                };
                let mut keys = Vec::with_capacity(2);
                let mut whole = known.key_columns.is_empty();
                for tuple in [old.as_ref(), new.as_ref()].into_iter().flatten() {
                    match key_of(&known.key_columns, tuple) {
                        Some(k) => keys.push(k),
                        None => whole = true,
                    }
                }
                // An update that did not change the key sends no old key:
                // the new row's key is the row.
                let limit = self.row_limit;
                let touched = self.touched(relation);
                if whole {
                    touched.whole = true;
                }
                if !touched.whole {
                    for k in keys {
                        touched.rows.insert(k);
                    }
                    if touched.rows.len() > limit {
                        touched.whole = true;
                    }
                }
                if touched.whole {
                    touched.rows = HashSet::new();
                }
            }
            Message::Truncate(ids) => {
                for id in ids {
                    let touched = self.touched(id);
                    touched.whole = true;
                    touched.rows = HashSet::new();
                }
            }
            Message::Other(_) => {}
        }
        Ok(())
    }

    /// The open transaction committed: what it invalidates.
    pub(crate) fn commit(&mut self) -> Result<Committed, Malformed> {
        let mut tables = Vec::with_capacity(self.open.len());
        for (id, touched) in self.open.drain() {
            let Some(known) = self.relations.get(&id) else {
                return Err(Malformed("truncation of a relation not described first"));
            };
            let rows = touched.rows.into_iter().collect();
            tables.push((known.table.clone(), touched.whole, rows));
        }
        let rows = std::mem::take(&mut self.rows);
        Ok(Committed { tables, rows })
    }

    fn touched(&mut self, id: u32) -> &mut Touched {
        self.open.entry(id).or_default()
    }
}

fn known(rel: &Relation) -> Known {
    let key_columns = if rel.identity == b'f' || rel.identity == b'n' {
        Vec::new()
    } else {
        rel.columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.key)
            .map(|(i, _)| i)
            .collect()
    };
    Known {
        table: table_name(&rel.schema, &rel.name),
        key_columns,
    }
}

/// The row's key from a tuple (`None` when a key column is missing,
/// unchanged-TOAST or binary).
fn key_of(columns: &[usize], tuple: &[Value<'_>]) -> Option<String> {
    let mut parts = Vec::with_capacity(columns.len());
    for &i in columns {
        match tuple.get(i)? {
            Value::Null => parts.push(None),
            Value::Text(t) => parts.push(Some(std::str::from_utf8(t).ok()?)),
            Value::Unchanged | Value::Binary(_) => return None,
        }
    }
    Some(row_key(parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation(id: u32, identity: u8) -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(id.to_be_bytes());
        b.extend(b"public\0t\0");
        b.push(identity);
        b.extend(2u16.to_be_bytes());
        for (flag, name) in [(1u8, "id"), (0, "v")] {
            b.push(flag);
            b.extend(name.as_bytes());
            b.push(0);
            b.extend(25u32.to_be_bytes());
            b.extend((-1i32).to_be_bytes());
        }
        b
    }

    fn insert(id: u32, key: &str) -> Vec<u8> {
        let mut b = vec![b'I'];
        b.extend(id.to_be_bytes());
        b.push(b'N');
        b.extend(2u16.to_be_bytes());
        b.push(b't');
        b.extend(u32::try_from(key.len()).unwrap_or(0).to_be_bytes());
        b.extend(key.as_bytes());
        b.push(b'n');
        b
    }

    fn changes(c: &Committed) -> Vec<String> {
        let mut out = Vec::new();
        c.for_each_change(|ch| out.push(ch.default_tag().to_string()));
        out.sort();
        out
    }

    #[test]
    fn rows_then_whole_table_past_the_limit() {
        let mut d = Decoder::new(2);
        d.begin();
        assert!(d.message(&relation(1, b'd')).is_ok());
        assert!(d.commit().is_ok());
        d.begin();
        assert!(d.message(&insert(1, "a,b")).is_ok());
        assert!(d.message(&insert(1, "c")).is_ok());
        let Ok(c) = d.commit() else { panic!("commit") };
        assert_eq!(changes(&c), ["t", "t:a\\,b", "t:c"]);
        d.begin();
        for k in ["1", "2", "3"] {
            assert!(d.message(&insert(1, k)).is_ok());
        }
        let Ok(c) = d.commit() else { panic!("commit") };
        assert_eq!(changes(&c), ["t", "t:*"]);
    }

    #[test]
    fn full_identity_and_unknown_relations() {
        let mut d = Decoder::new(10);
        d.begin();
        assert!(d.message(&insert(9, "x")).is_err());
        d.begin();
        assert!(d.message(&relation(2, b'f')).is_ok());
        assert!(d.message(&insert(2, "x")).is_ok());
        let Ok(c) = d.commit() else { panic!("commit") };
        assert_eq!(changes(&c), ["t", "t:*"]);
    }
}
