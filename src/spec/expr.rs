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

/// Parses `sql` as a polars SQL expression.
pub fn parse(sql: &str) -> Result<Expr, String> {
    polars::sql::sql_expr(sql)
        .map_err(|e| format!("not a valid SQL expression: {}", first_line(&e.to_string())))
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
