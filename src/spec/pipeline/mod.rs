//! `pipelines/NAME.yaml` → [`Pipeline`], reporting every problem with its location: the
//! pipeline's own keys here; its `sources` (with `kafka`'s security and client settings),
//! its `schema` (columns and JSON paths), its `lookups` (reference tables) and its `views` (windows and aggregates, and the
//! `sinks` each view is delivered to) beside.

mod kafka;
mod lookups;
mod objects;
mod schema;
mod sinks;
mod sources;
mod views;

use std::path::Path;
use std::time::Duration;

use super::diag::{Diagnostics, did_you_mean};
use super::expr;
use super::model::*;
use super::read::{self, Obj};
use super::yaml::{Loc, Node};

pub use lookups::resolve_project_paths;
pub use objects::LOOKUPS_AREA;
pub use schema::parse_path;
pub use sinks::{AS_OF, PROGRESS_TABLE, SINK_TYPES};
pub use sources::{DEFAULT_FILE_POSITION, DEFAULT_MESSAGE_ID, literal_secrets};
pub use views::{AGGREGATES, aggregate};

const KEYS: &[&str] = &[
    "name",
    "description",
    "source",
    "format",
    "schema",
    "event_time",
    "event_id",
    "dedupe_window",
    "partitions",
    "partition_key",
    "buffer",
    "lookups",
    "filter",
    "columns",
    "archive",
    "views",
];

/// Every sink of pipeline `p` (built from `root`), with its view and where it is written.
pub fn sinks_at<'a>(root: &Node, p: &'a Pipeline) -> Vec<(&'a View, &'a Sink, Loc)> {
    root.get("views")
        .map(|n| views::sinks_at(n, &p.views))
        .unwrap_or_default()
}

pub fn build(d: &mut Diagnostics, root: &Node, file: &Path) -> Option<Pipeline> {
    let obj = Obj::new(d, root, "pipeline", KEYS)?;
    let name = obj
        .required(d, "name", "pipeline")
        .and_then(|n| read::name(d, n, "pipeline name"));
    let description = obj
        .value("description")
        .and_then(|n| read::string(d, n, "description"));
    let source = obj
        .required(d, "source", "pipeline")
        .and_then(|n| sources::source(d, n, name.as_deref().unwrap_or("pipeline")));
    let format = match obj.value("format") {
        None => Some(Format::Json),
        Some(n) => match read::string(d, n, "format").as_deref() {
            Some("json" | "ndjson") => Some(Format::Json),
            Some("csv") => Some(Format::Csv),
            Some(other) => {
                d.error(
                    n.loc(),
                    format!(
                        "unknown format `{other}` (use `json` or `csv`){}",
                        did_you_mean(other, ["json", "csv"])
                    ),
                );
                None
            }
            None => None,
        },
    };
    let mapped = obj
        .required(d, "schema", "pipeline")
        .and_then(|n| schema::schema(d, n, source.as_ref(), format));
    let schema_ok = mapped.is_some();
    let (mut schema, mut paths) = mapped.unwrap_or_default();
    // AMQP 1.0 messages carry a message-id, and a file's records a position: without
    // `event_id`, that is the one (a column `_message_id` / `_file_position` of the events), so
    // redeliveries and records read again after a crash are dropped at the door.
    let default_id = match source {
        Some(Source::ServiceBus { .. }) => Some(("message_id", DEFAULT_MESSAGE_ID)),
        Some(Source::File { .. }) => Some(("position", DEFAULT_FILE_POSITION)),
        _ => None,
    };
    let mut default_event_id = None;
    if let Some((key, default_col)) = default_id
        && schema_ok
        && obj.value("event_id").is_none()
        && format == Some(Format::Json)
    {
        let meta = JsonPath::meta(key);
        let declared = paths
            .iter()
            .find(|(_, p)| **p == meta)
            .map(|(c, _)| c.clone());
        default_event_id = Some(declared.unwrap_or_else(|| {
            let col = default_col.to_string();
            if !schema.iter().any(|(c, _)| *c == col) {
                schema.push((col.clone(), ColumnType::String));
                paths.insert(col.clone(), meta);
            }
            col
        }));
    }

    let event_time = obj.required(d, "event_time", "pipeline").and_then(|n| {
        let col = read::string(d, n, "event_time")?;
        match schema.iter().find(|(c, _)| *c == col) {
            Some((_, ColumnType::Timestamp)) => Some(col),
            Some((_, t)) => {
                d.error(n.loc(), format!("event_time column `{col}` is a {}, not a timestamp (declare it `{col}: timestamp`)", t.name()));
                None
            }
            None if !schema_ok => None,
            None => {
                d.error(n.loc(), unknown_column("event_time", &col, &schema));
                None
            }
        }
    });
    let event_id = obj
        .value("event_id")
        .and_then(|n| {
            let col = read::string(d, n, "event_id")?;
            if schema_ok && !schema.iter().any(|(c, _)| *c == col) {
                d.error(n.loc(), unknown_column("event_id", &col, &schema));
                return None;
            }
            Some(col)
        })
        .or(default_event_id);
    let dedupe_window = optional(
        d,
        &obj,
        "dedupe_window",
        Duration::from_secs(86_400),
        read::duration,
    );
    // (A servicebus pipeline's event id defaults to the message-id even when the schema has
    // errors: no second, misleading error about the window.)
    let defaulted = matches!(source, Some(Source::ServiceBus { .. }));
    if obj.value("dedupe_window").is_some() && event_id.is_none() && !defaulted {
        d.error(
            obj.get("dedupe_window").map_or(obj.loc, Node::loc),
            "`dedupe_window` has no effect without `event_id`",
        );
    }

    let partitions: Option<u32> = read::integer_in(
        d,
        &obj,
        "partitions",
        1,
        1..=u64::from(MAX_PARTITIONS),
        &format!("between 1 and {MAX_PARTITIONS}"),
    );
    let partition_key = obj.value("partition_key").and_then(|n| {
        let col = read::string(d, n, "partition_key")?;
        if schema_ok && !schema.iter().any(|(c, _)| *c == col) {
            d.error(n.loc(), unknown_column("partition_key", &col, &schema));
            return None;
        }
        Some(col)
    });

    // `None`: an error was reported; `Some(None)`: no buffer.
    let buffer = match obj.value("buffer") {
        None => Some(None),
        Some(n) => {
            let buffer = sources::buffer(d, n, name.as_deref().unwrap_or("pipeline"));
            let at = obj.get("buffer").map_or(obj.loc, Node::loc);
            if !matches!(source, Some(Source::Http) | None) {
                d.error(
                    at,
                    "`buffer` applies to an `http` source only (a broker source keeps its events itself)",
                );
            }
            if format == Some(Format::Csv) {
                d.error(
                    at,
                    "`buffer` needs `format: json` (each event is one message)",
                );
            }
            buffer.map(Some)
        }
    };

    let lookups = match obj.value("lookups") {
        None => Some(Vec::new()),
        Some(n) => lookups::lookups(d, n, &schema, schema_ok),
    };
    // `NAME.COLUMN` of every lookup, for the filter and derived columns (not for views: a view
    // groups or aggregates a derived column that names it).
    let joined = lookups.as_deref().map(lookups::columns).unwrap_or_default();
    let lookups_ok = lookups.is_some();

    // Filter sees the declared columns; derived columns see those plus earlier derived ones.
    let filter = obj.value("filter").and_then(|n| {
        let sql = read::string(d, n, "filter")?;
        if schema_ok && lookups_ok {
            let visible: Vec<_> = schema.iter().chain(&joined).cloned().collect();
            match expr::check(&sql, &visible) {
                Ok(ColumnType::Bool) => {}
                Ok(t) => d.error(
                    n.loc(),
                    format!(
                        "filter `{sql}` must be a boolean expression, it is a {}",
                        t.name()
                    ),
                ),
                Err(e) => d.error(n.loc(), format!("filter `{sql}`: {e}")),
            }
        }
        Some(sql)
    });
    let mut available = schema.clone();
    let mut columns = Vec::new();
    if let Some(n) = obj.value("columns")
        && let Some(cols) = read::entries(d, n, "columns", "name: SQL expression")
    {
        for (key, value) in cols {
            let Some(sql) = read::string(d, value, &key.name) else {
                continue;
            };
            if !read::identifier(d, key, "column") {
                continue;
            }
            if available.iter().any(|(c, _)| *c == key.name) {
                d.error(
                    key.loc,
                    format!("derived column `{}` is already a column", key.name),
                );
                continue;
            }
            if schema_ok && lookups_ok {
                let visible: Vec<_> = available.iter().chain(&joined).cloned().collect();
                match expr::check(&sql, &visible) {
                    Ok(t) => available.push((key.name.clone(), t)),
                    Err(e) => d.error(value.loc(), format!("column `{}` = `{sql}`: {e}", key.name)),
                }
            }
            columns.push((key.name.clone(), sql));
        }
    }

    let archive = match obj.value("archive") {
        None => Some(Archive {
            segment_rows: 500_000,
            segment_age: Duration::from_secs(60),
        }),
        Some(n) => Obj::new(d, n, "archive", &["segment_rows", "segment_age"]).and_then(|a| {
            let rows = optional(d, &a, "segment_rows", 500_000, read::integer);
            if rows == Some(0) {
                d.error(
                    a.get("segment_rows").map_or(a.loc, Node::loc),
                    "`segment_rows` must be at least 1",
                );
            }
            let age = optional(
                d,
                &a,
                "segment_age",
                Duration::from_secs(60),
                read::duration,
            );
            Some(Archive {
                segment_rows: rows.filter(|r| *r > 0)?,
                segment_age: age?,
            })
        }),
    };

    let views = obj
        .required(d, "views", "pipeline")
        .and_then(|n| views::views(d, n, &available, schema_ok && lookups_ok));

    Some(Pipeline {
        name: name?,
        description,
        file: file.to_path_buf(),
        source: source?,
        format: format?,
        schema,
        paths,
        event_time: event_time?,
        event_id,
        dedupe_window: dedupe_window?,
        partitions: partitions?,
        partition_key,
        buffer: buffer?,
        filter,
        columns,
        lookups: lookups?,
        archive: archive?,
        views: views?,
    })
    .filter(|_| schema_ok && d.is_empty())
}

/// Reads `key` with `f` when present, else `default`.
pub(super) fn optional<T>(
    d: &mut Diagnostics,
    obj: &Obj,
    key: &str,
    default: T,
    f: impl FnOnce(&mut Diagnostics, &Node, &str) -> Option<T>,
) -> Option<T> {
    match obj.value(key) {
        None => Some(default),
        Some(n) => f(d, n, key),
    }
}

pub(super) fn unknown_column(what: &str, col: &str, columns: &[(String, ColumnType)]) -> String {
    format!(
        "{what} names unknown column `{col}`{}",
        did_you_mean(col, columns.iter().map(|(c, _)| c.as_str()))
    )
}
