//! SQL expressions of filters and derived columns, checked with the same polars SQL front end
//! the plan compiles them with — so `validate` accepts exactly what the pipeline can run.

use polars::prelude::*;

use super::diag::did_you_mean;
use super::model::ColumnType;

/// The polars type a column of `t` has in every DataFrame of the pipeline.
pub fn dtype(t: ColumnType) -> DataType {
    match t {
        ColumnType::String => DataType::String,
        ColumnType::Int => DataType::Int64,
        ColumnType::Float => DataType::Float64,
        ColumnType::Bool => DataType::Boolean,
        ColumnType::Timestamp => DataType::Datetime(TimeUnit::Milliseconds, None),
    }
}

/// The spec type of a polars type, when it has one.
pub fn column_type(dt: &DataType) -> Option<ColumnType> {
    Some(match dt {
        DataType::String => ColumnType::String,
        DataType::Boolean => ColumnType::Bool,
        DataType::Float32 | DataType::Float64 => ColumnType::Float,
        DataType::Datetime(_, _) => ColumnType::Timestamp,
        d if d.is_integer() => ColumnType::Int,
        _ => return None,
    })
}

pub fn schema_of(columns: &[(String, ColumnType)]) -> Schema {
    columns
        .iter()
        .map(|(n, t)| Field::new(n.as_str().into(), dtype(*t)))
        .collect()
}

/// Parses `sql` as a polars SQL expression. A qualified name `lookup.column` reads the column
/// of that name (a lookup's column joined to the events: the plan names it so).
pub fn parse(sql: &str) -> Result<Expr, String> {
    let sql = qualify(sql);
    let polars = |sql: &str| {
        polars::sql::sql_expr(sql)
            .map_err(|e| format!("not a valid SQL expression: {}", first_line(&e.to_string())))
    };
    match split_parts(&sql) {
        Some((rewritten, parts)) => match polars(&rewritten) {
            Ok(expr) => {
                // In order: a part's argument may hold an earlier (inner) part's placeholder.
                let mut done: Vec<(String, Expr)> = Vec::with_capacity(parts.len());
                for (i, part) in parts.into_iter().enumerate() {
                    let arg = with_parts(polars(&part.arg)?, &done);
                    done.push((placeholder(i), split_part(arg, part.sep, part.n)));
                }
                Ok(with_parts(expr, &done))
            }
            Err(_) => polars(&sql),
        },
        None => polars(&sql),
    }
}

/// A `split_part(arg, 'sep', n)` call with a literal non-empty separator and a literal n ≥ 1.
struct SplitPart {
    arg: String,
    sep: String,
    n: usize,
}

fn placeholder(i: usize) -> String {
    format!("__lambda_split_part_{i}")
}

/// `sql` with each `split_part(arg, 'sep', n)` of literal `sep` (non-empty) and `n` (≥ 1)
/// replaced by a placeholder column, innermost first; None when it has none (or does not parse
/// as one expression, or already names a placeholder). polars SQL runs `split_part` as a split
/// into a list of every part, a list lookup and two conditionals (≈ 100 ns per event on the
/// speed layer's plan bench); [`split_part`] finds the one part it asks for.
fn split_parts(sql: &str) -> Option<(String, Vec<SplitPart>)> {
    use sqlparser::ast::{
        Expr as Sql, FunctionArg, FunctionArgExpr, FunctionArguments, Ident, Value, ValueWithSpan,
        visit_expressions_mut,
    };
    if !sql.to_ascii_lowercase().contains("split_part") || sql.contains("__lambda_split_part_") {
        return None;
    }
    let dialect = sqlparser::dialect::GenericDialect;
    let mut parser = sqlparser::parser::Parser::new(&dialect)
        .try_with_sql(sql)
        .ok()?;
    let mut expr = parser.parse_expr().ok()?;
    if parser.peek_token().token != sqlparser::tokenizer::Token::EOF {
        return None;
    }
    let mut parts = Vec::new();
    let _ = visit_expressions_mut(&mut expr, |e| {
        let Sql::Function(f) = &*e else {
            return std::ops::ControlFlow::<()>::Continue(());
        };
        let named = f.name.0.len() == 1
            && f.name.0[0].as_ident().is_some_and(|i| {
                i.quote_style.is_none() && i.value.eq_ignore_ascii_case("split_part")
            });
        let plain = f.filter.is_none()
            && f.over.is_none()
            && f.null_treatment.is_none()
            && f.within_group.is_empty()
            && matches!(f.parameters, FunctionArguments::None);
        let args = match &f.args {
            FunctionArguments::List(l)
                if l.duplicate_treatment.is_none() && l.clauses.is_empty() =>
            {
                l.args
                    .iter()
                    .map(|a| match a {
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
                        _ => None,
                    })
                    .collect::<Option<Vec<_>>>()
            }
            _ => None,
        };
        if let (true, true, Some([arg, sep, n])) = (named, plain, args.as_deref()) {
            let literal = |e: &Sql| match e {
                Sql::Value(ValueWithSpan { value, .. }) => Some(value.clone()),
                _ => None,
            };
            if let (Some(Value::SingleQuotedString(sep)), Some(Value::Number(n, false))) =
                (literal(sep), literal(n))
                && let Ok(n @ 1..) = n.parse::<usize>()
                && !sep.is_empty()
            {
                parts.push(SplitPart {
                    arg: arg.to_string(),
                    sep,
                    n,
                });
                *e = Sql::Identifier(Ident::with_quote('"', placeholder(parts.len() - 1)));
            }
        }
        std::ops::ControlFlow::Continue(())
    });
    (!parts.is_empty()).then(|| (expr.to_string(), parts))
}

/// `expr` with each placeholder column of `parts` replaced by its expression.
fn with_parts(expr: Expr, parts: &[(String, Expr)]) -> Expr {
    if parts.is_empty() {
        return expr;
    }
    expr.map_expr(|e| match &e {
        Expr::Column(name) => parts
            .iter()
            .find(|(p, _)| p.as_str() == name.as_str())
            .map_or(e, |(_, part)| part.clone()),
        _ => e,
    })
}

/// `split_part(arg, sep, n)` as polars SQL defines it — the `n`th (1-based) part of `arg` split
/// at `sep`, `''` past the last part, null for null — in one pass that keeps only that part.
fn split_part(arg: Expr, sep: String, n: usize) -> Expr {
    arg.map(
        move |c| {
            let name = c.name().clone();
            if c.dtype().is_null() {
                return Ok(Column::full_null(name, c.len(), &DataType::String));
            }
            let ca = c.str()?;
            let nth = n - 1;
            let out: StringChunked = match sep.as_bytes() {
                [b] if b.is_ascii() => {
                    let sep = *b as char;
                    ca.iter()
                        .map(|v| v.map(|s| s.split(sep).nth(nth).unwrap_or("")))
                        .collect()
                }
                _ => ca
                    .iter()
                    .map(|v| v.map(|s| s.split(sep.as_str()).nth(nth).unwrap_or("")))
                    .collect(),
            };
            Ok(out.with_name(name).into_column())
        },
        |_, field| match field.dtype() {
            DataType::String | DataType::Null => {
                Ok(Field::new(field.name().clone(), DataType::String))
            }
            other => polars_bail!(
                InvalidOperation: "split_part expects a string, found {other} (cast it first: CAST(x AS VARCHAR))"
            ),
        },
    )
}

/// `sql` with every unquoted qualified name `a.b` written as the quoted identifier `"a.b"`,
/// the name of the column the plan joins in for lookup `a`'s column `b`. String literals,
/// quoted identifiers, comments and numbers (`1.5`) are left as they are.
pub fn qualify(sql: &str) -> String {
    let b = sql.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let starts_word = |c: u8| c.is_ascii_alphabetic() || c == b'_';
    let mut out = String::with_capacity(sql.len() + 4);
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'\'' || c == b'"' {
            // A literal or quoted identifier; a doubled quote inside it escapes the quote.
            let mut j = i + 1;
            while j < b.len() {
                if b[j] == c {
                    if b.get(j + 1) == Some(&c) {
                        j += 2;
                        continue;
                    }
                    break;
                }
                j += 1;
            }
            let end = (j + 1).min(b.len());
            out.push_str(&sql[i..end]);
            i = end;
        } else if b[i..].starts_with(b"--") {
            let end = b[i..]
                .iter()
                .position(|c| *c == b'\n')
                .map_or(b.len(), |n| i + n);
            out.push_str(&sql[i..end]);
            i = end;
        } else if starts_word(c) && (i == 0 || !(word(b[i - 1]) || b[i - 1] == b'.')) {
            let end = i + b[i..].iter().take_while(|c| word(**c)).count();
            let qualified =
                b.get(end) == Some(&b'.') && b.get(end + 1).is_some_and(|c| starts_word(*c));
            if qualified {
                let end2 = end + 1 + b[end + 1..].iter().take_while(|c| word(**c)).count();
                // `a.b.c` or `a.b(` is not a lookup column: leave it to the SQL parser.
                if !matches!(b.get(end2), Some(b'.' | b'(')) {
                    out.push('"');
                    out.push_str(&sql[i..end2]);
                    out.push('"');
                    i = end2;
                    continue;
                }
            }
            out.push_str(&sql[i..end]);
            i = end;
        } else {
            // Copy the whole UTF-8 character.
            let len = sql[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&sql[i..i + len]);
            i += len;
        }
    }
    out
}

/// Checks that `sql` parses, names only `columns`, and type-checks; returns its result type.
pub fn check(sql: &str, columns: &[(String, ColumnType)]) -> Result<ColumnType, String> {
    let expr = parse(sql)?;
    for root in expr.clone().meta().root_names() {
        if !columns.iter().any(|(n, _)| n == root.as_str()) {
            return Err(format!(
                "unknown column `{root}`{}",
                did_you_mean(root.as_str(), columns.iter().map(|(n, _)| n.as_str()))
            ));
        }
    }
    let mut lf = DataFrame::empty_with_schema(&schema_of(columns))
        .lazy()
        .select([expr.alias("__out")]);
    let schema = lf
        .collect_schema()
        .map_err(|e| first_line(&e.to_string()))?;
    let dt = schema.get("__out").cloned().unwrap_or(DataType::Null);
    column_type(&dt)
        .ok_or_else(|| format!("its type `{dt}` is not one of string, int, float, bool, timestamp"))
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cols() -> Vec<(String, ColumnType)> {
        vec![
            ("page".into(), ColumnType::String),
            ("latency_ms".into(), ColumnType::Float),
            ("n".into(), ColumnType::Int),
            ("ts".into(), ColumnType::Timestamp),
        ]
    }

    /// `sql` over `values` (a string column `s`), as polars SQL computes it and as `parse` does.
    fn both_ways(sql: &str, values: &[Option<String>]) -> (Series, Series) {
        let df = df!("s" => values.to_vec()).expect("frame");
        let run = |e: Expr| {
            df.clone()
                .lazy()
                .select([e.alias("out")])
                .collect()
                .expect("runs")
                .column("out")
                .expect("out")
                .as_materialized_series()
                .clone()
        };
        let theirs = run(polars::sql::sql_expr(sql).expect("polars parses"));
        (theirs, run(parse(sql).expect("parses")))
    }

    proptest::proptest! {
        #[test]
        fn split_part_computes_what_polars_sql_computes(
            values in proptest::collection::vec(
                proptest::option::weighted(0.9, "[a/é-]{0,9}"),
                1..20,
            ),
        ) {
            for sql in [
                "split_part(s, '/', 1)",
                "split_part(s, '/', 2)",
                "SPLIT_PART(s, '/', 4)",
                "split_part(s, '-/', 2)",
                "split_part(s, 'é', 2)",
                "upper(split_part(split_part(s, '/', 2), '-', 1)) || split_part(s, '-', 3)",
                "split_part(s, '/', length(s) % 3 + 1)",
                "split_part(s, '/', -1)",
            ] {
                let (theirs, ours) = both_ways(sql, &values);
                proptest::prop_assert!(theirs.equals_missing(&ours), "{sql}: {theirs:?} vs {ours:?}");
            }
        }
    }

    #[test]
    fn split_part_with_literal_arguments_runs_as_one_pass() {
        let (rewritten, parts) =
            split_parts("upper(split_part(split_part(s, '/', 2), '-', 1))").expect("rewritten");
        assert_eq!(rewritten, "upper(\"__lambda_split_part_1\")");
        assert_eq!(parts[0].arg, "s");
        assert_eq!(parts[1].arg, "\"__lambda_split_part_0\"");
        assert!(split_parts("split_part(s, '/', n)").is_none());
        assert!(split_parts("split_part(s, '', 1)").is_none());
        assert!(split_parts("split_part(s, '/', 0)").is_none());
        assert_eq!(
            check("split_part(n, '/', 2)", &cols()).unwrap_err(),
            "split_part expects a string, found i64 (cast it first: CAST(x AS VARCHAR))"
        );
        assert_eq!(
            check("split_part(page, '/', 2) = 'cart'", &cols()).unwrap(),
            ColumnType::Bool
        );
    }

    #[test]
    fn types_of_expressions() {
        assert_eq!(check("latency_ms >= 0", &cols()).unwrap(), ColumnType::Bool);
        assert_eq!(
            check("split_part(page, '/', 2)", &cols()).unwrap(),
            ColumnType::String
        );
        assert_eq!(check("n * 2", &cols()).unwrap(), ColumnType::Int);
        assert_eq!(
            check("latency_ms / 1000", &cols()).unwrap(),
            ColumnType::Float
        );
    }

    #[test]
    fn qualified_names_become_quoted_identifiers() {
        assert_eq!(qualify("stores.region"), "\"stores.region\"");
        assert_eq!(
            qualify("upper(stores.region) || ' ' || 'a.b' || \"x.y\""),
            "upper(\"stores.region\") || ' ' || 'a.b' || \"x.y\""
        );
        assert_eq!(qualify("n * 1.5 + s.v"), "n * 1.5 + \"s.v\"");
        assert_eq!(qualify("'it''s a.b' = p.q"), "'it''s a.b' = \"p.q\"");
        assert_eq!(qualify("a.b.c"), "a.b.c");
        assert_eq!(qualify("été.x"), "été.x");
        let mut cols = cols();
        cols.push(("stores.region".into(), ColumnType::String));
        assert_eq!(
            check("concat(stores.region, '/', page)", &cols).unwrap(),
            ColumnType::String
        );
        assert_eq!(
            check("stores.regin = 'x'", &cols).unwrap_err(),
            "unknown column `stores.regin` (did you mean `stores.region`?)"
        );
    }

    #[test]
    fn rejects_unknown_columns_and_bad_sql() {
        assert_eq!(
            check("latncy_ms > 0", &cols()).unwrap_err(),
            "unknown column `latncy_ms` (did you mean `latency_ms`?)"
        );
        assert!(
            check("latency_ms >=", &cols())
                .unwrap_err()
                .starts_with("not a valid SQL expression")
        );
    }
}
