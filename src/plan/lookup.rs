//! Lookups in the plan: one version of a reference table, indexed once per process and shared
//! (`Arc`) by every micro-batch and batch scan, and the join of a table to events — the same
//! code in both layers, so an event enriched by the speed layer and by the batch layer with the
//! same version gets the same columns.
//!
//! The join is a left join on `on = key` done with the table's hash index: per event, the
//! row of the table (or none), then each referenced column gathered by those row numbers. With
//! `valid_from`/`valid_to` the row is the one whose period holds the event time. It runs as
//! elementwise polars expressions, so it streams with the rest of the plan.

use std::collections::BTreeMap;
use std::sync::Arc;

use polars::prelude::*;

use super::keyindex::{Key, KeyIndex};
use crate::spec::expr;
use crate::spec::{ColumnType, Lookup};

/// A key's periods `[from, to)` (epoch ms; open bounds as `i64::MIN`/`MAX`) with their rows,
/// sorted by start, never overlapping.
type Periods = Vec<(i64, i64, IdxSize)>;

/// The row of `periods` holding `t`, if any.
fn period_at(periods: &Periods, t: Option<i64>) -> Option<IdxSize> {
    let t = t?;
    // The last period starting at or before `t`, if it has not ended by `t`.
    let i = periods.partition_point(|(from, _, _)| *from <= t);
    let (_, to, row) = periods.get(i.checked_sub(1)?)?;
    (t < *to).then_some(*row)
}

/// Key → slot: the key's row, or in an effective-dated table the index of its periods in
/// [`LookupTable::periods`]; probed a group of events at a time ([`KeyIndex`]).
#[derive(Debug)]
enum Index {
    Str(KeyIndex<PlSmallStr>),
    Int(KeyIndex<i64>),
}

/// One version of a lookup table: its declared columns, typed, and the index of its key.
#[derive(Debug)]
pub struct LookupTable {
    name: String,
    version: String,
    frame: DataFrame,
    index: Index,
    /// Effective-dated tables: each key's periods, by its slot.
    periods: Option<Vec<Periods>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("lookup `{lookup}`: {reason}")]
    Invalid { lookup: String, reason: String },
    #[error(transparent)]
    Polars(#[from] PolarsError),
}

impl LookupTable {
    /// Indexes `frame` (one version of `lookup`'s table, named `version`). The frame is cast
    /// to the declared schema; a declared column it lacks is an error, extra columns are
    /// dropped. Rows with a null key are ignored (no event matches them). A key given twice
    /// is an error — or, with effective dating, two periods of a key that overlap.
    pub fn new(lookup: &Lookup, version: &str, frame: DataFrame) -> Result<Self, TableError> {
        let invalid = |reason: String| TableError::Invalid {
            lookup: lookup.name.clone(),
            reason,
        };
        let mut columns = Vec::with_capacity(lookup.schema.len());
        for (name, t) in &lookup.schema {
            let c = frame.column(name).map_err(|_| {
                invalid(format!(
                    "the table has no column `{name}` (it has: {})",
                    frame
                        .get_column_names()
                        .iter()
                        .map(|c| c.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            let want = expr::dtype(*t);
            let cast = if c.dtype() == &want {
                c.clone()
            } else {
                c.strict_cast(&want).map_err(|e| {
                    invalid(format!(
                        "column `{name}` is {} and cannot be read as {}: {}",
                        c.dtype(),
                        t.name(),
                        e.to_string().lines().next().unwrap_or("")
                    ))
                })?
            };
            columns.push(cast);
        }
        let frame = DataFrame::new_infer_height(columns)?;
        let periods = match &lookup.valid {
            None => None,
            Some((from, to)) => {
                let ms = |c: &str| -> PolarsResult<Vec<Option<i64>>> {
                    Ok(frame
                        .column(c)?
                        .cast(&DataType::Int64)?
                        .i64()?
                        .iter()
                        .collect())
                };
                Some((ms(from)?, ms(to)?))
            }
        };
        if IdxSize::try_from(frame.height()).is_err() {
            return Err(invalid(format!("{} rows are too many", frame.height())));
        }
        let key = frame.column(&lookup.key)?;
        let dup = |k: &dyn std::fmt::Display| {
            invalid(format!(
                "key `{k}` appears in more than one row (a key names one row{})",
                if lookup.valid.is_some() {
                    " per period: these periods overlap"
                } else {
                    ""
                }
            ))
        };
        let mut keyed = periods.as_ref().map(|bounds| (bounds, Vec::new()));
        let index = match lookup.column_type(&lookup.key) {
            Some(ColumnType::String) => {
                let mut map = KeyIndex::with_capacity(frame.height());
                for (row, k) in (0..).zip(key.str()?.iter()) {
                    if let Some(k) = k {
                        insert(&mut map, k.into(), row, keyed.as_mut()).map_err(|()| dup(&k))?;
                    }
                }
                Index::Str(map)
            }
            Some(ColumnType::Int) => {
                let mut map = KeyIndex::with_capacity(frame.height());
                for (row, k) in (0..).zip(key.i64()?.iter()) {
                    if let Some(k) = k {
                        insert(&mut map, k, row, keyed.as_mut()).map_err(|()| dup(&k))?;
                    }
                }
                Index::Int(map)
            }
            other => {
                return Err(invalid(format!(
                    "key column `{}` is {:?}; a key is a string or an int",
                    lookup.key, other
                )));
            }
        };
        let mut table = LookupTable {
            name: lookup.name.clone(),
            version: version.to_string(),
            frame,
            index,
            periods: keyed.map(|(_, periods)| periods),
        };
        table.sort_periods().map_err(|k| dup(&k))?;
        Ok(table)
    }

    /// The same table under another version name (a table is indexed before the hash of
    /// its bytes, its version, is known).
    pub fn with_version(self, version: &str) -> Self {
        LookupTable {
            version: version.to_string(),
            ..self
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The version: the content hash of the table as stored in the lake.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn rows(&self) -> usize {
        self.frame.height()
    }

    /// The table's declared columns, as indexed.
    pub fn frame(&self) -> &DataFrame {
        &self.frame
    }

    /// Sorts each key's periods and checks that none overlap; on overlap, the key.
    fn sort_periods(&mut self) -> Result<(), String> {
        fn check<K: Key + std::fmt::Display>(
            map: &KeyIndex<K>,
            periods: &mut [Periods],
        ) -> Result<(), String> {
            for (k, slot) in map.iter() {
                let p = &mut periods[slot as usize];
                p.sort_unstable();
                if p.windows(2).any(|w| w[1].0 < w[0].1) {
                    return Err(k.to_string());
                }
            }
            Ok(())
        }
        let Some(periods) = &mut self.periods else {
            return Ok(());
        };
        match &self.index {
            Index::Str(m) => check(m, periods),
            Index::Int(m) => check(m, periods),
        }
    }

    /// The row of `slot` (a key's) for an event at `t`.
    fn row_at(&self, slot: u32, t: Option<i64>) -> Option<IdxSize> {
        match &self.periods {
            None => Some(slot),
            Some(periods) => period_at(&periods[slot as usize], t),
        }
    }

    /// The table's row for each event (`on` values, and event times in epoch ms when the
    /// table is effective-dated); null where none.
    fn row_numbers(&self, on: &Column, times: Option<&Column>) -> PolarsResult<IdxCa> {
        let times: Option<Vec<Option<i64>>> = match times {
            Some(t) => Some(t.cast(&DataType::Int64)?.i64()?.iter().collect()),
            None => None,
        };
        let at = |i: usize| times.as_ref().and_then(|t| t[i]);
        let name = PlSmallStr::from_static("__lookup_row");
        Ok(match &self.index {
            Index::Str(map) => {
                let on = on.cast(&DataType::String)?;
                let keys: Vec<Option<&str>> = on.str()?.iter().collect();
                self.rows_of(name, map.get_all(&keys), at)
            }
            Index::Int(map) => {
                let on = on.cast(&DataType::Int64)?;
                let keys: Vec<Option<i64>> = on.i64()?.iter().collect();
                self.rows_of(name, map.get_all(&keys), at)
            }
        })
    }

    /// Each event's row from its key's slot (and its time).
    fn rows_of(
        &self,
        name: PlSmallStr,
        slots: Vec<Option<u32>>,
        at: impl Fn(usize) -> Option<i64>,
    ) -> IdxCa {
        IdxCa::from_iter_options(
            name,
            slots
                .into_iter()
                .enumerate()
                .map(|(i, slot)| self.row_at(slot?, at(i))),
        )
    }
}

/// Per row of an effective-dated table, its `valid_from` and `valid_to` (epoch ms; null:
/// open).
type Bounds = (Vec<Option<i64>>, Vec<Option<i64>>);

/// Adds row `row` under key `k`: as its slot, or with effective dating (the table's bounds
/// and the periods so far) to the key's periods. `Err` when the key already has a row it
/// would clash with.
fn insert<K: Key>(
    map: &mut KeyIndex<K>,
    k: K,
    row: IdxSize,
    dated: Option<&mut (&Bounds, Vec<Periods>)>,
) -> Result<(), ()> {
    match dated {
        None => {
            if !map.get_or_insert(k, row).1 {
                return Err(());
            }
        }
        Some(((from, to), periods)) => {
            let from = from[row as usize].unwrap_or(i64::MIN);
            let to = to[row as usize].unwrap_or(i64::MAX);
            if from >= to {
                // An empty period holds no event time.
                return Ok(());
            }
            let next = u32::try_from(periods.len()).map_err(|_| ())?;
            let (slot, new) = map.get_or_insert(k, next);
            if new {
                periods.push(Vec::new());
            }
            periods[slot as usize].push((from, to, row));
        }
    }
    Ok(())
}

/// The versions a micro-batch or a group of segments is enriched with: one table per lookup
/// of the pipeline, in the pipeline's order. Cheap to clone (the tables are shared).
#[derive(Debug, Clone, Default)]
pub struct LookupSet {
    tables: Vec<Arc<LookupTable>>,
}

impl LookupSet {
    /// The set for a pipeline without lookups.
    pub fn none() -> Self {
        LookupSet::default()
    }

    pub fn new(tables: Vec<Arc<LookupTable>>) -> Self {
        LookupSet { tables }
    }

    pub fn tables(&self) -> &[Arc<LookupTable>] {
        &self.tables
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// Lookup name → version.
    pub fn versions(&self) -> BTreeMap<String, String> {
        self.tables
            .iter()
            .map(|t| (t.name.clone(), t.version.clone()))
            .collect()
    }

    /// How a segment records the set: JSON `{"NAME": "VERSION", …}`; `None` without lookups.
    pub fn record(&self) -> Option<String> {
        (!self.tables.is_empty())
            .then(|| serde_json::to_string(&self.versions()).unwrap_or_default())
    }
}

/// What the plan joins for one lookup: the table's row per event, the columns taken from it.
#[derive(Debug, Clone)]
pub(super) struct Join {
    /// Index into the pipeline's lookups (and a [`LookupSet`]).
    pub lookup: usize,
    pub on: String,
    /// The pipeline's event-time column, for an effective-dated table.
    pub event_time: Option<String>,
    /// `(column of the table, NAME.COLUMN)` that filter or derived columns read.
    pub columns: Vec<(String, String, DataType)>,
    /// The events without a row are dropped (`on_missing: reject`).
    pub reject: bool,
    /// The column holding the table's row number (dropped after the join).
    pub row_column: String,
}

impl Join {
    /// The expressions adding the row number column, then the looked-up columns.
    pub fn exprs(&self, table: &Arc<LookupTable>) -> (Expr, Vec<Expr>) {
        let t = Arc::clone(table);
        let mut inputs = vec![];
        if let Some(et) = &self.event_time {
            inputs.push(col(et.as_str()));
        }
        let row_name: PlSmallStr = self.row_column.as_str().into();
        let out_name = row_name.clone();
        let rows = col(self.on.as_str())
            .map_many(
                move |cols: &mut [Column]| {
                    let rows = t.row_numbers(&cols[0], cols.get(1))?;
                    Ok(rows.with_name(out_name.clone()).into_column())
                },
                &inputs,
                move |_, _| Ok(Field::new(row_name.clone(), IDX_DTYPE)),
            )
            .alias(self.row_column.as_str());
        let taken = self
            .columns
            .iter()
            .map(|(column, alias, dtype)| {
                let t = Arc::clone(table);
                let (column, alias_name) = (column.clone(), PlSmallStr::from(alias.as_str()));
                let dtype = dtype.clone();
                let out = alias_name.clone();
                col(self.row_column.as_str())
                    .map(
                        move |rows: Column| {
                            let rows = rows.idx()?;
                            let c = t.frame.column(&column)?.take(rows)?;
                            Ok(c.with_name(out.clone()))
                        },
                        move |_, _| Ok(Field::new(alias_name.clone(), dtype.clone())),
                    )
                    .alias(alias.as_str())
            })
            .collect();
        (rows, taken)
    }
}

/// How a table's bytes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableFormat {
    /// With a header naming the columns, in any order.
    Csv,
    /// One JSON object per line (a PostgreSQL lookup's rows, `row_to_json`).
    Ndjson,
    Parquet,
}

/// The rows of `lookup`'s table from its source's bytes, typed by its `schema` with the
/// decoders events use (CSV and JSON) — every declared column must be there, and one bad
/// row fails the whole table: a refresh keeps the previous version rather than serve half of
/// a table.
pub fn read_table(
    lookup: &Lookup,
    format: TableFormat,
    bytes: &[u8],
) -> Result<DataFrame, TableError> {
    let invalid = |reason: String| TableError::Invalid {
        lookup: lookup.name.clone(),
        reason,
    };
    let text_format = match format {
        TableFormat::Parquet => {
            let frame = ParquetReader::new(std::io::Cursor::new(bytes))
                .finish()
                .map_err(|e| invalid(format!("not a readable Parquet file: {e}")))?;
            return Ok(frame);
        }
        TableFormat::Csv => crate::spec::Format::Csv,
        TableFormat::Ndjson => crate::spec::Format::Json,
    };
    if format == TableFormat::Csv {
        let text = String::from_utf8_lossy(bytes);
        let header = text
            .trim_start_matches('\u{feff}')
            .lines()
            .next()
            .unwrap_or("");
        let names: Vec<&str> = header
            .split(',')
            .map(|h| h.trim().trim_matches('"'))
            .collect();
        let missing: Vec<&str> = lookup
            .schema
            .iter()
            .map(|(c, _)| c.as_str())
            .filter(|c| !names.contains(c))
            .collect();
        if !missing.is_empty() {
            return Err(invalid(format!(
                "the CSV header `{}` lacks the column(s) {} of the lookup's schema",
                header.chars().take(200).collect::<String>(),
                missing.join(", ")
            )));
        }
    }
    let decoded = super::decode::Decoder::table(text_format, &lookup.schema).decode(bytes);
    if let Some(first) = decoded.rejected.first() {
        return Err(invalid(format!(
            "{} bad row(s); line {}: {}",
            decoded.rejected.len(),
            first.line,
            first.reason
        )));
    }
    Ok(decoded.events)
}

/// A table as the lake keeps one version of it (zstd Parquet of the declared columns) and
/// that version's name: the hash of those bytes. The same rows give the same bytes, so an
/// unchanged table is the same version, however often it is read.
pub fn version_bytes(table: &DataFrame) -> PolarsResult<(String, Vec<u8>)> {
    let mut df = table.clone();
    let mut buf = Vec::new();
    ParquetWriter::new(&mut buf)
        .with_compression(ParquetCompression::Zstd(None))
        .finish(&mut df)?;
    let hash = xxhash_rust::xxh3::xxh3_128(&buf);
    Ok((format!("{hash:032x}"), buf))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::spec::{FileFormat, LookupSource, OnMissing};

    pub(crate) fn stores(valid: bool) -> Lookup {
        let mut schema = vec![
            ("store_id".to_string(), ColumnType::String),
            ("region".to_string(), ColumnType::String),
            ("rate".to_string(), ColumnType::Float),
        ];
        if valid {
            schema.push(("from".into(), ColumnType::Timestamp));
            schema.push(("to".into(), ColumnType::Timestamp));
        }
        Lookup {
            name: "stores".into(),
            from: LookupSource::File {
                path: "reference/stores.csv".into(),
                format: FileFormat::Csv,
                options: Default::default(),
            },
            key: "store_id".into(),
            on: "store".into(),
            schema,
            refresh: Some(Duration::from_secs(600)),
            on_missing: OnMissing::Null,
            valid: valid.then(|| ("from".into(), "to".into())),
        }
    }

    fn table(lookup: &Lookup, csv: &str) -> Result<LookupTable, TableError> {
        let frame = read_table(lookup, TableFormat::Csv, csv.as_bytes())?;
        let (version, _) = version_bytes(&frame)?;
        LookupTable::new(lookup, &version, frame)
    }

    fn rows(t: &LookupTable, on: &[Option<&str>], times: Option<&[i64]>) -> Vec<Option<IdxSize>> {
        let on = Column::new("on".into(), on);
        let times = times.map(|t| Column::new("t".into(), t));
        t.row_numbers(&on, times.as_ref()).unwrap().iter().collect()
    }

    #[test]
    fn a_key_finds_its_row_and_a_missing_key_none() {
        let l = stores(false);
        let t = table(&l, "region,store_id,rate\nnorth,s1,1.5\nsouth,s2,\n,,3\n").unwrap();
        assert_eq!(t.rows(), 3);
        assert_eq!(
            rows(&t, &[Some("s2"), Some("s9"), None, Some("s1")], None),
            [Some(1), None, None, Some(0)]
        );
        // The same rows in another order are another version; the same rows the same one.
        let again = table(&l, "region,store_id,rate\nnorth,s1,1.5\nsouth,s2,\n,,3\n").unwrap();
        assert_eq!(again.version(), t.version());
        let other = table(&l, "region,store_id,rate\nnorth,s1,1.5\nwest,s2,\n").unwrap();
        assert_ne!(other.version(), t.version());
    }

    #[test]
    fn a_bad_table_is_refused_whole() {
        let l = stores(false);
        let dup = table(&l, "store_id,region,rate\ns1,a,1\ns1,b,2\n").unwrap_err();
        assert_eq!(
            dup.to_string(),
            "lookup `stores`: key `s1` appears in more than one row (a key names one row)"
        );
        let bad = table(&l, "store_id,region,rate\ns1,a,x\n").unwrap_err();
        assert!(
            bad.to_string()
                .starts_with("lookup `stores`: 1 bad row(s); line 2: `rate`"),
            "{bad}"
        );
        let short = table(&l, "store_id,rate\ns1,1\n").unwrap_err();
        assert!(
            short.to_string().contains("lacks the column(s) region"),
            "{short}"
        );
    }

    /// A pipeline of `yaml` (a project of one file), compiled.
    fn compile(yaml: &str) -> (crate::spec::Pipeline, super::super::Plan) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        std::fs::write(dir.path().join("pipelines/p.yaml"), yaml).unwrap();
        let project = crate::spec::load(dir.path()).unwrap_or_else(|e| panic!("{e}"));
        let p = project.pipelines[0].clone();
        let plan = super::super::Plan::compile(&p).unwrap();
        (p, plan)
    }

    const SALES: &str = r#"
name: sales
source: {type: http}
schema: {ts: timestamp, store: string, amount: int}
event_time: ts
lookups:
  stores:
    from: reference/stores.csv
    key: store_id
    on: store
    on_missing: ON_MISSING
    schema: {store_id: string, region: string, test: bool}
filter: "stores.test IS NULL OR NOT stores.test"
columns:
  region: "coalesce(stores.region, 'none')"
  doubled: "amount * 2"
views:
  - name: by_region
    group_by: [region]
    window: all
    metrics: {n: count(), total: sum(doubled)}
"#;

    /// region → (n, total) as served, from finished rows.
    fn served_rows(df: &DataFrame) -> Vec<(String, i64, i64)> {
        let region = df.column("region").unwrap().str().unwrap().clone();
        let n = df.column("n").unwrap().cast(&DataType::Int64).unwrap();
        let total = df.column("total").unwrap().cast(&DataType::Int64).unwrap();
        (0..df.height())
            .map(|i| {
                (
                    region.get(i).unwrap().to_string(),
                    n.i64().unwrap().get(i).unwrap(),
                    total.i64().unwrap().get(i).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn the_speed_and_batch_paths_enrich_alike_and_equal_the_oracle() {
        let stores = "store_id,region,test\ns1,north,false\ns2,south,\nt1,lab,true\n";
        let mut events = String::new();
        let mut oracle: BTreeMap<(bool, String), (i64, i64)> = BTreeMap::new();
        for i in 0..300i64 {
            let store = ["s1", "s2", "t1", "s9"][(i % 4) as usize];
            events.push_str(&format!(
                "{{\"ts\":{},\"store\":\"{store}\",\"amount\":{}}}\n",
                1_700_000_000_000 + i,
                i % 17
            ));
            // The test store is filtered out; s9 has no row (null, or rejected).
            let region = match store {
                "s1" => "north",
                "s2" => "south",
                "t1" => continue,
                _ => "none",
            };
            for reject in [false, true] {
                if reject && store == "s9" {
                    continue;
                }
                let e = oracle.entry((reject, region.to_string())).or_default();
                e.0 += 1;
                e.1 += 2 * (i % 17);
            }
        }
        for reject in [false, true] {
            let yaml = SALES.replace("ON_MISSING", if reject { "reject" } else { "null" });
            let (p, plan) = compile(&yaml);
            let frame = read_table(&p.lookups[0], TableFormat::Csv, stores.as_bytes()).unwrap();
            let (version, _) = version_bytes(&frame).unwrap();
            let table = LookupTable::new(&p.lookups[0], &version, frame).unwrap();
            let set = LookupSet::new(vec![Arc::new(table)]);
            let decoded = plan.decode(events.as_bytes());
            assert!(decoded.rejected.is_empty());
            // The speed layer's way: micro-batches of 64, partials merged.
            let mut parts = Vec::new();
            let mut rejected = 0;
            let mut filtered = 0;
            for start in (0..decoded.events.height()).step_by(64) {
                let batch = decoded.events.slice(start as i64, 64);
                let m = plan.partials_masked(batch, &set).unwrap();
                for (name, missing) in &m.rejected {
                    assert_eq!(name, "stores");
                    rejected += missing.num_trues();
                }
                if let Some(f) = &m.filter {
                    filtered += f.len() - f.fill_null_with_values(true).unwrap().num_trues();
                }
                parts.push(m.parts.into_iter().next().unwrap());
            }
            let speed = plan.finish(0, plan.merge(0, parts).unwrap()).unwrap();
            // The batch layer's way: one lazy query on polars' streaming engine.
            let batch_parts = plan
                .partials(
                    0,
                    plan.prepare(decoded.events.clone().lazy(), &set).unwrap(),
                )
                .collect_with_engine(Engine::Streaming)
                .unwrap()
                .unwrap_single();
            let batch = plan.finish(0, batch_parts).unwrap();
            let want: Vec<(String, i64, i64)> = oracle
                .iter()
                .filter(|((r, _), _)| *r == reject)
                .map(|((_, region), (n, total))| (region.clone(), *n, *total))
                .collect();
            assert_eq!(
                served_rows(&speed),
                want,
                "speed, on_missing reject: {reject}"
            );
            assert_eq!(
                served_rows(&batch),
                want,
                "batch, on_missing reject: {reject}"
            );
            assert_eq!(rejected, if reject { 75 } else { 0 });
            assert_eq!(filtered, 75, "the test store's events");
            // Versions of another pipeline's lookups are refused, not joined.
            let wrong = plan.partials_masked(decoded.events.clone(), &LookupSet::none());
            assert!(wrong.is_err());
        }
    }

    #[test]
    fn the_logic_hash_follows_the_lookup_definition_not_its_source() {
        let base = SALES.replace("ON_MISSING", "null");
        let hash = |yaml: &str| compile(yaml).1.logic_hash(0);
        let h = hash(&base);
        assert_eq!(
            h,
            hash(&base.replace("reference/stores.csv", "reference/other.parquet"))
        );
        assert_eq!(
            h,
            hash(&base.replace("    on_missing: null\n", "    refresh: 5m\n"))
        );
        assert_ne!(
            h,
            hash(&base.replace("on_missing: null", "on_missing: reject"))
        );
        assert_ne!(
            h,
            hash(&base.replace("region: string,", "region: string, x: int,"))
        );
    }

    #[test]
    fn an_effective_dated_key_finds_the_period_holding_the_event_time() {
        let l = stores(true);
        let csv = "store_id,region,rate,from,to\n\
                   s1,old,1,,1000\n\
                   s1,new,2,1000,2000\n\
                   s1,newest,3,3000,\n";
        let t = table(&l, csv).unwrap();
        let s1 = Some("s1");
        assert_eq!(
            rows(
                &t,
                &[s1, s1, s1, s1, s1, s1],
                Some(&[-5, 999, 1000, 1999, 2500, 9_999_999])
            ),
            [Some(0), Some(0), Some(1), Some(1), None, Some(2)]
        );
        let overlap = "store_id,region,rate,from,to\ns1,a,1,0,1000\ns1,b,2,999,2000\n";
        assert!(
            table(&l, overlap)
                .unwrap_err()
                .to_string()
                .contains("overlap")
        );
    }
}
