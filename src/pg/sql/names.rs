//! Qualified column references and what their qualifiers name.
//!
//! PostgreSQL reads `x.y` (and `(x).y`) as the function call `y(x)` when
//! the relation `x` names has no column `y`: `SELECT u.order_count FROM
//! users u` calls a user function `order_count(users)`, which may read
//! any table. So every qualified reference must name a column the
//! analysis can vouch for: a base table's is checked in the catalog
//! (`pg_attribute`), a subquery's or CTE's must be one of the output names
//! its text spells out, and anything else (a join alias, a field of a
//! column, a name the text does not show) is not cached.
//!
//! An unqualified name is never a function call in PostgreSQL (`SELECT
//! order_count FROM users` is an error, not `order_count(users)`), so it
//! needs no check.

use std::collections::{BTreeSet, HashMap};

use sqlparser::ast::{Expr, Ident, Query, SelectItem, SetExpr, TableAliasColumnDef};

use super::analyze::{Name, ident};

/// What a qualifier in `FROM` stands for.
#[derive(Debug, Clone)]
pub(super) enum Binding {
    /// A relation (a base table, if the catalog agrees): its columns are
    /// asked for.
    Table(Name),
    /// A subquery, a CTE or a table with a column alias list: only these
    /// names are known to be its columns.
    Columns(BTreeSet<String>),
    /// A join with an alias: its columns are not known.
    Opaque,
}

/// The qualifiers bound anywhere in the statement and the qualified
/// references made anywhere in it. Scopes are ignored on purpose: a
/// reference must be a column of every relation its qualifier names
/// anywhere, whichever PostgreSQL picks.
#[derive(Debug, Default)]
pub(super) struct Names {
    bindings: HashMap<Vec<String>, Vec<Binding>>,
    refs: Vec<(Vec<String>, String)>,
}

impl Names {
    pub(super) fn bind(&mut self, qualifier: Vec<String>, binding: Binding) {
        self.bindings.entry(qualifier).or_default().push(binding);
    }

    /// A reference `qualifier.column` (`parts` has two or three names);
    /// `None` for a form that cannot be checked.
    pub(super) fn reference(&mut self, mut parts: Vec<String>) -> Option<()> {
        if !matches!(parts.len(), 2 | 3) {
            return None;
        }
        let column = parts.pop()?;
        self.refs.push((parts, column));
        Some(())
    }

    /// The `(table, column)` pairs the catalog must confirm, or `None` if
    /// a reference cannot be vouched for.
    pub(super) fn resolve(self) -> Option<BTreeSet<(Name, String)>> {
        let mut columns = BTreeSet::new();
        for (qualifier, column) in self.refs {
            let bindings = match (self.bindings.get(&qualifier), qualifier.as_slice()) {
                (Some(bindings), _) => bindings,
                // `public.docs.id` over `FROM docs`: PostgreSQL accepts it
                // only if it is that very table.
                (None, [_, name]) => self.bindings.get(std::slice::from_ref(name))?,
                (None, _) => return None,
            };
            for binding in bindings {
                match binding {
                    Binding::Table(name) => {
                        columns.insert((name.clone(), column.clone()));
                    }
                    Binding::Columns(known) if known.contains(&column) => {}
                    Binding::Columns(_) | Binding::Opaque => return None,
                }
            }
        }
        Some(columns)
    }
}

/// The names of `e` if it is a (possibly qualified, possibly
/// parenthesized) name: the root of a field access (`(a).b`).
pub(super) fn parts(e: &Expr) -> Option<Vec<String>> {
    match e {
        Expr::Identifier(i) => Some(vec![ident(i)?]),
        Expr::CompoundIdentifier(parts) => parts.iter().map(ident).collect(),
        Expr::Nested(inner) => parts(inner),
        _ => None,
    }
}

/// The output column names of `q` that its text shows, by position (an
/// unnamed expression is `None`); the list stops at a wildcard, after
/// which positions are not known.
pub(super) fn output_names(q: &Query) -> Vec<Option<String>> {
    let mut body = q.body.as_ref();
    loop {
        match body {
            SetExpr::Select(s) => {
                let mut names = Vec::new();
                for item in &s.projection {
                    names.push(match item {
                        SelectItem::ExprWithAlias { alias, .. } => ident(alias),
                        SelectItem::UnnamedExpr(Expr::Identifier(i)) => ident(i),
                        SelectItem::UnnamedExpr(Expr::CompoundIdentifier(p)) => {
                            p.last().and_then(ident)
                        }
                        SelectItem::UnnamedExpr(_) => None,
                        _ => break,
                    });
                }
                return names;
            }
            SetExpr::Query(q) => body = q.body.as_ref(),
            SetExpr::SetOperation { left, .. } => body = left,
            _ => return Vec::new(),
        }
    }
}

/// `names` renamed by a column alias list (the first columns take the
/// alias's names; `None` if an alias name is not an identifier).
pub(super) fn renamed(
    alias: &[TableAliasColumnDef],
    mut names: Vec<Option<String>>,
) -> Option<Vec<Option<String>>> {
    for (i, column) in alias.iter().enumerate() {
        let name = Some(ident(&column.name)?);
        match names.get_mut(i) {
            Some(slot) => *slot = name,
            None => names.push(name),
        }
    }
    Some(names)
}

/// The binding of a subquery, CTE or aliased-columns table.
pub(super) fn columns(names: &[Option<String>]) -> Binding {
    Binding::Columns(names.iter().flatten().cloned().collect())
}

/// An alias's name, folded.
pub(super) fn alias_name(i: &Ident) -> Option<Vec<String>> {
    Some(vec![ident(i)?])
}
