//! What a statement reads, from its text alone: the relations it names,
//! the functions and operators it calls, and whether it looks up one row
//! by equalities (sqlparser, PostgreSQL dialect).
//!
//! The walk knows a fixed set of constructs and refuses everything else
//! (`None`): a statement it does not understand is not cached. Whether a
//! name is a table, a view or a builtin is the catalog's to say
//! ([`super::catalog`]).

use std::collections::BTreeSet;

use sqlparser::ast::{
    BinaryOperator, Expr, Ident, ObjectName, ObjectNamePart, Query, SetExpr, Statement,
    TableFactor, Value,
};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;

use super::walk::Walk;

/// Statements longer than this are not analysed (not cached).
pub(crate) const MAX_SQL_LEN: usize = 256 * 1024;
/// sqlparser's own limit on nested parsing (parentheses, subqueries).
const PARSER_RECURSION_LIMIT: usize = 50;
/// The walk's limit on nesting (a left-deep `a OR b OR ...` chain is parsed
/// iteratively, so it can be deeper than the parser's limit).
pub(super) const MAX_DEPTH: usize = 500;
/// The stack the parse, the walk and the drop of the syntax tree run on:
/// a long operator chain is a deep tree, and dropping it recurses.
const STACK: usize = 64 * 1024 * 1024;

/// A relation or function name as PostgreSQL resolves it: unquoted
/// identifiers folded to lower case, quoted ones as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Name {
    pub(crate) schema: Option<String>,
    pub(crate) name: String,
}

impl Name {
    /// `"schema"."name"` (or `"name"`), for `to_regclass`.
    pub(crate) fn quoted(&self) -> String {
        let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        match &self.schema {
            Some(schema) => format!("{}.{}", quote(schema), quote(&self.name)),
            None => quote(&self.name),
        }
    }
}

/// The value a key column is compared with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyValue {
    /// `$n` (1-based, as written).
    Param(usize),
    /// A number literal as written.
    Number(String),
    /// A standard string literal, unescaped.
    Text(String),
    /// `TRUE` or `FALSE`.
    Bool(bool),
}

/// What a plain `SELECT` reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Shape {
    /// Every relation named in a `FROM` or `JOIN`, anywhere (CTE names
    /// excluded).
    pub(crate) relations: BTreeSet<Name>,
    /// Every function called by name.
    pub(crate) functions: BTreeSet<Name>,
    /// Every operator used, by its symbol (also those that `IN`, `LIKE`,
    /// `BETWEEN` and the like stand for).
    pub(crate) operators: BTreeSet<String>,
    /// Every qualified column reference (`x.y`, `(x).y`) whose qualifier
    /// names a relation: `(relation, column)`, each of which must be a
    /// column of the relation (else PostgreSQL calls the function `y(x)`).
    pub(crate) columns: BTreeSet<(Name, String)>,
    /// For a statement over one table and nothing else (no join, subquery
    /// or CTE): the `column = value` terms of its `WHERE` conjunction,
    /// column names folded as identifiers are.
    pub(crate) lookup: Option<Vec<(String, KeyValue)>>,
}

/// The shape of `sql`, or `None` if it is not one plain `SELECT` made of
/// constructs this walk knows.
pub(crate) fn analyze(sql: &str) -> Option<Shape> {
    if sql.len() > MAX_SQL_LEN {
        return None;
    }
    stacker::grow(STACK, || analyze_here(sql))
}

fn analyze_here(sql: &str) -> Option<Shape> {
    let dialect = PostgreSqlDialect {};
    let mut statements = Parser::new(&dialect)
        .with_recursion_limit(PARSER_RECURSION_LIMIT)
        .try_with_sql(sql)
        .ok()?
        .parse_statements()
        .ok()?;
    if statements.len() != 1 {
        return None;
    }
    let Some(Statement::Query(query)) = statements.pop() else {
        return None;
    };
    let mut walk = Walk::default();
    walk.query(&query)?;
    let lookup = if walk.subqueries == 0 && walk.from_items == 1 && walk.shape.relations.len() == 1
    {
        single_table_lookup(&query)
    } else {
        None
    };
    let mut shape = walk.shape;
    shape.columns = walk.names.resolve()?;
    shape.lookup = lookup;
    Some(shape)
}

/// The equalities of a single-table `SELECT`'s `WHERE`, if it is one.
fn single_table_lookup(query: &Query) -> Option<Vec<(String, KeyValue)>> {
    if query.with.is_some() {
        return None;
    }
    let SetExpr::Select(select) = query.body.as_ref() else {
        return None;
    };
    let [from] = select.from.as_slice() else {
        return None;
    };
    if !from.joins.is_empty() {
        return None;
    }
    let TableFactor::Table { name, alias, .. } = &from.relation else {
        return None;
    };
    let table = object_name(name)?;
    let alias = match alias {
        // `users u(uid, id)`: the names in the `WHERE` are not the table's
        // column names (the table's tags, not a row's).
        Some(a) if !a.columns.is_empty() => return None,
        Some(a) => Some(ident(&a.name)?),
        None => None,
    };
    let mut terms = Vec::new();
    let mut pending = vec![select.selection.as_ref()?];
    while let Some(expr) = pending.pop() {
        match expr {
            Expr::BinaryOp {
                left,
                op: BinaryOperator::And,
                right,
            } => {
                pending.push(left);
                pending.push(right);
            }
            Expr::Nested(inner) => pending.push(inner),
            Expr::BinaryOp {
                left,
                op: BinaryOperator::Eq,
                right,
            } => {
                let term = column_of(left, &table, alias.as_deref())
                    .zip(key_value(right))
                    .or_else(|| column_of(right, &table, alias.as_deref()).zip(key_value(left)));
                terms.extend(term);
            }
            _ => {}
        }
    }
    Some(terms)
}

/// `expr` as a column of the one table (unqualified, or qualified by its
/// alias, or by its name when it has no alias).
fn column_of(expr: &Expr, table: &Name, alias: Option<&str>) -> Option<String> {
    match expr {
        Expr::Identifier(column) => ident(column),
        Expr::CompoundIdentifier(parts) => {
            let (column, qualifier) = parts.split_last()?;
            let qualifier: Vec<String> = qualifier.iter().map(ident).collect::<Option<_>>()?;
            let names = match alias {
                Some(alias) => qualifier == [alias],
                None => match qualifier.as_slice() {
                    [name] => *name == table.name,
                    [schema, name] => Some(schema) == table.schema.as_ref() && *name == table.name,
                    _ => false,
                },
            };
            names.then(|| ident(column))?
        }
        Expr::Nested(inner) => column_of(inner, table, alias),
        _ => None,
    }
}

fn key_value(expr: &Expr) -> Option<KeyValue> {
    match expr {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => {
                let n: usize = p.strip_prefix('$')?.parse().ok()?;
                (n > 0).then_some(KeyValue::Param(n))
            }
            Value::Number(n, false) => Some(KeyValue::Number(n.clone())),
            Value::SingleQuotedString(s) => Some(KeyValue::Text(s.clone())),
            Value::Boolean(b) => Some(KeyValue::Bool(*b)),
            _ => None,
        },
        Expr::Nested(inner) => key_value(inner),
        _ => None,
    }
}

/// An identifier as PostgreSQL folds it.
pub(super) fn ident(i: &Ident) -> Option<String> {
    match i.quote_style {
        None => Some(i.value.to_ascii_lowercase()),
        Some('"') => Some(i.value.clone()),
        Some(_) => None,
    }
}

/// A one- or two-part name (`name`, `schema.name`).
pub(super) fn object_name(name: &ObjectName) -> Option<Name> {
    let parts: Vec<String> = name
        .0
        .iter()
        .map(|p| match p {
            ObjectNamePart::Identifier(i) => ident(i),
            ObjectNamePart::Function(_) => None,
        })
        .collect::<Option<_>>()?;
    match <[String; 1]>::try_from(parts) {
        Ok([name]) => Some(Name { schema: None, name }),
        Err(parts) => match <[String; 2]>::try_from(parts) {
            Ok([schema, name]) => Some(Name {
                schema: Some(schema),
                name,
            }),
            Err(_) => None,
        },
    }
}

#[cfg(test)]
#[path = "analyze_tests.rs"]
mod tests;
