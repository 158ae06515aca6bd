//! The `files` sink: the whole answer as one Parquet or CSV file — for Power BI, Excel, Spark —
//! replaced atomically on every delivery: written to a staging file and renamed on a local
//! disk (`file://`, or a `file://` lake), one PUT (or a multipart upload that appears whole when
//! completed) on an object store. A reader sees the old file or the new one, never a part.
//!
//! Where: a lake-relative path (`exports/revenue.parquet`) is written through the project's
//! lake; a URL (`s3://bucket/…`, `az://…`, `gs://…`, `file:///…`) through a store opened on its
//! directory — with the sink's `options`, or else the lake's `lake_options` when the lake is on
//! the same kind of store.
//!
//! Progress: a Parquet file carries the answer's `as_of` in its key-value metadata
//! (`lambda.as_of`, JSON) and the view in `lambda.view`; CSV has no place for it. The file is
//! rewritten once after every start (what an existing file holds is not read back), then on
//! every change of the answer.

use std::collections::BTreeMap;

use async_trait::async_trait;
use polars::prelude::*;

use super::rows::{Cell, Rows, Shape, to_frame};
use super::{Context, Delivery, Holding, SinkError, Target};
use crate::lake::Lake;
use crate::spec::FileFormat;

/// Where the file goes: a store, and the object's path in it.
enum Place {
    /// The project's lake.
    Lake(Lake),
    /// A store opened on the URL's directory when the sink opens.
    Url {
        dir: String,
        options: BTreeMap<String, String>,
        store: Option<Lake>,
    },
}

pub struct FilesTarget {
    place: Place,
    /// The object's path in its store.
    object: String,
    format: FileFormat,
    /// `PIPELINE.VIEW`, in the Parquet metadata.
    view: String,
    shape: Shape,
}

/// The kind of object store a URL scheme names (`s3a` is `s3`, the Azure spellings are one).
fn store_kind(url: &str) -> &str {
    match url.split_once("://").map_or("", |(s, _)| s) {
        "s3" | "s3a" => "s3",
        "az" | "azure" | "abfs" | "abfss" => "az",
        other => other,
    }
}

impl FilesTarget {
    pub fn new(
        path: &str,
        format: FileFormat,
        options: &BTreeMap<String, String>,
        view: &str,
        shape: Shape,
        ctx: &Context,
    ) -> Result<FilesTarget, SinkError> {
        let (place, object) = if path.contains("://") {
            let (dir, file) = path
                .rsplit_once('/')
                .ok_or_else(|| SinkError::Config(format!("`{path}` names no file")))?;
            // `file:///x.csv`: the directory is the root.
            let dir = if dir.ends_with(':') || dir.ends_with("://") {
                format!("{dir}/")
            } else {
                dir.to_string()
            };
            let options = if !options.is_empty() {
                options.clone()
            } else if store_kind(path) == store_kind(&ctx.lake_url) {
                ctx.lake_options.clone()
            } else {
                BTreeMap::new()
            };
            let place = Place::Url {
                dir,
                options,
                store: None,
            };
            (place, file.to_string())
        } else {
            (Place::Lake(ctx.lake.clone()), path.to_string())
        };
        Ok(FilesTarget {
            place,
            object,
            format,
            view: view.to_string(),
            shape,
        })
    }

    fn store(&mut self) -> Result<&Lake, SinkError> {
        match &mut self.place {
            Place::Lake(lake) => Ok(lake),
            Place::Url {
                dir,
                options,
                store,
            } => {
                if store.is_none() {
                    // A URL the store refuses (no credentials, bad options) stays refused.
                    let opened = Lake::open(dir, options)
                        .map_err(|e| SinkError::Config(format!("opening {dir}: {e}")))?;
                    *store = Some(opened);
                }
                Ok(store.as_ref().expect("opened above"))
            }
        }
    }
}

/// `rows` as CSV with a header: RFC 4180 quoting, times RFC 3339 (UTC), numbers in full
/// precision (as the JSON API writes them), null as an empty field.
pub fn csv(shape: &Shape, rows: &Rows) -> String {
    let field = |s: &str| {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    let mut out = String::new();
    let header: Vec<String> = shape.columns.iter().map(|(c, _)| field(c)).collect();
    out.push_str(&header.join(","));
    out.push('\n');
    for row in rows.values() {
        let cells: Vec<String> = row
            .iter()
            .map(|c| match c {
                Cell::Null => String::new(),
                Cell::Text(s) => field(s),
                other => match other.json() {
                    serde_json::Value::String(s) => field(&s),
                    v => v.to_string(),
                },
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

#[async_trait]
impl Target for FilesTarget {
    async fn open(&mut self) -> Result<Holding, SinkError> {
        self.store()?;
        Ok(Holding::Unknown)
    }

    async fn apply(&mut self, delivery: &Delivery<'_>) -> Result<(), SinkError> {
        let bytes = match self.format {
            FileFormat::Csv => csv(&self.shape, delivery.rows).into_bytes(),
            FileFormat::Parquet => {
                let mut df = to_frame(&self.shape, delivery.rows.values())
                    .map_err(|e| anyhow::anyhow!("building the file's rows: {e}"))?;
                let as_of = serde_json::to_string(delivery.as_of)
                    .map_err(|e| anyhow::anyhow!("encoding as_of: {e}"))?;
                let metadata = KeyValueMetadata::from_static(vec![
                    ("lambda.as_of".to_string(), as_of),
                    ("lambda.view".to_string(), self.view.clone()),
                ]);
                tokio::task::spawn_blocking(move || -> PolarsResult<Vec<u8>> {
                    let mut buf = Vec::new();
                    ParquetWriter::new(&mut buf)
                        .with_compression(ParquetCompression::Zstd(None))
                        .with_key_value_metadata(Some(metadata))
                        .finish(&mut df)?;
                    Ok(buf)
                })
                .await
                .map_err(|e| anyhow::anyhow!("the Parquet writer failed: {e}"))?
                .map_err(|e| anyhow::anyhow!("writing Parquet: {e}"))?
            }
        };
        let object = self.object.clone();
        self.store()?
            .put(&object, bytes)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serving::sink::rows::Kind;

    #[test]
    fn csv_quotes_text_and_keeps_full_precision() {
        let shape = Shape {
            columns: vec![
                ("window_start".into(), Kind::Time),
                ("window_end".into(), Kind::Time),
                ("page".into(), Kind::Text),
                ("avg".into(), Kind::Float),
                ("n".into(), Kind::Int),
            ],
            key: vec![0, 2],
            all_time: false,
        };
        let row = vec![
            Cell::Time(0),
            Cell::Time(60_000),
            Cell::Text("/a,\"b\"".into()),
            Cell::Float(0.1 + 0.2),
            Cell::Null,
        ];
        let rows: Rows = [(shape.key_of(&row), row)].into_iter().collect();
        assert_eq!(
            csv(&shape, &rows),
            "window_start,window_end,page,avg,n\n\
             1970-01-01T00:00:00.000Z,1970-01-01T00:01:00.000Z,\"/a,\"\"b\"\"\",0.30000000000000004,\n"
        );
    }

    /// What a Parquet delivery writes reads back as exactly the rows delivered, with the
    /// answer's `as_of` in the file's metadata.
    #[tokio::test]
    async fn parquet_files_hold_exactly_the_rows_delivered() {
        let shape = Shape {
            columns: vec![
                ("window_start".into(), Kind::Time),
                ("window_end".into(), Kind::Time),
                ("country".into(), Kind::Text),
                ("n".into(), Kind::Int),
                ("mean".into(), Kind::Float),
            ],
            key: vec![0, 2],
            all_time: false,
        };
        let rows: Rows = (0..300i64)
            .map(|i| {
                let row = vec![
                    Cell::Time(i / 4 * 60_000),
                    Cell::Time(i / 4 * 60_000 + 60_000),
                    Cell::Text(["DE", "US", "FR", "JP"][(i % 4) as usize].into()),
                    Cell::Int(i),
                    Cell::float(i as f64 / 3.0 + 0.1),
                ];
                (shape.key_of(&row), row)
            })
            .collect();
        let lake = Lake::open("memory://", &BTreeMap::new()).unwrap();
        let ctx = Context {
            lake: lake.clone(),
            lake_url: "memory://".into(),
            lake_options: BTreeMap::new(),
        };
        let mut t = FilesTarget::new(
            "exports/x.parquet",
            FileFormat::Parquet,
            &BTreeMap::new(),
            "p.v",
            shape.clone(),
            &ctx,
        )
        .unwrap();
        let as_of = crate::serving::query::AsOf {
            batch_run: Some("7".into()),
            computed_at: "2026-12-01T00:00:00.000Z".into(),
            ..Default::default()
        };
        let diff = super::super::rows::diff(&Rows::new(), &rows);
        t.apply(&Delivery {
            diff: &diff,
            rows: &rows,
            as_of: &as_of,
        })
        .await
        .unwrap();
        let bytes = lake.get("exports/x.parquet").await.unwrap();
        let mut reader = ParquetReader::new(std::io::Cursor::new(bytes.to_vec()));
        let kv = reader.get_metadata().unwrap().key_value_metadata().clone();
        let as_of_kv = kv
            .iter()
            .flatten()
            .find(|kv| kv.key == "lambda.as_of")
            .and_then(|kv| kv.value.clone());
        assert!(as_of_kv.is_some_and(|v| v.contains("\"batch_run\":\"7\"")));
        let df = reader.finish().unwrap();
        assert_eq!(super::super::rows::from_frame(&df, &shape).unwrap(), rows);
    }

    #[test]
    fn a_url_path_opens_its_directory_with_the_lakes_options_on_the_same_store() {
        let lake = Lake::open("memory://", &BTreeMap::new()).unwrap();
        let lake_options: BTreeMap<String, String> =
            [("endpoint".to_string(), "http://127.0.0.1:5000".to_string())].into();
        let ctx = Context {
            lake,
            lake_url: "s3a://lake/prefix".into(),
            lake_options: lake_options.clone(),
        };
        let shape = Shape {
            columns: vec![],
            key: vec![],
            all_time: true,
        };
        let opts = BTreeMap::new();
        let t = FilesTarget::new(
            "s3://exports/bi/revenue.parquet",
            FileFormat::Parquet,
            &opts,
            "p.v",
            shape.clone(),
            &ctx,
        )
        .unwrap();
        assert_eq!(t.object, "revenue.parquet");
        assert!(
            matches!(&t.place, Place::Url { dir, options, .. } if dir == "s3://exports/bi" && *options == lake_options)
        );
        let t = FilesTarget::new(
            "file:///x.csv",
            FileFormat::Csv,
            &opts,
            "p.v",
            shape.clone(),
            &ctx,
        )
        .unwrap();
        assert!(
            matches!(&t.place, Place::Url { dir, options, .. } if dir == "file:///" && options.is_empty())
        );
        let t =
            FilesTarget::new("exports/r.csv", FileFormat::Csv, &opts, "p.v", shape, &ctx).unwrap();
        assert!(matches!(t.place, Place::Lake(_)));
        assert_eq!(t.object, "exports/r.csv");
    }
}
