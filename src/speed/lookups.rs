//! A pipeline's lookup tables in this process (DESIGN.md §8: reference data is versioned like
//! logic). Reading a source (a CSV or Parquet file in the lake or at a URL, or a PostgreSQL
//! query) gives the table's rows; their Parquet bytes, named by their hash, are one
//! **version**, written to the lake (`lookups/{pipeline}/{lookup}/{version}.parquet`) before
//! any event is enriched with it. Each table version is indexed once per process and shared.
//!
//! - The speed layer enriches each segment with ONE set of versions (it takes the newest set
//!   only when a segment opens) and records that set with the segment; the batch layer and
//!   recovery load the recorded versions from the lake, so both layers join the same rows.
//! - A refresh that fails (source missing, PostgreSQL down, a bad row) keeps the last good
//!   version, logs, counts `lambda_lookup_refresh_failures_total` and retries sooner; ingest
//!   never waits for it. With no good version at all yet, the newest recorded one is used, or
//!   else an empty table (its columns null, or its events rejected with `on_missing: reject`).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use polars::prelude::*;
use tokio_util::sync::CancellationToken;

use crate::lake::{self, Lake};
use crate::plan::lookup::{TableFormat, read_table, version_bytes};
use crate::plan::{LookupSet, LookupTable};
use crate::spec::{FileFormat, Lookup, LookupSource, Pipeline, expr};

/// Longest wait before a failed refresh is tried again (sooner than `refresh` when that is
/// longer).
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);
/// A source that does not answer within this long has failed.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(60);

/// Live figures of one lookup, for `/metrics` and logs.
#[derive(Debug, Default)]
pub struct LookupStatus {
    pub refreshes: AtomicU64,
    pub failures: AtomicU64,
    /// Rows of the current version.
    pub rows: AtomicU64,
}

/// The lookups of one pipeline in this process.
pub struct Lookups {
    pipeline: Arc<Pipeline>,
    lake: Lake,
    /// Object-store settings of the lake, for a URL source on the same kind of store that
    /// has no `options` of its own.
    lake_options: BTreeMap<String, String>,
    /// The newest good version of every lookup, in the pipeline's order; `None` until the
    /// first load.
    current: RwLock<Option<LookupSet>>,
    /// Every version indexed in this process and still in use, by (lookup, version): a
    /// version is indexed once however many segments recorded it.
    indexed: Mutex<HashMap<(String, String), Weak<LookupTable>>>,
    /// A reader for one batch run or check keeps every version it indexed until it is
    /// dropped (its views share them); a server's keeps only those in use.
    pinned: Option<Mutex<Vec<Arc<LookupTable>>>>,
    /// Per lookup, in the pipeline's order.
    pub status: Vec<Arc<LookupStatus>>,
}

impl Lookups {
    pub fn new(
        pipeline: Arc<Pipeline>,
        lake: Lake,
        lake_options: BTreeMap<String, String>,
    ) -> Arc<Lookups> {
        let status = pipeline
            .lookups
            .iter()
            .map(|_| Arc::new(LookupStatus::default()))
            .collect();
        Arc::new(Lookups {
            pipeline,
            lake,
            lake_options,
            current: RwLock::new(None),
            indexed: Mutex::new(HashMap::new()),
            pinned: None,
            status,
        })
    }

    /// For reading the versions segments recorded (the batch layer, `verify`): no source is
    /// read through it, so it needs no object-store settings beyond the lake's.
    pub fn reader(pipeline: &Pipeline, lake: &Lake) -> Arc<Lookups> {
        let mut me = Lookups::new(Arc::new(pipeline.clone()), lake.clone(), BTreeMap::new());
        if let Some(m) = Arc::get_mut(&mut me) {
            m.pinned = Some(Mutex::new(Vec::new()));
        }
        me
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// The newest good versions (what a segment opening now is enriched with). Before the
    /// first [`Lookups::refresh_all`], the set without lookups.
    pub fn current(&self) -> LookupSet {
        self.current.read().clone().unwrap_or_default()
    }

    /// Reads every lookup's source and makes what it holds the current version (written to
    /// the lake first when new). A lookup whose source fails keeps its current version; with
    /// none, it takes the version in `fallback` (a segment's record: the newest sealed
    /// segment's at start), or else an empty table. Returns the current set.
    pub async fn refresh_all(&self, fallback: Option<&str>) -> anyhow::Result<LookupSet> {
        let recorded = parse_record(fallback)?;
        let mut tables = Vec::with_capacity(self.pipeline.lookups.len());
        for (i, l) in self.pipeline.lookups.iter().enumerate() {
            let table = match self.refresh_one(i).await {
                Ok(t) => t,
                Err(e) => {
                    self.failed(i, &e);
                    match self.current_table(i) {
                        Some(t) => t,
                        None => match recorded.get(&l.name) {
                            Some(v) => self.version(l, v).await?,
                            None => self.empty(l).await?,
                        },
                    }
                }
            };
            tables.push(table);
        }
        let set = LookupSet::new(tables);
        *self.current.write() = Some(set.clone());
        Ok(set)
    }

    /// Each lookup's current version and figures, for `GET /v1/pipelines`: `name`,
    /// `version` (null before the first load), `rows`, `refreshes`, `refresh_failures`.
    pub fn json(&self) -> serde_json::Value {
        let current = self.current.read().clone().unwrap_or_default();
        let list: Vec<serde_json::Value> = self
            .pipeline
            .lookups
            .iter()
            .zip(&self.status)
            .enumerate()
            .map(|(i, (l, st))| {
                let t = current.tables().get(i);
                serde_json::json!({
                    "name": l.name,
                    "source": l.from.describe(),
                    "version": t.map(|t| t.version()),
                    "rows": t.map(|t| t.rows()),
                    "refreshes": st.refreshes.load(Ordering::Relaxed),
                    "refresh_failures": st.failures.load(Ordering::Relaxed),
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// Reads every lookup's source now (each table a version in the lake): the current
    /// tables for `lambda-ctl run --refresh-lookups`. Fails if any source cannot be read.
    pub async fn read_sources(&self) -> anyhow::Result<LookupSet> {
        let mut tables = Vec::with_capacity(self.pipeline.lookups.len());
        for (i, l) in self.pipeline.lookups.iter().enumerate() {
            tables.push(
                self.refresh_one(i)
                    .await
                    .with_context(|| format!("lookup `{}`", l.name))?,
            );
        }
        let set = LookupSet::new(tables);
        *self.current.write() = Some(set.clone());
        Ok(set)
    }

    /// Refreshes lookup `i` from its source; on success it is current. `Ok(true)` when its
    /// version changed.
    pub async fn refresh(&self, i: usize) -> anyhow::Result<bool> {
        let table = self.refresh_one(i).await?;
        let mut current = self.current.write();
        let Some(set) = current.as_mut() else {
            anyhow::bail!("lookups are refreshed one by one only after the first load");
        };
        let mut tables = set.tables().to_vec();
        let changed = tables[i].version() != table.version();
        tables[i] = table;
        *set = LookupSet::new(tables);
        Ok(changed)
    }

    fn current_table(&self, i: usize) -> Option<Arc<LookupTable>> {
        self.current
            .read()
            .as_ref()
            .and_then(|s| s.tables().get(i).cloned())
    }

    fn failed(&self, i: usize, e: &anyhow::Error) {
        let l = &self.pipeline.lookups[i];
        self.status[i].failures.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            pipeline = %self.pipeline.name,
            lookup = %l.name,
            source = %l.from.describe(),
            error = %format!("{e:#}"),
            "refreshing a lookup failed; its previous version stays in use"
        );
    }

    /// Reads lookup `i`'s source and returns its table, as a version in the lake.
    async fn refresh_one(&self, i: usize) -> anyhow::Result<Arc<LookupTable>> {
        let l = &self.pipeline.lookups[i];
        let frame = tokio::time::timeout(SOURCE_TIMEOUT, self.read_source(l))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "{} did not answer within {}s",
                    l.from.describe(),
                    SOURCE_TIMEOUT.as_secs()
                )
            })??;
        let table = self.store(l, frame).await?;
        let st = &self.status[i];
        st.refreshes.fetch_add(1, Ordering::Relaxed);
        st.rows.store(table.rows() as u64, Ordering::Relaxed);
        let previous = self.current_table(i).map(|t| t.version().to_string());
        if previous.as_deref() != Some(table.version()) {
            tracing::info!(
                pipeline = %self.pipeline.name,
                lookup = %l.name,
                version = %table.version(),
                rows = table.rows(),
                "lookup version in use for segments opened from now on"
            );
        }
        Ok(table)
    }

    /// The table of `frame` (the declared columns, typed), its version written to the lake
    /// unless it is there already.
    async fn store(&self, l: &Lookup, frame: DataFrame) -> anyhow::Result<Arc<LookupTable>> {
        let lookup = l.clone();
        let (version, bytes, table) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            // Indexing first: a table that cannot be indexed (a key twice) is no version.
            let table = LookupTable::new(&lookup, "", frame)?;
            let (version, bytes) = version_bytes(table.frame())?;
            Ok((version.clone(), bytes, table.with_version(&version)))
        })
        .await
        .context("indexing a lookup table panicked")??;
        if let Some(t) = self.cached(&l.name, &version) {
            return Ok(t);
        }
        let path = lake::lookup_path(&self.pipeline.name, &l.name, &version);
        // Immutable and named by its content: whoever wrote it first wrote these bytes.
        self.lake
            .put_if_absent(&path, Bytes::from(bytes))
            .await
            .with_context(|| format!("writing lookup version {path}"))?;
        Ok(self.remember(&l.name, &version, Arc::new(table)))
    }

    /// An empty table of `l` as a version (so an event enriched with "nothing" is recomputed
    /// with nothing, too).
    async fn empty(&self, l: &Lookup) -> anyhow::Result<Arc<LookupTable>> {
        let columns: Vec<Column> = l
            .schema
            .iter()
            .map(|(n, t)| Column::new_empty(n.as_str().into(), &expr::dtype(*t)))
            .collect();
        let frame = DataFrame::new_infer_height(columns)?;
        tracing::warn!(
            pipeline = %self.pipeline.name,
            lookup = %l.name,
            "no version of the lookup could be read: using an empty table until a refresh succeeds"
        );
        self.store(l, frame).await
    }

    fn cached(&self, lookup: &str, version: &str) -> Option<Arc<LookupTable>> {
        self.indexed
            .lock()
            .get(&(lookup.to_string(), version.to_string()))
            .and_then(Weak::upgrade)
    }

    fn remember(&self, lookup: &str, version: &str, t: Arc<LookupTable>) -> Arc<LookupTable> {
        let mut indexed = self.indexed.lock();
        indexed.retain(|_, w| w.strong_count() > 0);
        let key = (lookup.to_string(), version.to_string());
        if let Some(existing) = indexed.get(&key).and_then(Weak::upgrade) {
            return existing;
        }
        indexed.insert(key, Arc::downgrade(&t));
        if let Some(pinned) = &self.pinned {
            pinned.lock().push(Arc::clone(&t));
        }
        t
    }

    /// Version `version` of lookup `l`, from the lake (indexed once per process).
    async fn version(&self, l: &Lookup, version: &str) -> anyhow::Result<Arc<LookupTable>> {
        if let Some(t) = self.cached(&l.name, version) {
            return Ok(t);
        }
        let path = lake::lookup_path(&self.pipeline.name, &l.name, version);
        let bytes = self
            .lake
            .get(&path)
            .await
            .with_context(|| format!("reading lookup version {path}"))?;
        let (lookup, v) = (l.clone(), version.to_string());
        let table = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let frame = read_table(&lookup, TableFormat::Parquet, &bytes)?;
            Ok(LookupTable::new(&lookup, &v, frame)?)
        })
        .await
        .context("indexing a lookup version panicked")??;
        Ok(self.remember(&l.name, version, Arc::new(table)))
    }

    /// The versions a segment recorded (its manifest row's `lookups`), loaded from the lake.
    /// A segment sealed before the pipeline had a lookup recorded none for it: it is enriched
    /// with an empty table of that lookup.
    pub async fn recorded(&self, record: Option<&str>) -> anyhow::Result<LookupSet> {
        if self.pipeline.lookups.is_empty() {
            return Ok(LookupSet::none());
        }
        let recorded = parse_record(record)?;
        let mut tables = Vec::with_capacity(self.pipeline.lookups.len());
        for l in &self.pipeline.lookups {
            tables.push(match recorded.get(&l.name) {
                Some(v) => self.version(l, v).await?,
                None => self.empty(l).await?,
            });
        }
        Ok(LookupSet::new(tables))
    }

    /// Reads the source of `l` into a frame of its declared columns.
    async fn read_source(&self, l: &Lookup) -> anyhow::Result<DataFrame> {
        let (bytes, format) = match &l.from {
            LookupSource::File {
                path,
                format,
                options,
            } => {
                let bytes = self
                    .read_file(path, options)
                    .await
                    .with_context(|| format!("reading {}", l.from.describe()))?;
                let format = match format {
                    FileFormat::Csv => TableFormat::Csv,
                    FileFormat::Parquet => TableFormat::Parquet,
                };
                (bytes, format)
            }
            LookupSource::Postgres { url, query } => (
                query_rows(url, query)
                    .await
                    .with_context(|| format!("querying {}", l.from.describe()))?,
                TableFormat::Ndjson,
            ),
        };
        let lookup = l.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            Ok(read_table(&lookup, format, &bytes)?)
        })
        .await
        .context("reading a lookup table panicked")?
    }

    async fn read_file(
        &self,
        path: &str,
        options: &BTreeMap<String, String>,
    ) -> anyhow::Result<Bytes> {
        if !path.contains("://") {
            return Ok(self.lake.get(path).await?);
        }
        let url = url::Url::parse(path)?;
        if url.scheme() == "file" {
            let file = url
                .to_file_path()
                .map_err(|()| anyhow::anyhow!("`{path}` is not a local file"))?;
            return Ok(Bytes::from(tokio::fs::read(&file).await?));
        }
        let (dir, object) = path
            .rsplit_once('/')
            .ok_or_else(|| anyhow::anyhow!("`{path}` names no file"))?;
        let options = if !options.is_empty() {
            options.clone()
        } else if store_kind(path) == store_kind(self.lake.root_url()) {
            self.lake_options.clone()
        } else {
            BTreeMap::new()
        };
        let store = Lake::open(dir, &options)?;
        Ok(store.get(object).await?)
    }

    /// Refreshes every lookup with a `refresh` interval on its schedule (a failed one is tried
    /// again within [`RETRY_AFTER_FAILURE`]), until `shutdown`.
    pub fn spawn_refreshes(self: &Arc<Self>, shutdown: CancellationToken) {
        for (i, l) in self.pipeline.lookups.iter().enumerate() {
            let Some(every) = l.refresh else {
                continue;
            };
            let me = Arc::clone(self);
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let mut wait = every;
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => return,
                    }
                    wait = match me.refresh(i).await {
                        Ok(_) => every,
                        Err(e) => {
                            me.failed(i, &e);
                            every.min(RETRY_AFTER_FAILURE)
                        }
                    };
                }
            });
        }
    }
}

/// `{"NAME": "VERSION", …}` as a segment records it.
fn parse_record(record: Option<&str>) -> anyhow::Result<BTreeMap<String, String>> {
    match record {
        None => Ok(BTreeMap::new()),
        Some(r) => serde_json::from_str(r)
            .with_context(|| format!("the recorded lookup versions `{r}` are not readable")),
    }
}

/// Which kind of object store a URL is on (`s3`, `azure`, `gcs`, `file`), for sharing the
/// lake's settings with a source on the same kind.
fn store_kind(url: &str) -> &'static str {
    match url.split("://").next().unwrap_or("") {
        "s3" | "s3a" => "s3",
        "az" | "azure" | "abfs" | "abfss" => "azure",
        "gs" => "gcs",
        "file" => "file",
        _ => "other",
    }
}

/// The rows of `query` as NDJSON (`row_to_json` of each row: numbers, booleans, strings,
/// and timestamps as ISO 8601), so they are decoded like events.
async fn query_rows(url: &str, query: &str) -> anyhow::Result<Bytes> {
    use sqlx::Connection;
    let mut conn = sqlx::postgres::PgConnection::connect(url)
        .await
        .context("connecting")?;
    let sql = format!(
        "SELECT row_to_json(lookup)::text FROM ({}) AS lookup",
        query.trim().trim_end_matches(';')
    );
    let rows: Vec<(String,)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .fetch_all(&mut conn)
        .await
        .context("running the query")?;
    let _ = conn.close().await;
    let mut out = String::new();
    for (row,) in rows {
        out.push_str(&row);
        out.push('\n');
    }
    Ok(Bytes::from(out))
}
