//! The walk over expressions: the functions and operators they call, and
//! the literals and casts that would make an entry depend on the clock.

use sqlparser::ast::{
    BinaryOperator, CastKind, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArgumentClause,
    FunctionArguments, InTarget, ObjectName, ObjectNamePart, UnaryOperator, Value, WindowType,
};

use super::analyze::{ident, object_name};
use super::names::parts;
use super::walk::Walk;

/// String literals that PostgreSQL's date/time input reads the clock for:
/// any with `now`, `today`, `tomorrow` or `yesterday` as a word (`'today
/// 08:00'`, `'yesterday UTC'`, `'NOW'`), whatever else it holds. Refused
/// in every literal, not only those cast to a date/time type (the type is
/// often inferred). `'epoch'`, `'infinity'` and `'allballs'` (midnight
/// UTC) are constants.
fn reads_the_clock(s: &str) -> bool {
    s.split(|c: char| !c.is_ascii_alphabetic()).any(|word| {
        ["now", "today", "tomorrow", "yesterday"]
            .iter()
            .any(|w| word.eq_ignore_ascii_case(w))
    })
}

/// SQL value functions that sqlparser may read as a column name.
fn is_session_keyword(name: &str) -> bool {
    [
        "current_role",
        "current_schema",
        "current_user",
        "session_user",
        "user",
        "current_catalog",
        "current_date",
        "current_time",
        "current_timestamp",
        "localtime",
        "localtimestamp",
    ]
    .iter()
    .any(|k| name.eq_ignore_ascii_case(k))
}

/// Functions with their own syntax that are not in `pg_proc` by that name.
fn is_syntax_function(name: &ObjectName) -> bool {
    match name.0.as_slice() {
        [ObjectNamePart::Identifier(i)] if i.quote_style.is_none() => {
            let n = i.value.to_ascii_lowercase();
            matches!(
                n.as_str(),
                "coalesce" | "nullif" | "greatest" | "least" | "row"
            )
        }
        _ => false,
    }
}

fn binary_operator(op: &BinaryOperator) -> Option<Option<String>> {
    use BinaryOperator as B;
    let symbol = match op {
        B::And | B::Or => return Some(None),
        B::Plus
        | B::Minus
        | B::Multiply
        | B::Divide
        | B::Modulo
        | B::StringConcat
        | B::Gt
        | B::Lt
        | B::GtEq
        | B::LtEq
        | B::Eq
        | B::NotEq
        | B::BitwiseOr
        | B::BitwiseAnd
        | B::PGBitwiseXor
        | B::PGBitwiseShiftLeft
        | B::PGBitwiseShiftRight
        | B::PGExp
        | B::PGOverlap
        | B::PGRegexMatch
        | B::PGRegexIMatch
        | B::PGRegexNotMatch
        | B::PGRegexNotIMatch
        | B::PGLikeMatch
        | B::PGILikeMatch
        | B::PGNotLikeMatch
        | B::PGNotILikeMatch
        | B::PGStartsWith
        | B::Arrow
        | B::LongArrow
        | B::HashArrow
        | B::HashLongArrow
        | B::AtAt
        | B::AtArrow
        | B::ArrowAt
        | B::HashMinus
        | B::AtQuestion
        | B::Question
        | B::QuestionAnd
        | B::QuestionPipe => op.to_string(),
        // `OPERATOR(pg_catalog.+)`: the builtin by construction.
        B::PGCustomBinaryOperator(parts) => match parts.as_slice() {
            [schema, symbol] if schema == "pg_catalog" => symbol.clone(),
            _ => return None,
        },
        _ => return None,
    };
    Some(Some(symbol))
}

impl Walk {
    pub(super) fn expr_here(&mut self, e: &Expr) -> Option<()> {
        match e {
            // Unquoted, these are PostgreSQL's keywords for session state.
            Expr::Identifier(i) if i.quote_style.is_none() && is_session_keyword(&i.value) => None,
            Expr::Identifier(_) | Expr::Wildcard(_) | Expr::QualifiedWildcard(..) => Some(()),
            // `x.y`: a column of `x`, or the call `y(x)` (checked later).
            Expr::CompoundIdentifier(names) => {
                let names = names.iter().map(ident).collect::<Option<_>>()?;
                self.names.reference(names)
            }
            Expr::CompoundFieldAccess { root, access_chain } => {
                // `(x).y` is `x.y`; a field of anything else (`(x.y).z`,
                // `(f(x)).z`, `a[1].z`) may be a function call too.
                let dots = access_chain
                    .iter()
                    .take_while(|a| matches!(a, sqlparser::ast::AccessExpr::Dot(_)))
                    .count();
                if dots == 0 {
                    self.expr(root)?;
                } else {
                    let mut names = parts(root)?;
                    for access in &access_chain[..dots] {
                        match access {
                            sqlparser::ast::AccessExpr::Dot(Expr::Identifier(i)) => {
                                names.push(ident(i)?)
                            }
                            _ => return None,
                        }
                    }
                    self.names.reference(names)?;
                }
                for access in &access_chain[dots..] {
                    match access {
                        sqlparser::ast::AccessExpr::Dot(_) => return None,
                        sqlparser::ast::AccessExpr::Subscript(s) => match s {
                            sqlparser::ast::Subscript::Index { index } => self.expr(index)?,
                            sqlparser::ast::Subscript::Slice {
                                lower_bound,
                                upper_bound,
                                stride,
                            } => {
                                if stride.is_some() {
                                    return None;
                                }
                                for b in [lower_bound, upper_bound].into_iter().flatten() {
                                    self.expr(b)?;
                                }
                            }
                        },
                    }
                }
                Some(())
            }
            Expr::IsFalse(e)
            | Expr::IsNotFalse(e)
            | Expr::IsTrue(e)
            | Expr::IsNotTrue(e)
            | Expr::IsNull(e)
            | Expr::IsNotNull(e)
            | Expr::IsUnknown(e)
            | Expr::IsNotUnknown(e)
            | Expr::Nested(e) => self.expr(e),
            Expr::IsDistinctFrom(a, b) | Expr::IsNotDistinctFrom(a, b) => {
                self.operator("=");
                self.expr(a)?;
                self.expr(b)
            }
            Expr::In { expr, target, .. } => {
                self.operator("=");
                self.operator("<>");
                self.expr(expr)?;
                match target {
                    InTarget::List(list) => self.exprs(list),
                    InTarget::Subquery(q) => self.subquery(q),
                    InTarget::Unnest(e) => self.expr(e),
                    InTarget::Table { .. } => None,
                }
            }
            Expr::Between {
                expr, low, high, ..
            } => {
                self.operator(">=");
                self.operator("<=");
                self.expr(expr)?;
                self.expr(low)?;
                self.expr(high)
            }
            Expr::BinaryOp { left, op, right } => {
                if let Some(symbol) = binary_operator(op)? {
                    self.operator(&symbol);
                }
                self.expr(left)?;
                self.expr(right)
            }
            Expr::Like {
                negated,
                expr,
                pattern,
                escape_char,
                ..
            }
            | Expr::ILike {
                negated,
                expr,
                pattern,
                escape_char,
                ..
            } => {
                let case = if matches!(e, Expr::ILike { .. }) {
                    "*"
                } else {
                    ""
                };
                let not = if *negated { "!" } else { "" };
                self.operator(&format!("{not}~~{case}"));
                self.expr(expr)?;
                self.expr(pattern)?;
                escape_char.as_deref().map_or(Some(()), |c| self.expr(c))
            }
            Expr::SimilarTo {
                negated,
                expr,
                pattern,
                escape_char,
            } => {
                self.operator(if *negated { "!~" } else { "~" });
                self.expr(expr)?;
                self.expr(pattern)?;
                escape_char.as_deref().map_or(Some(()), |c| self.expr(c))
            }
            Expr::AnyOp {
                left,
                compare_op,
                right,
                ..
            }
            | Expr::AllOp {
                left,
                compare_op,
                right,
            } => {
                self.operator(&binary_operator(compare_op)??);
                self.expr(left)?;
                self.expr(right)
            }
            Expr::UnaryOp { op, expr } => {
                let symbol = match op {
                    UnaryOperator::Not => None,
                    UnaryOperator::Plus => Some("+"),
                    UnaryOperator::Minus => Some("-"),
                    UnaryOperator::PGAbs => Some("@"),
                    UnaryOperator::PGSquareRoot => Some("|/"),
                    UnaryOperator::PGCubeRoot => Some("||/"),
                    UnaryOperator::BitwiseNot => Some("~"),
                    _ => return None,
                };
                if let Some(symbol) = symbol {
                    self.operator(symbol);
                }
                self.expr(expr)
            }
            Expr::Cast {
                kind,
                expr,
                data_type,
                format,
            } => {
                if !matches!(kind, CastKind::Cast | CastKind::DoubleColon) || format.is_some() {
                    return None;
                }
                // Date/time input reads the clock for 'now' and its kin: only
                // a literal (checked below) or a value of its own type.
                let to = data_type.to_string().to_ascii_lowercase();
                if (to.contains("date") || to.contains("time"))
                    && !matches!(
                        expr.as_ref(),
                        Expr::Value(_) | Expr::Identifier(_) | Expr::CompoundIdentifier(_)
                    )
                {
                    return None;
                }
                self.expr(expr)
            }
            Expr::AtTimeZone {
                timestamp,
                time_zone,
            } => {
                self.expr(timestamp)?;
                self.expr(time_zone)
            }
            Expr::Extract { expr, .. } | Expr::Ceil { expr, .. } | Expr::Floor { expr, .. } => {
                self.expr(expr)
            }
            Expr::Position { expr, r#in } => {
                self.expr(expr)?;
                self.expr(r#in)
            }
            Expr::Substring {
                expr,
                substring_from,
                substring_for,
                ..
            } => {
                self.expr(expr)?;
                for e in [substring_from, substring_for].into_iter().flatten() {
                    self.expr(e)?;
                }
                Some(())
            }
            Expr::Trim {
                expr,
                trim_what,
                trim_characters,
                ..
            } => {
                self.expr(expr)?;
                if let Some(what) = trim_what {
                    self.expr(what)?;
                }
                trim_characters
                    .as_deref()
                    .map_or(Some(()), |c| self.exprs(c))
            }
            Expr::Overlay {
                expr,
                overlay_what,
                overlay_from,
                overlay_for,
            } => {
                self.expr(expr)?;
                self.expr(overlay_what)?;
                self.expr(overlay_from)?;
                overlay_for.as_deref().map_or(Some(()), |e| self.expr(e))
            }
            Expr::Collate { expr, .. } => self.expr(expr),
            Expr::Value(v) => value(&v.value),
            Expr::TypedString(t) => value(&t.value.value),
            Expr::Function(f) => self.function(f),
            Expr::Case {
                operand,
                conditions,
                else_result,
                ..
            } => {
                if let Some(operand) = operand {
                    self.operator("=");
                    self.expr(operand)?;
                }
                for when in conditions {
                    self.expr(&when.condition)?;
                    self.expr(&when.result)?;
                }
                else_result.as_deref().map_or(Some(()), |e| self.expr(e))
            }
            Expr::Exists { subquery, .. } | Expr::Subquery(subquery) => self.subquery(subquery),
            Expr::GroupingSets(sets) | Expr::Cube(sets) | Expr::Rollup(sets) => {
                sets.iter().try_for_each(|s| self.exprs(s))
            }
            Expr::Tuple(items) => self.exprs(items),
            Expr::Array(array) => self.exprs(&array.elem),
            Expr::Interval(interval) => self.expr(&interval.value),
            _ => None,
        }
    }

    fn function(&mut self, f: &Function) -> Option<()> {
        if f.uses_odbc_syntax
            || !matches!(f.parameters, FunctionArguments::None)
            || f.null_treatment.is_some()
        {
            return None;
        }
        let name = object_name(&f.name)?;
        match &f.args {
            FunctionArguments::None => {}
            // `ARRAY(SELECT ...)`: a constructor, not a function.
            FunctionArguments::Subquery(q) => {
                if !(name.schema.is_none() && name.name == "array" && f.name.0.len() == 1) {
                    return None;
                }
                return self.subquery(q);
            }
            FunctionArguments::List(list) => {
                for arg in &list.args {
                    let arg = match arg {
                        FunctionArg::Unnamed(a) | FunctionArg::Named { arg: a, .. } => a,
                        FunctionArg::ExprNamed { .. } => return None,
                    };
                    match arg {
                        FunctionArgExpr::Expr(e) => self.expr(e)?,
                        FunctionArgExpr::QualifiedWildcard(_) | FunctionArgExpr::Wildcard => {}
                        FunctionArgExpr::WildcardWithOptions(_) => return None,
                    }
                }
                for clause in &list.clauses {
                    match clause {
                        FunctionArgumentClause::OrderBy(exprs) => self.order_by(exprs)?,
                        _ => return None,
                    }
                }
            }
        }
        self.order_by(&f.within_group)?;
        if let Some(filter) = &f.filter {
            self.expr(filter)?;
        }
        match &f.over {
            None | Some(WindowType::NamedWindow(_)) => {}
            Some(WindowType::WindowSpec(spec)) => self.window(spec)?,
        }
        if !is_syntax_function(&f.name) {
            self.shape.functions.insert(name);
        }
        Some(())
    }
}

fn value(v: &Value) -> Option<()> {
    match v {
        Value::Number(..) | Value::Boolean(_) | Value::Null | Value::Placeholder(_) => Some(()),
        Value::SingleQuotedString(s) | Value::EscapedStringLiteral(s) => {
            (!reads_the_clock(s)).then_some(())
        }
        Value::DollarQuotedString(s) => (!reads_the_clock(&s.value)).then_some(()),
        _ => None,
    }
}
