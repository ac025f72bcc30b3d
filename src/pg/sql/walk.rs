//! The walk over a statement's syntax tree: queries, selects, `FROM`
//! items. What it does not know, it refuses (`None`).

use sqlparser::ast::{
    Distinct, Expr, GroupByExpr, JoinConstraint, JoinOperator, LimitClause, NamedWindowExpr,
    OrderByExpr, OrderByKind, OrderBySort, Query, Select, SelectFlavor, SelectItem,
    SelectItemQualifiedWildcardKind, SetExpr, TableFactor, TableWithJoins,
    WildcardAdditionalOptions, WindowFrameBound, WindowSpec,
};

use super::analyze::{MAX_DEPTH, Shape, ident, object_name};
use super::names::{Binding, Names, alias_name, columns, output_names, renamed};

/// What the walk found so far.
#[derive(Default)]
pub(super) struct Walk {
    pub(super) shape: Shape,
    /// CTE names in scope (innermost last), with their output names.
    ctes: Vec<(String, Vec<Option<String>>)>,
    /// Qualifiers and qualified column references.
    pub(super) names: Names,
    depth: usize,
    /// Subqueries and CTEs seen (a row lookup has none).
    pub(super) subqueries: usize,
    /// Relations named in a `FROM` (counted with repeats).
    pub(super) from_items: usize,
}

impl Walk {
    pub(super) fn nested(&mut self, f: impl FnOnce(&mut Self) -> Option<()>) -> Option<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return None;
        }
        f(self)?;
        self.depth -= 1;
        Some(())
    }

    pub(super) fn operator(&mut self, symbol: &str) {
        self.shape.operators.insert(symbol.to_owned());
    }

    pub(super) fn query(&mut self, q: &Query) -> Option<()> {
        self.nested(|w| {
            if !q.locks.is_empty()
                || q.for_clause.is_some()
                || q.settings.is_some()
                || q.format_clause.is_some()
                || !q.pipe_operators.is_empty()
            {
                return None;
            }
            let scope = w.ctes.len();
            if let Some(with) = &q.with {
                let names: Vec<(String, Vec<Option<String>>)> = with
                    .cte_tables
                    .iter()
                    .map(|c| {
                        let outputs = renamed(&c.alias.columns, output_names(&c.query))?;
                        Some((ident(&c.alias.name)?, outputs))
                    })
                    .collect::<Option<_>>()?;
                if with.cte_tables.iter().any(|c| c.from.is_some()) {
                    return None;
                }
                w.subqueries += with.cte_tables.len();
                if with.recursive {
                    // Every name is in scope in every body.
                    w.ctes.extend(names);
                    for cte in &with.cte_tables {
                        w.query(&cte.query)?;
                    }
                } else {
                    // Each name is in scope after its own body.
                    for (cte, name) in with.cte_tables.iter().zip(names) {
                        w.query(&cte.query)?;
                        w.ctes.push(name);
                    }
                }
            }
            w.set_expr(&q.body)?;
            if let Some(order_by) = &q.order_by {
                if order_by.interpolate.is_some() {
                    return None;
                }
                match &order_by.kind {
                    OrderByKind::Expressions(exprs) => w.order_by(exprs)?,
                    OrderByKind::All(_) => return None,
                }
            }
            match &q.limit_clause {
                None => {}
                Some(LimitClause::LimitOffset {
                    limit,
                    offset,
                    limit_by,
                }) => {
                    if !limit_by.is_empty() {
                        return None;
                    }
                    if let Some(limit) = limit {
                        w.expr(limit)?;
                    }
                    if let Some(offset) = offset {
                        w.expr(&offset.value)?;
                    }
                }
                Some(LimitClause::OffsetCommaLimit { .. }) => return None,
            }
            if let Some(fetch) = &q.fetch
                && let Some(quantity) = &fetch.quantity
            {
                w.expr(quantity)?;
            }
            w.ctes.truncate(scope);
            Some(())
        })
    }

    fn set_expr(&mut self, body: &SetExpr) -> Option<()> {
        self.nested(|w| match body {
            SetExpr::Select(select) => w.select(select),
            SetExpr::Query(q) => w.query(q),
            SetExpr::SetOperation { left, right, .. } => {
                w.set_expr(left)?;
                w.set_expr(right)
            }
            SetExpr::Values(values) => {
                for row in &values.rows {
                    w.exprs(&row.content)?;
                }
                Some(())
            }
            _ => None,
        })
    }

    fn select(&mut self, s: &Select) -> Option<()> {
        if !s.optimizer_hints.is_empty()
            || s.select_modifiers.is_some()
            || s.top.is_some()
            || s.exclude.is_some()
            || s.into.is_some()
            || !s.lateral_views.is_empty()
            || s.prewhere.is_some()
            || !s.connect_by.is_empty()
            || !s.cluster_by.is_empty()
            || !s.distribute_by.is_empty()
            || !s.sort_by.is_empty()
            || s.qualify.is_some()
            || s.value_table_mode.is_some()
            || !matches!(s.flavor, SelectFlavor::Standard)
        {
            return None;
        }
        // FROM first: its relations are what the rest refers to.
        for from in &s.from {
            self.table_with_joins(from)?;
        }
        match &s.distinct {
            None | Some(Distinct::All | Distinct::Distinct) => {}
            Some(Distinct::On(exprs)) => self.exprs(exprs)?,
        }
        for item in &s.projection {
            match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                    self.expr(e)?
                }
                SelectItem::Wildcard(options) => plain_wildcard(options)?,
                SelectItem::QualifiedWildcard(kind, options) => {
                    plain_wildcard(options)?;
                    if let SelectItemQualifiedWildcardKind::Expr(e) = kind {
                        self.expr(e)?;
                    }
                }
                SelectItem::ExprWithAliases { .. } => return None,
            }
        }
        if let Some(selection) = &s.selection {
            self.expr(selection)?;
        }
        match &s.group_by {
            GroupByExpr::Expressions(exprs, modifiers) if modifiers.is_empty() => {
                self.exprs(exprs)?
            }
            _ => return None,
        }
        if let Some(having) = &s.having {
            self.expr(having)?;
        }
        for window in &s.named_window {
            match &window.1 {
                NamedWindowExpr::NamedWindow(_) => {}
                NamedWindowExpr::WindowSpec(spec) => self.window(spec)?,
            }
        }
        Some(())
    }

    fn table_with_joins(&mut self, t: &TableWithJoins) -> Option<()> {
        self.table_factor(&t.relation)?;
        for join in &t.joins {
            if join.global {
                return None;
            }
            let constraint = match &join.join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c)
                | JoinOperator::Right(c)
                | JoinOperator::RightOuter(c)
                | JoinOperator::FullOuter(c)
                | JoinOperator::CrossJoin(c) => c,
                _ => return None,
            };
            self.table_factor(&join.relation)?;
            match constraint {
                JoinConstraint::On(e) => self.expr(e)?,
                JoinConstraint::Using(_) => self.operator("="),
                JoinConstraint::Natural => self.operator("="),
                JoinConstraint::None => {}
                JoinConstraint::UsingAlias(..) => return None,
            }
        }
        Some(())
    }

    fn table_factor(&mut self, t: &TableFactor) -> Option<()> {
        self.nested(|w| match t {
            TableFactor::Table {
                name,
                alias,
                args,
                with_hints,
                version,
                with_ordinality,
                partitions,
                json_path,
                sample,
                index_directives,
                ..
            } => {
                if args.is_some()
                    || !with_hints.is_empty()
                    || version.is_some()
                    || *with_ordinality
                    || !partitions.is_empty()
                    || json_path.is_some()
                    || sample.is_some()
                    || !index_directives.is_empty()
                {
                    return None;
                }
                let name = object_name(name)?;
                w.from_items += 1;
                let cte = match &name.schema {
                    None => w.ctes.iter().rev().find(|(n, _)| *n == name.name),
                    Some(_) => None,
                };
                let binding = match (cte, alias) {
                    // A CTE: its body was walked where it was defined.
                    (Some((_, outputs)), alias) => {
                        let columns_named = alias.as_ref().map_or(&[][..], |a| &a.columns[..]);
                        columns(&renamed(columns_named, outputs.clone())?)
                    }
                    // A column alias list renames the table's columns.
                    (None, Some(a)) if !a.columns.is_empty() => {
                        columns(&renamed(&a.columns, Vec::new())?)
                    }
                    (None, _) => Binding::Table(name.clone()),
                };
                match alias {
                    Some(a) => w.names.bind(alias_name(&a.name)?, binding),
                    None => {
                        if let Some(schema) = &name.schema {
                            w.names
                                .bind(vec![schema.clone(), name.name.clone()], binding.clone());
                        }
                        w.names.bind(vec![name.name.clone()], binding);
                    }
                }
                if cte.is_none() {
                    w.shape.relations.insert(name);
                }
                Some(())
            }
            TableFactor::Derived {
                subquery,
                sample,
                alias,
                ..
            } => {
                if sample.is_some() {
                    return None;
                }
                if let Some(a) = alias {
                    let outputs = renamed(&a.columns, output_names(subquery))?;
                    w.names.bind(alias_name(&a.name)?, columns(&outputs));
                }
                w.subqueries += 1;
                w.query(subquery)
            }
            TableFactor::NestedJoin {
                table_with_joins,
                alias,
            } => {
                if let Some(a) = alias {
                    w.names.bind(alias_name(&a.name)?, Binding::Opaque);
                }
                w.table_with_joins(table_with_joins)
            }
            _ => None,
        })
    }

    pub(super) fn order_by(&mut self, exprs: &[OrderByExpr]) -> Option<()> {
        for o in exprs {
            // `USING op`: an operator the catalog step would have to check.
            if o.with_fill.is_some() || matches!(o.options.sort, Some(OrderBySort::Using(_))) {
                return None;
            }
            self.expr(&o.expr)?;
        }
        Some(())
    }

    pub(super) fn window(&mut self, spec: &WindowSpec) -> Option<()> {
        self.exprs(&spec.partition_by)?;
        self.order_by(&spec.order_by)?;
        if let Some(frame) = &spec.window_frame {
            for bound in std::iter::once(&frame.start_bound).chain(frame.end_bound.as_ref()) {
                match bound {
                    WindowFrameBound::CurrentRow => {}
                    WindowFrameBound::Preceding(e) | WindowFrameBound::Following(e) => {
                        if let Some(e) = e {
                            self.expr(e)?;
                        }
                    }
                }
            }
        }
        Some(())
    }

    pub(super) fn exprs(&mut self, exprs: &[Expr]) -> Option<()> {
        exprs.iter().try_for_each(|e| self.expr(e))
    }

    pub(super) fn subquery(&mut self, q: &Query) -> Option<()> {
        self.subqueries += 1;
        self.query(q)
    }

    pub(super) fn expr(&mut self, e: &Expr) -> Option<()> {
        self.nested(|w| w.expr_here(e))
    }
}

fn plain_wildcard(o: &WildcardAdditionalOptions) -> Option<()> {
    (o.opt_ilike.is_none()
        && o.opt_exclude.is_none()
        && o.opt_except.is_none()
        && o.opt_replace.is_none()
        && o.opt_rename.is_none()
        && o.opt_alias.is_none())
    .then_some(())
}
