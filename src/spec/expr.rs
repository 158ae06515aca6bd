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
    polars::sql::sql_expr(qualify(sql))
        .map_err(|e| format!("not a valid SQL expression: {}", first_line(&e.to_string())))
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
