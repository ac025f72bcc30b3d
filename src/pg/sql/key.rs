//! A key column's value in PostgreSQL's text output, as the change feed
//! spells it: from a bound parameter (encoded as the driver sends it,
//! then read back) or from a literal in the SQL.
//!
//! Only types whose equality is equality of text output qualify; for any
//! other the entry falls back to the table's tag (coarser, never wrong).

use std::fmt::Write as _;

use bytes::BytesMut;
use tokio_postgres::types::{IsNull, ToSql, Type};

use super::analyze::KeyValue;

/// The types a row's key can be taken from, by how they compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    /// `int2`, `int4`, `int8`: decimal.
    Integer,
    /// `text`, `varchar`, `name` (with a deterministic collation: equal
    /// only when byte for byte equal).
    Text,
    /// `bool`: `t` / `f`.
    Bool,
    /// `uuid`: lower-case, hyphenated.
    Uuid,
}

impl KeyKind {
    /// The kind of `ty`, if a key can be taken from it. `bpchar` is not
    /// one: its text output is padded to the column's length, which a
    /// parameter does not carry.
    pub(crate) fn of(ty: &Type) -> Option<Self> {
        match *ty {
            Type::INT2 | Type::INT4 | Type::INT8 => Some(Self::Integer),
            Type::TEXT | Type::VARCHAR | Type::NAME => Some(Self::Text),
            Type::BOOL => Some(Self::Bool),
            Type::UUID => Some(Self::Uuid),
            _ => None,
        }
    }
}

/// The text output of `param` bound as `ty` (`Some(None)`: NULL), or
/// `None` if it does not encode or `ty` is not a key type.
pub(crate) fn param_text(param: &(dyn ToSql + Sync), ty: &Type) -> Option<Option<String>> {
    let kind = KeyKind::of(ty)?;
    let mut buf = BytesMut::new();
    match param.to_sql_checked(ty, &mut buf).ok()? {
        IsNull::Yes => return Some(None),
        IsNull::No => {}
    }
    let b = &buf[..];
    let text = match (kind, ty) {
        (KeyKind::Integer, &Type::INT2) => i16::from_be_bytes(b.try_into().ok()?).to_string(),
        (KeyKind::Integer, &Type::INT4) => i32::from_be_bytes(b.try_into().ok()?).to_string(),
        (KeyKind::Integer, _) => i64::from_be_bytes(b.try_into().ok()?).to_string(),
        (KeyKind::Text, _) => std::str::from_utf8(b).ok()?.to_owned(),
        (KeyKind::Bool, _) => match b {
            [0] => "f".to_owned(),
            [_] => "t".to_owned(),
            _ => return None,
        },
        (KeyKind::Uuid, _) => uuid_text(<&[u8; 16]>::try_from(b).ok()?),
    };
    Some(Some(text))
}

/// The text output a key column of type `column` has for `literal`, as
/// PostgreSQL reads the literal for that column; `None` where it might
/// read it otherwise than this says (then no row key is taken).
pub(crate) fn literal_text(literal: &KeyValue, column: &Type) -> Option<String> {
    match (KeyKind::of(column)?, literal) {
        (KeyKind::Integer, KeyValue::Number(n) | KeyValue::Text(n)) => {
            let digits = n.strip_prefix('-').unwrap_or(n);
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            n.parse::<i64>().ok().map(|v| v.to_string())
        }
        // A backslash means something else where standard_conforming_strings
        // is off; a name longer than 63 bytes is truncated on input.
        (KeyKind::Text, KeyValue::Text(s))
            if !s.contains('\\') && (*column != Type::NAME || s.len() < 64) =>
        {
            Some(s.clone())
        }
        (KeyKind::Bool, KeyValue::Bool(b)) => Some(if *b { "t" } else { "f" }.to_owned()),
        (KeyKind::Uuid, KeyValue::Text(s)) => {
            let s = s
                .strip_prefix('{')
                .and_then(|s| s.strip_suffix('}'))
                .unwrap_or(s);
            let hex: Vec<u8> = s.bytes().filter(|b| *b != b'-').collect();
            if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            let mut bytes = [0u8; 16];
            for (i, pair) in hex.chunks(2).enumerate() {
                let pair = std::str::from_utf8(pair).ok()?;
                bytes[i] = u8::from_str_radix(pair, 16).ok()?;
            }
            Some(uuid_text(&bytes))
        }
        _ => None,
    }
}

/// `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`, lower case.
fn uuid_text(bytes: &[u8; 16]) -> String {
    let mut s = String::with_capacity(36);
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_read_back_as_text_output() {
        assert_eq!(param_text(&7i64, &Type::INT8), Some(Some("7".into())));
        assert_eq!(param_text(&-7i32, &Type::INT4), Some(Some("-7".into())));
        assert_eq!(param_text(&300i16, &Type::INT2), Some(Some("300".into())));
        assert_eq!(param_text(&"a,b", &Type::TEXT), Some(Some("a,b".into())));
        assert_eq!(
            param_text(&String::from("é\\"), &Type::VARCHAR),
            Some(Some("é\\".into()))
        );
        assert_eq!(param_text(&true, &Type::BOOL), Some(Some("t".into())));
        assert_eq!(param_text(&None::<i64>, &Type::INT8), Some(None));
        // The wrong Rust type for the column: no key (the query fails too).
        assert_eq!(param_text(&7i64, &Type::INT4), None);
        assert_eq!(param_text(&"x", &Type::BPCHAR), None);
        assert_eq!(param_text(&1.5f64, &Type::FLOAT8), None);
    }

    #[test]
    fn literals_read_as_the_column_reads_them() {
        let n = |s: &str| KeyValue::Number(s.into());
        let t = |s: &str| KeyValue::Text(s.into());
        assert_eq!(literal_text(&n("007"), &Type::INT8).as_deref(), Some("7"));
        assert_eq!(literal_text(&t("-12"), &Type::INT8).as_deref(), Some("-12"));
        assert_eq!(literal_text(&n("7.0"), &Type::INT8), None);
        assert_eq!(literal_text(&n("1e3"), &Type::INT8), None);
        assert_eq!(literal_text(&t(" 7"), &Type::INT8), None);
        assert_eq!(literal_text(&t("a,b"), &Type::TEXT).as_deref(), Some("a,b"));
        assert_eq!(literal_text(&t("a\\b"), &Type::TEXT), None);
        let long = "n".repeat(64);
        assert_eq!(literal_text(&t(&long), &Type::TEXT), Some(long.clone()));
        assert_eq!(literal_text(&t(&long), &Type::NAME), None);
        assert_eq!(literal_text(&t("x"), &Type::BPCHAR), None);
        assert_eq!(literal_text(&n("7"), &Type::TEXT), None);
        assert_eq!(
            literal_text(&KeyValue::Bool(false), &Type::BOOL).as_deref(),
            Some("f")
        );
        let canonical = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";
        for written in [
            canonical,
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            "{a0eebc999c0b4ef8bb6d6bb9bd380a11}",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
        ] {
            assert_eq!(
                literal_text(&t(written), &Type::UUID).as_deref(),
                Some(canonical),
                "{written}"
            );
        }
        assert_eq!(literal_text(&t("a0eebc99"), &Type::UUID), None);
        assert_eq!(literal_text(&KeyValue::Param(1), &Type::INT8), None);
    }

    #[test]
    fn uuids_are_lower_case_and_hyphenated() {
        let bytes: [u8; 16] = [
            0xa0, 0xee, 0xbc, 0x99, 0x9c, 0x0b, 0x4e, 0xf8, 0xbb, 0x6d, 0x6b, 0xb9, 0xbd, 0x38,
            0x0a, 0x11,
        ];
        assert_eq!(uuid_text(&bytes), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    }
}
