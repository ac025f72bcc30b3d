//! The `pgoutput` messages the feed reads (protocol version 1): relations,
//! row changes and truncations. Begin and commit arrive already decoded
//! from the replication crate.
//!
//! Every read is bounds-checked: a message that does not parse is a
//! [`Malformed`] error (the feed then reconnects and replays), never a
//! panic.

use std::fmt;

/// A message that does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Malformed(pub(crate) &'static str);

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed pgoutput message: {}", self.0)
    }
}

/// One column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Column {
    /// Part of the replica identity (the key).
    pub(crate) key: bool,
    pub(crate) name: String,
    pub(crate) type_oid: u32,
}

/// A relation (`R`) message: a table's name and columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relation {
    pub(crate) id: u32,
    pub(crate) schema: String,
    pub(crate) name: String,
    /// `d` (default: the primary key), `n` (nothing), `f` (full), `i` (index).
    pub(crate) identity: u8,
    pub(crate) columns: Vec<Column>,
}

/// One value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value<'a> {
    Null,
    /// An unchanged TOASTed value (not sent).
    Unchanged,
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Message<'a> {
    Relation(Relation),
    /// An insert, update or delete of a row of `relation`: `old` is the old
    /// key (`K`) or old row (`O`) when sent, `new` the new row.
    Change {
        /// `b'I'`, `b'U'` or `b'D'` (an UPDATE without an old tuple looks
        /// like an INSERT otherwise).
        kind: u8,
        relation: u32,
        old: Option<Vec<Value<'a>>>,
        new: Option<Vec<Value<'a>>>,
    },
    Truncate(Vec<u32>),
    /// Anything the feed does not act on (type, origin, begin/commit when
    /// passed raw, logical messages).
    Other(u8),
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], Malformed> {
        if self.buf.len() < n {
            return Err(Malformed(what));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, Malformed> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, Malformed> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, Malformed> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstr(&mut self, what: &'static str) -> Result<String, Malformed> {
        let end = self
            .buf
            .iter()
            .position(|b| *b == 0)
            .ok_or(Malformed(what))?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<Value<'a>>, Malformed> {
        let n = self.u16("tuple column count")?;
        // Each value takes at least one byte: a count above what is left
        // is a lie, not an allocation to make.
        if usize::from(n) > self.buf.len() {
            return Err(Malformed("tuple column count"));
        }
        let mut values = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            let value = match self.u8("tuple value kind")? {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                kind @ (b't' | b'b') => {
                    let len = self.u32("tuple value length")?;
                    let len = usize::try_from(len).map_err(|_| Malformed("tuple value length"))?;
                    let bytes = self.take(len, "tuple value")?;
                    if kind == b't' {
                        Value::Text(bytes)
                    } else {
                        Value::Binary(bytes)
                    }
                }
                _ => return Err(Malformed("tuple value kind")),
            };
            values.push(value);
        }
        Ok(values)
    }
}

/// Decodes one pgoutput message.
pub(crate) fn decode(data: &[u8]) -> Result<Message<'_>, Malformed> {
    let mut r = Reader { buf: data };
    let tag = r.u8("message tag")?;
    match tag {
        b'R' => {
            let id = r.u32("relation id")?;
            let schema = r.cstr("relation schema")?;
            let name = r.cstr("relation name")?;
            let identity = r.u8("replica identity")?;
            let n = r.u16("relation column count")?;
            if usize::from(n) > r.buf.len() {
                return Err(Malformed("relation column count"));
            }
            let mut columns = Vec::with_capacity(usize::from(n));
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                let name = r.cstr("column name")?;
                let type_oid = r.u32("column type")?;
                let _typmod = r.u32("column type modifier")?;
                columns.push(Column {
                    key: flags & 1 == 1,
                    name,
                    type_oid,
                });
            }
            Ok(Message::Relation(Relation {
                id,
                schema,
                name,
                identity,
                columns,
            }))
        }
        b'I' => {
            let relation = r.u32("insert relation")?;
            match r.u8("insert tuple kind")? {
                b'N' => Ok(Message::Change {
                    kind: b'I',
                    relation,
                    old: None,
                    new: Some(r.tuple()?),
                }),
                _ => Err(Malformed("insert tuple kind")),
            }
        }
        b'U' => {
            let relation = r.u32("update relation")?;
            let mut old = None;
            let mut kind = r.u8("update tuple kind")?;
            if kind == b'K' || kind == b'O' {
                old = Some(r.tuple()?);
                kind = r.u8("update tuple kind")?;
            }
            if kind != b'N' {
                return Err(Malformed("update tuple kind"));
            }
            Ok(Message::Change {
                kind: b'U',
                relation,
                old,
                new: Some(r.tuple()?),
            })
        }
        b'D' => {
            let relation = r.u32("delete relation")?;
            match r.u8("delete tuple kind")? {
                b'K' | b'O' => Ok(Message::Change {
                    kind: b'D',
                    relation,
                    old: Some(r.tuple()?),
                    new: None,
                }),
                _ => Err(Malformed("delete tuple kind")),
            }
        }
        b'T' => {
            let n = r.u32("truncate relation count")?;
            let _options = r.u8("truncate options")?;
            let n = usize::try_from(n).map_err(|_| Malformed("truncate relation count"))?;
            if n > r.buf.len() / 4 {
                return Err(Malformed("truncate relation count"));
            }
            let mut ids = Vec::with_capacity(n);
            for _ in 0..n {
                ids.push(r.u32("truncate relation")?);
            }
            Ok(Message::Truncate(ids))
        }
        other => Ok(Message::Other(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(16385u32.to_be_bytes());
        b.extend(b"public\0users\0");
        b.push(b'd');
        b.extend(2u16.to_be_bytes());
        b.push(1);
        b.extend(b"id\0");
        b.extend(20u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b.push(0);
        b.extend(b"name\0");
        b.extend(25u32.to_be_bytes());
        b.extend((-1i32).to_be_bytes());
        b
    }

    #[test]
    fn relation_and_update() {
        let Ok(Message::Relation(rel)) = decode(&relation_bytes()) else {
            panic!("not a relation");
        };
        assert_eq!(
            (rel.schema.as_str(), rel.name.as_str()),
            ("public", "users")
        );
        assert!(rel.columns[0].key && !rel.columns[1].key);

        let mut u = vec![b'U'];
        u.extend(16385u32.to_be_bytes());
        u.push(b'K');
        u.extend(2u16.to_be_bytes());
        u.push(b't');
        u.extend(1u32.to_be_bytes());
        u.push(b'7');
        u.push(b'n');
        u.push(b'N');
        u.extend(2u16.to_be_bytes());
        u.push(b't');
        u.extend(1u32.to_be_bytes());
        u.push(b'8');
        u.push(b'u');
        let Ok(Message::Change {
            kind,
            relation,
            old,
            new,
        }) = decode(&u)
        else {
            panic!("not a change");
        };
        assert_eq!((kind, relation), (b'U', 16385));
        assert_eq!(old, Some(vec![Value::Text(b"7"), Value::Null]));
        assert_eq!(new, Some(vec![Value::Text(b"8"), Value::Unchanged]));
    }

    #[test]
    fn every_truncation_of_a_message_is_an_error_not_a_panic() {
        let full = relation_bytes();
        for n in 0..full.len() {
            assert!(decode(&full[..n]).is_err(), "prefix of {n} bytes parsed");
        }
        // Lying counts.
        let mut t = vec![b'T'];
        t.extend(u32::MAX.to_be_bytes());
        t.push(0);
        assert!(decode(&t).is_err());
        let mut i = vec![b'I'];
        i.extend(1u32.to_be_bytes());
        i.push(b'N');
        i.extend(u16::MAX.to_be_bytes());
        assert!(decode(&i).is_err());
        let mut v = vec![b'I'];
        v.extend(1u32.to_be_bytes());
        v.push(b'N');
        v.extend(1u16.to_be_bytes());
        v.push(b't');
        v.extend(u32::MAX.to_be_bytes());
        assert!(decode(&v).is_err());
    }
}
