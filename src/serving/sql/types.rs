//! From polars columns to PostgreSQL values: the type of each result column (its OID in the
//! RowDescription) and each cell in text or binary format.
//!
//! | polars                         | PostgreSQL    |
//! |--------------------------------|---------------|
//! | Int8…Int64, UInt8…UInt64       | `int8`        |
//! | Float32, Float64               | `float8`      |
//! | Boolean                        | `bool`        |
//! | Datetime (UTC, any unit)       | `timestamptz` |
//! | Date                           | `date`        |
//! | String, Null and anything else | `text`        |

use std::error::Error;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, NaiveDate};
use pgwire::api::Type;
use pgwire::api::results::{DataRowEncoder, FieldFormat, FieldInfo};
use pgwire::error::PgWireResult;
use pgwire::messages::data::DataRow;
use pgwire::types::ToSqlText;
use pgwire::types::format::FormatOptions;
use polars::prelude::*;
use postgres_types::{IsNull, ToSql, to_sql_checked};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_US: i64 = 946_684_800_000_000;
/// Days from the Unix epoch to PostgreSQL's.
const PG_EPOCH_DAYS: i32 = 10_957;

/// The PostgreSQL type a polars column is sent as.
pub fn pg_type(dtype: &DataType) -> Type {
    match dtype {
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => Type::INT8,
        DataType::Float32 | DataType::Float64 => Type::FLOAT8,
        DataType::Boolean => Type::BOOL,
        DataType::Datetime(_, _) => Type::TIMESTAMPTZ,
        DataType::Date => Type::DATE,
        _ => Type::TEXT,
    }
}

/// The name `format_type` and `information_schema.columns.data_type` give a type.
pub fn type_name(t: &Type) -> &'static str {
    match *t {
        Type::INT8 => "bigint",
        Type::FLOAT8 => "double precision",
        Type::BOOL => "boolean",
        Type::TIMESTAMPTZ => "timestamp with time zone",
        Type::DATE => "date",
        _ => "text",
    }
}

/// The row description of `schema`, every column in `format(i)`.
pub fn fields(schema: &Schema, format: impl Fn(usize) -> FieldFormat) -> Vec<FieldInfo> {
    schema
        .iter()
        .enumerate()
        .map(|(i, (name, dtype))| {
            FieldInfo::new(name.to_string(), None, None, pg_type(dtype), format(i))
        })
        .collect()
}

/// A UTC instant in microseconds since the Unix epoch, sent as `timestamptz`.
#[derive(Debug, Clone, Copy)]
pub struct Timestamptz(pub i64);

impl ToSql for Timestamptz {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_i64(
            self.0
                .checked_sub(PG_EPOCH_US)
                .ok_or("timestamp out of range")?,
        );
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        matches!(*ty, Type::TIMESTAMPTZ | Type::TIMESTAMP)
    }

    to_sql_checked!();
}

impl ToSqlText for Timestamptz {
    fn to_sql_text(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
        _format_options: &FormatOptions,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_slice(format_timestamptz(self.0).as_bytes());
        Ok(IsNull::No)
    }
}

/// PostgreSQL's ISO output of a `timestamptz` in UTC: `2026-11-21 10:00:00.5+00`.
pub fn format_timestamptz(micros: i64) -> String {
    let Some(t) = DateTime::from_timestamp_micros(micros) else {
        return micros.to_string();
    };
    let mut s = t.format("%Y-%m-%d %H:%M:%S").to_string();
    let frac = micros.rem_euclid(1_000_000);
    if frac != 0 {
        let digits = format!(".{frac:06}");
        s.push_str(digits.trim_end_matches('0'));
    }
    s.push_str("+00");
    s
}

/// Days since the Unix epoch, sent as `date`.
#[derive(Debug, Clone, Copy)]
pub struct PgDate(pub i32);

impl ToSql for PgDate {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        out.put_i32(
            self.0
                .checked_sub(PG_EPOCH_DAYS)
                .ok_or("date out of range")?,
        );
        Ok(IsNull::No)
    }

    fn accepts(ty: &Type) -> bool {
        *ty == Type::DATE
    }

    to_sql_checked!();
}

impl ToSqlText for PgDate {
    fn to_sql_text(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
        _format_options: &FormatOptions,
    ) -> Result<IsNull, Box<dyn Error + Sync + Send>> {
        let text = NaiveDate::from_ymd_opt(1970, 1, 1)
            .and_then(|d| d.checked_add_signed(chrono::Duration::days(i64::from(self.0))))
            .map_or_else(|| self.0.to_string(), |d| d.format("%Y-%m-%d").to_string());
        out.put_slice(text.as_bytes());
        Ok(IsNull::No)
    }
}

/// One result column, cast to the form its PostgreSQL type is encoded from.
enum Cells {
    Int(Int64Chunked),
    Float(Float64Chunked),
    Bool(BooleanChunked),
    /// Microseconds since the Unix epoch.
    Time(Int64Chunked),
    Date(Int32Chunked),
    Text(StringChunked),
}

impl Cells {
    fn new(column: &Column) -> PolarsResult<Cells> {
        let s = column.as_materialized_series();
        Ok(match pg_type(s.dtype()) {
            Type::INT8 => Cells::Int(s.cast(&DataType::Int64)?.i64()?.rechunk().into_owned()),
            Type::FLOAT8 => Cells::Float(s.cast(&DataType::Float64)?.f64()?.rechunk().into_owned()),
            Type::BOOL => Cells::Bool(s.bool()?.rechunk().into_owned()),
            Type::TIMESTAMPTZ => {
                let us = s.cast(&DataType::Datetime(TimeUnit::Microseconds, None))?;
                Cells::Time(us.cast(&DataType::Int64)?.i64()?.rechunk().into_owned())
            }
            Type::DATE => Cells::Date(s.cast(&DataType::Int32)?.i32()?.rechunk().into_owned()),
            _ => Cells::Text(s.cast(&DataType::String)?.str()?.rechunk().into_owned()),
        })
    }

    fn encode(&self, row: usize, out: &mut DataRowEncoder) -> PgWireResult<()> {
        match self {
            Cells::Int(c) => out.encode_field(&c.get(row)),
            Cells::Float(c) => out.encode_field(&c.get(row)),
            Cells::Bool(c) => out.encode_field(&c.get(row)),
            Cells::Time(c) => out.encode_field(&c.get(row).map(Timestamptz)),
            Cells::Date(c) => out.encode_field(&c.get(row).map(PgDate)),
            Cells::Text(c) => out.encode_field(&c.get(row)),
        }
    }
}

/// The rows of a result, encoded one by one as they are sent: a large answer is never held
/// twice, once as columns and once as messages.
pub struct Rows {
    fields: Arc<Vec<FieldInfo>>,
    columns: Vec<Cells>,
    next: usize,
    height: usize,
}

impl Rows {
    pub fn new(df: &DataFrame, fields: Arc<Vec<FieldInfo>>) -> PolarsResult<Rows> {
        let columns = df
            .columns()
            .iter()
            .map(Cells::new)
            .collect::<PolarsResult<Vec<_>>>()?;
        Ok(Rows {
            fields,
            columns,
            next: 0,
            height: df.height(),
        })
    }
}

impl Iterator for Rows {
    type Item = PgWireResult<DataRow>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.height {
            return None;
        }
        let row = self.next;
        self.next += 1;
        let mut encoder = DataRowEncoder::new(self.fields.clone());
        for c in &self.columns {
            if let Err(e) = c.encode(row, &mut encoder) {
                return Some(Err(e));
            }
        }
        Some(encoder.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_print_as_postgres_does() {
        assert_eq!(
            format_timestamptz(1_763_719_200_000_000),
            "2025-11-21 10:00:00+00"
        );
        assert_eq!(
            format_timestamptz(1_763_719_200_500_000),
            "2025-11-21 10:00:00.5+00"
        );
        assert_eq!(format_timestamptz(-1), "1969-12-31 23:59:59.999999+00");
    }

    #[test]
    fn binary_timestamps_count_from_2000() {
        let mut out = BytesMut::new();
        Timestamptz(PG_EPOCH_US + 1)
            .to_sql(&Type::TIMESTAMPTZ, &mut out)
            .unwrap();
        assert_eq!(&out[..], &1i64.to_be_bytes());
        let mut out = BytesMut::new();
        PgDate(PG_EPOCH_DAYS).to_sql(&Type::DATE, &mut out).unwrap();
        assert_eq!(&out[..], &0i32.to_be_bytes());
    }

    #[test]
    fn every_column_type_maps_to_one_oid() {
        for (dtype, oid) in [
            (DataType::UInt32, 20),
            (DataType::Int64, 20),
            (DataType::Float64, 701),
            (DataType::Boolean, 16),
            (DataType::Datetime(TimeUnit::Milliseconds, None), 1184),
            (DataType::String, 25),
            (DataType::Null, 25),
        ] {
            assert_eq!(pg_type(&dtype).oid(), oid, "{dtype:?}");
        }
    }

    #[test]
    fn rows_encode_every_type_in_text() {
        let df = df!(
            "n" => [Some(1i64), None],
            "x" => [1.5f64, 2.0],
            "ok" => [true, false],
            "t" => [0i64, 1_000],
            "s" => ["a", "b"],
        )
        .unwrap()
        .lazy()
        .with_column(col("t").cast(DataType::Datetime(TimeUnit::Milliseconds, None)))
        .collect()
        .unwrap();
        let fields = Arc::new(fields(df.schema(), |_| FieldFormat::Text));
        let rows: Vec<DataRow> = Rows::new(&df, fields)
            .unwrap()
            .collect::<PgWireResult<_>>()
            .unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].field_count, 5);
    }
}
