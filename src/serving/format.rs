//! Rendering finished view rows: JSON objects for the API, CSV, and aligned tables for the CLI.

use polars::prelude::*;
use serde_json::{Map, Value};

use crate::clock::format_ms;

/// One JSON object per row; timestamps as RFC 3339 strings, non-finite floats as null.
pub fn rows_json(df: &DataFrame) -> Vec<Value> {
    rows_json_at(df, 0..df.height())
}

/// Rows `rows` of `df` (row numbers, each below its height), as [`rows_json`] makes them.
pub fn rows_json_at(df: &DataFrame, rows: impl IntoIterator<Item = usize>) -> Vec<Value> {
    let columns = df.columns();
    let names: Vec<String> = columns.iter().map(|c| c.name().to_string()).collect();
    rows.into_iter()
        .map(|i| {
            let mut obj = Map::with_capacity(names.len());
            for (name, col) in names.iter().zip(columns) {
                obj.insert(
                    name.clone(),
                    json_value(col.get(i).unwrap_or(AnyValue::Null)),
                );
            }
            Value::Object(obj)
        })
        .collect()
}

pub fn json_value(v: AnyValue) -> Value {
    match v {
        AnyValue::Null => Value::Null,
        AnyValue::Boolean(b) => Value::Bool(b),
        AnyValue::String(s) => Value::String(s.to_string()),
        AnyValue::StringOwned(s) => Value::String(s.to_string()),
        AnyValue::Int8(x) => x.into(),
        AnyValue::Int16(x) => x.into(),
        AnyValue::Int32(x) => x.into(),
        AnyValue::Int64(x) => x.into(),
        AnyValue::UInt8(x) => x.into(),
        AnyValue::UInt16(x) => x.into(),
        AnyValue::UInt32(x) => x.into(),
        AnyValue::UInt64(x) => x.into(),
        AnyValue::Float32(x) => {
            serde_json::Number::from_f64(f64::from(x)).map_or(Value::Null, Value::Number)
        }
        AnyValue::Float64(x) => serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number),
        AnyValue::Datetime(ms, unit, _) => Value::String(format_ms(to_ms(ms, unit))),
        AnyValue::DatetimeOwned(ms, unit, _) => Value::String(format_ms(to_ms(ms, unit))),
        other => Value::String(other.to_string()),
    }
}

fn to_ms(v: i64, unit: TimeUnit) -> i64 {
    match unit {
        TimeUnit::Milliseconds => v,
        TimeUnit::Microseconds => v.div_euclid(1_000),
        TimeUnit::Nanoseconds => v.div_euclid(1_000_000),
    }
}

/// CSV with a header row (RFC 4180 quoting).
pub fn csv(columns: &[String], rows: &[Value]) -> String {
    let mut out = String::new();
    out.push_str(
        &columns
            .iter()
            .map(|c| csv_cell(c))
            .collect::<Vec<_>>()
            .join(","),
    );
    out.push('\n');
    for row in rows {
        let cells: Vec<String> = columns
            .iter()
            .map(|c| csv_cell(&cell_text(row.get(c))))
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// An aligned text table for terminals.
pub fn table(columns: &[String], rows: &[Value]) -> String {
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| columns.iter().map(|c| cell_text(r.get(c))).collect())
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| {
            cells
                .iter()
                .map(|r| r[i].chars().count())
                .chain([c.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |vals: Vec<&str>| -> String {
        let padded: Vec<String> = vals
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        padded.join("  ").trim_end().to_string() + "\n"
    };
    let mut out = line(columns.iter().map(String::as_str).collect());
    out.push_str(&line(
        widths
            .iter()
            .map(|w| "─".repeat(*w))
            .collect::<Vec<_>>()
            .iter()
            .map(String::as_str)
            .collect(),
    ));
    for r in &cells {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

fn cell_text(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(f) if n.is_f64() => format_float(f),
            _ => n.to_string(),
        },
        Some(other) => other.to_string(),
    }
}

/// Floats with up to 6 significant decimals, without trailing zeros.
fn format_float(f: f64) -> String {
    let s = format!("{f:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_string()
    }
}

fn csv_cell(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_rows_in_every_format() {
        let df = df!(
            "window_start" => [Some(1_763_719_200_000i64), None],
            "page" => ["/a,b", "/c"],
            "views" => [3i64, 1],
            "avg" => [1.5f64, f64::NAN],
        )
        .unwrap()
        .lazy()
        .with_column(col("window_start").cast(DataType::Datetime(TimeUnit::Milliseconds, None)))
        .collect()
        .unwrap();
        let rows = rows_json(&df);
        assert_eq!(rows[0]["window_start"], "2025-11-21T10:00:00.000Z");
        assert_eq!(rows[1]["window_start"], Value::Null);
        assert_eq!(rows[1]["avg"], Value::Null);
        let cols: Vec<String> = ["window_start", "page", "views", "avg"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            csv(&cols, &rows),
            "window_start,page,views,avg\n2025-11-21T10:00:00.000Z,\"/a,b\",3,1.5\n,/c,1,\n"
        );
        let t = table(&cols, &rows);
        assert!(
            t.starts_with("window_start              page  views  avg\n"),
            "{t}"
        );
    }
}
