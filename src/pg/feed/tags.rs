//! The tags the change feed invalidates, and how tables and keys are
//! spelled in them (also what a query-result cache tags its entries with,
//! so the two meet).
//!
//! | change | tags (default spelling) |
//! |---|---|
//! | a row inserted, updated or deleted | `{table}` and `{table}:{key}` |
//! | `TRUNCATE`, a relation (schema) message, more rows of one table in one transaction than the row limit | `{table}` and `{table}:*` |
//! | the slot lost (or the stream cannot resume) | everything |
//!
//! `{table}` is the table's name, schema-qualified (`schema.name`) unless
//! the schema is `public`; names are written as the catalog stores them,
//! unquoted. `{key}` is the row's replica-identity (primary key) columns in
//! PostgreSQL's text output, in column order, joined by `,`; within each
//! value `\` is written `\\` and `,` is written `\,`; a NULL is `\N`.
//!
//! So an entry for one row (`SELECT ... WHERE id = 7`) carries
//! `users:7` and `users:*`; an entry over many rows carries `users`.
//! A row change reaches both; `users:*` is for the changes that reach every
//! row without naming one.

use crate::cache::Tag;

/// What a committed change touched, as the feed hands it to a tag mapping
/// ([`ChangeFeedBuilder::map_tags`](super::ChangeFeedBuilder::map_tags)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change<'a> {
    /// Some rows of `table` changed (sent with every row change).
    Table {
        /// The table, spelled as in the module docs.
        table: &'a str,
    },
    /// The row of `table` whose key is `key` changed.
    Row {
        /// The table.
        table: &'a str,
        /// The row's key, spelled as in the module docs.
        key: &'a str,
    },
    /// Every row of `table` may have changed: `TRUNCATE`, a schema change,
    /// or more rows in one transaction than the feed tracks one by one.
    /// Always accompanied by [`Change::Table`].
    Whole {
        /// The table.
        table: &'a str,
    },
}

impl Change<'_> {
    /// The default spelling: `{table}`, `{table}:{key}`, `{table}:*`.
    pub fn default_tag(&self) -> Tag {
        match self {
            Change::Table { table } => Tag::from(*table),
            Change::Row { table, key } => row_tag(table, key),
            Change::Whole { table } => whole_table_tag(table),
        }
    }
}

/// The table part of a tag: `name` in the `public` schema, else
/// `schema.name`.
pub fn table_name(schema: &str, name: &str) -> String {
    if schema == "public" {
        name.to_owned()
    } else {
        format!("{schema}.{name}")
    }
}

/// A row's key from its key columns' text values (`None`: NULL), in
/// column order, spelled as the module docs say.
pub fn row_key<'a>(values: impl IntoIterator<Item = Option<&'a str>>) -> String {
    let mut key = String::new();
    for (i, value) in values.into_iter().enumerate() {
        if i > 0 {
            key.push(',');
        }
        match value {
            None => key.push_str("\\N"),
            Some(v) => {
                for c in v.chars() {
                    if c == '\\' || c == ',' {
                        key.push('\\');
                    }
                    key.push(c);
                }
            }
        }
    }
    key
}

/// `{table}:{key}`.
pub fn row_tag(table: &str, key: &str) -> Tag {
    Tag::from(format!("{table}:{key}"))
}

/// `{table}:*`: carried by entries of single rows, invalidated by changes
/// that reach every row.
pub fn whole_table_tag(table: &str) -> Tag {
    Tag::from(format!("{table}:*"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spelling() {
        assert_eq!(table_name("public", "users"), "users");
        assert_eq!(table_name("app", "users"), "app.users");
        assert_eq!(row_key([Some("7")]), "7");
        assert_eq!(row_key([Some("a,b"), Some("c\\d")]), "a\\,b,c\\\\d");
        assert_eq!(row_key([None, Some("")]), "\\N,");
        assert_eq!(row_key([Some(""), Some("x")]), ",x");
        assert_eq!(row_tag("users", "7").as_str(), "users:7");
        assert_eq!(whole_table_tag("users").as_str(), "users:*");
        assert_eq!(
            Change::Row {
                table: "t",
                key: "1"
            }
            .default_tag()
            .as_str(),
            "t:1"
        );
    }
}
