//! A view's `sinks:`: where its served answer is delivered — a PostgreSQL table, a Kafka topic
//! or a file — and when (`emit`, `every`, `allowed_lateness`).

use std::collections::BTreeMap;
use std::time::Duration;

use super::kafka::{kafka_security, kafka_sink_properties};
use super::{objects, optional};
use crate::spec::diag::{Diagnostics, did_you_mean};
use crate::spec::model::*;
use crate::spec::read::{self, Obj};
use crate::spec::yaml::{Loc, Node};

pub const SINK_TYPES: &[&str] = &["postgres", "kafka", "files"];
/// Keys every sink takes besides its type's own.
const COMMON: &[&str] = &["type", "emit", "every", "allowed_lateness"];
/// The table a postgres sink records its progress in, beside the rows.
pub const PROGRESS_TABLE: &str = "lambda_sink_progress";
/// Longest PostgreSQL identifier (longer ones are silently truncated by the server).
const PG_MAX_IDENT: usize = 63;

/// The view whose `sinks:` are read: its window and its output columns.
pub(super) struct ViewShape<'a> {
    pub window: Option<&'a Window>,
    pub columns: Vec<&'a str>,
}

pub(super) fn sinks(d: &mut Diagnostics, node: &Node, view: &ViewShape) -> Option<Vec<Sink>> {
    let Node::Seq { items, .. } = node else {
        d.error(
            node.loc(),
            format!(
                "`sinks` must be a list of sinks, found {} (write `sinks: [{{type: postgres, url: …, table: …}}]`)",
                node.kind()
            ),
        );
        return None;
    };
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for item in items {
        match sink(d, item, view) {
            Some(s) => {
                let name = s.target.name();
                if out.iter().any(|o: &Sink| o.target.name() == name) {
                    d.error(
                        item.loc(),
                        format!("duplicate sink `{name}` in this view (each target once)"),
                    );
                    ok = false;
                }
                out.push(s);
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn sink(d: &mut Diagnostics, node: &Node, view: &ViewShape) -> Option<Sink> {
    let Some(ty_node) = node.get("type").filter(|n| !n.is_null()) else {
        if matches!(node, Node::Map { .. }) {
            d.error(
                node.loc(),
                format!(
                    "sink is missing required key `type` (one of {})",
                    SINK_TYPES.join(", ")
                ),
            );
        } else {
            d.error(
                node.loc(),
                format!("sink must be a mapping, found {}", node.kind()),
            );
        }
        return None;
    };
    let ty = read::string(d, ty_node, "type")?;
    let own: &[&str] = match ty.as_str() {
        "postgres" => &["url", "table", "mode"],
        "kafka" => &[
            "brokers",
            "topic",
            "security_protocol",
            "sasl",
            "ssl_ca_location",
            "properties",
        ],
        "files" => &["path", "format", "options"],
        other => {
            d.error(
                ty_node.loc(),
                format!(
                    "unknown sink type `{other}`{} (one of {})",
                    did_you_mean(other, SINK_TYPES.iter().copied()),
                    SINK_TYPES.join(", ")
                ),
            );
            return None;
        }
    };
    let allowed: Vec<&str> = COMMON.iter().chain(own).copied().collect();
    let what = format!("{ty} sink");
    let obj = Obj::new(d, node, &what, &allowed)?;
    let target = match ty.as_str() {
        "postgres" => postgres(d, &obj, view),
        "kafka" => kafka(d, &obj, view),
        "files" => files(d, &obj),
        _ => unreachable!("sink types are matched above"),
    };
    let emit = match obj.value("emit") {
        None => Some(Emit::Updates),
        Some(n) => match read::string(d, n, "emit").as_deref() {
            Some("updates") => Some(Emit::Updates),
            Some("final") => Some(Emit::Final),
            Some(other) => {
                d.error(
                    n.loc(),
                    format!(
                        "unknown `emit` `{other}`{} (use `updates`: every change, or `final`: each window once it has ended)",
                        did_you_mean(other, ["updates", "final"])
                    ),
                );
                None
            }
            None => None,
        },
    };
    let every = optional(d, &obj, "every", Duration::from_secs(1), read::duration);
    let allowed_lateness = match obj.value("allowed_lateness") {
        None => Some(Duration::ZERO),
        Some(n) => lateness(d, n),
    };
    if emit == Some(Emit::Final) && view.window == Some(&Window::All) {
        d.error(
            obj.get("emit").map_or(obj.loc, Node::loc),
            "`emit: final` writes a window once it has ended, and the all-time window never ends (use `emit: updates`)",
        );
    }
    if emit == Some(Emit::Updates) && obj.value("allowed_lateness").is_some() {
        d.error(
            obj.get("allowed_lateness").map_or(obj.loc, Node::loc),
            "`allowed_lateness` applies only with `emit: final` (with `emit: updates` every change is written)",
        );
    }
    Some(Sink {
        target: target?,
        emit: emit?,
        every: every?,
        allowed_lateness: allowed_lateness?,
    })
}

/// A duration that may be zero (`0s`).
fn lateness(d: &mut Diagnostics, node: &Node) -> Option<Duration> {
    let text = read::string(d, node, "allowed_lateness")?;
    match crate::spec::duration::parse(&text) {
        Ok(v) => Some(v),
        Err(e) => {
            d.error(node.loc(), format!("`allowed_lateness`: {e}"));
            None
        }
    }
}

fn required(d: &mut Diagnostics, obj: &Obj, key: &str, what: &str) -> Option<(String, Loc)> {
    let n = obj.required(d, key, what)?;
    let s = read::string(d, n, key)?;
    if s.trim().is_empty() {
        d.error(n.loc(), format!("`{key}` is empty"));
        return None;
    }
    Some((s, n.loc()))
}

fn postgres(d: &mut Diagnostics, obj: &Obj, view: &ViewShape) -> Option<SinkTarget> {
    let what = "postgres sink";
    let url = required(d, obj, "url", what).and_then(|(url, loc)| {
        match url::Url::parse(&url) {
            Ok(u) if matches!(u.scheme(), "postgres" | "postgresql") => Some(url),
            Ok(u) => {
                d.error(
                    loc,
                    format!(
                        "postgres sink `url` must start with postgres://, found `{}://`",
                        u.scheme()
                    ),
                );
                None
            }
            Err(e) => {
                d.error(
                    loc,
                    format!(
                        "invalid postgres sink `url`: {e} (write postgres://USER:${{PASSWORD_VAR}}@HOST:5432/DB)"
                    ),
                );
                None
            }
        }
    });
    let table = required(d, obj, "table", what).and_then(|(table, loc)| {
        let parts: Vec<&str> = table.split('.').collect();
        let valid = parts.len() <= 2
            && parts.iter().all(|p| {
                p.len() <= PG_MAX_IDENT
                    && p.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
                    && p
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            });
        if !valid {
            d.error(
                loc,
                format!(
                    "invalid postgres sink `table` `{table}`: use `name` or `schema.name`, lowercase letters, digits and `_`, at most {PG_MAX_IDENT} characters each"
                ),
            );
            return None;
        }
        if parts.last() == Some(&PROGRESS_TABLE) {
            d.error(
                loc,
                format!("`{PROGRESS_TABLE}` is where postgres sinks record their progress; choose another `table`"),
            );
            return None;
        }
        Some(table)
    });
    if let Some(n) = obj.value("mode")
        && let Some(mode) = read::string(d, n, "mode")
        && mode != "upsert"
    {
        d.error(
            n.loc(),
            format!(
                "unknown postgres sink `mode` `{mode}`{} (only `upsert`: one row per window and group, kept equal to the view)",
                did_you_mean(&mode, ["upsert"])
            ),
        );
    }
    for c in &view.columns {
        if c.len() > PG_MAX_IDENT {
            d.error(
                obj.loc,
                format!(
                    "column `{c}` is longer than PostgreSQL's {PG_MAX_IDENT}-character names; shorten it to deliver this view to a postgres sink"
                ),
            );
        }
    }
    Some(SinkTarget::Postgres {
        url: url?,
        table: table?,
    })
}

fn kafka(d: &mut Diagnostics, obj: &Obj, view: &ViewShape) -> Option<SinkTarget> {
    let what = "kafka sink";
    let brokers = required(d, obj, "brokers", what).map(|(b, _)| b);
    let topic = required(d, obj, "topic", what).and_then(|(topic, loc)| {
        let valid = topic.len() <= 249
            && topic != "."
            && topic != ".."
            && topic
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if !valid {
            d.error(
                loc,
                format!(
                    "invalid kafka topic `{topic}`: use letters, digits, `.`, `_` and `-`, at most 249 characters"
                ),
            );
            return None;
        }
        Some(topic)
    });
    let security = kafka_security(d, obj);
    let properties = optional(d, obj, "properties", BTreeMap::new(), kafka_sink_properties);
    if view.columns.contains(&AS_OF) {
        d.error(
            obj.loc,
            format!(
                "the view has a column `{AS_OF}`, which a kafka sink's records carry themselves; rename the column"
            ),
        );
    }
    Some(SinkTarget::Kafka {
        brokers: brokers?,
        topic: topic?,
        security: security?,
        properties: properties?,
    })
}

/// The key of a kafka sink record's value holding where the numbers came from.
pub const AS_OF: &str = "as_of";

fn files(d: &mut Diagnostics, obj: &Obj) -> Option<SinkTarget> {
    let what = "files sink";
    let format_node = obj.value("format");
    let format = match format_node {
        None => Some(None),
        Some(n) => match read::string(d, n, "format").as_deref() {
            Some("parquet") => Some(Some(FileFormat::Parquet)),
            Some("csv") => Some(Some(FileFormat::Csv)),
            Some(other) => {
                d.error(
                    n.loc(),
                    format!(
                        "unknown files sink `format` `{other}`{} (use `parquet` or `csv`)",
                        did_you_mean(other, ["parquet", "csv"])
                    ),
                );
                None
            }
            None => None,
        },
    };
    let options = match obj.value("options") {
        None => Some(BTreeMap::new()),
        Some(n) => read::string_map(d, n, "options"),
    };
    let (path, loc) = required(d, obj, "path", what)?;
    let is_url = objects::is_url(&path);
    let named = objects::Named {
        what: "files sink `path`",
        example: "exports/revenue.parquet",
    };
    let path_ok = objects::check(d, &path, loc, &named) && (!is_url || names_file(d, &path, loc));
    if !is_url && obj.value("options").is_some_and(|_| path_ok) {
        d.error(
            obj.get("options").map_or(obj.loc, Node::loc),
            "`options` configure the object store of a URL `path` (s3://, az://, gs://); a lake-relative path uses the lake's own settings",
        );
    }
    // The extension says the format when `format` does not; both must agree.
    let by_extension = [FileFormat::Parquet, FileFormat::Csv]
        .into_iter()
        .find(|f| path.ends_with(&format!(".{}", f.extension())));
    let format = match (format?, by_extension) {
        (Some(f), Some(e)) if f != e => {
            d.error(
                format_node.map_or(loc, Node::loc),
                format!(
                    "`format: {}` but `path` ends in `.{}`",
                    f.extension(),
                    e.extension()
                ),
            );
            return None;
        }
        (Some(f), _) | (None, Some(f)) => f,
        (None, None) => FileFormat::Parquet,
    };
    if !path_ok {
        return None;
    }
    let path = if by_extension.is_some() {
        path
    } else {
        format!("{path}.{}", format.extension())
    };
    Some(SinkTarget::Files {
        path,
        format,
        options: options?,
    })
}

/// A URL (already checked) that names an object, not a bucket or a folder.
fn names_file(d: &mut Diagnostics, path: &str, loc: Loc) -> bool {
    let Ok(parsed) = url::Url::parse(path) else {
        return false;
    };
    let object = parsed.path().trim_start_matches('/');
    if object.is_empty() || object.ends_with('/') {
        d.error(
            loc,
            format!(
                "files sink `path` `{path}` names no file (write e.g. {}://BUCKET/exports/revenue.parquet)",
                parsed.scheme()
            ),
        );
        return false;
    }
    true
}

/// Where a postgres sink's `url` carries a password written into the file rather than as
/// `${VAR}`: checked on the file as written, before interpolation.
pub(super) fn literal_sink_secrets(root: &Node) -> Vec<(Loc, String)> {
    let mut out = Vec::new();
    let Some(Node::Seq { items: views, .. }) = root.get("views") else {
        return out;
    };
    for view in views {
        let Some(Node::Seq { items: sinks, .. }) = view.get("sinks") else {
            continue;
        };
        for sink in sinks {
            if let Some(Node::Scalar { value, loc, .. }) = sink.get("url")
                && !value.contains("${")
                && url::Url::parse(value).is_ok_and(|u| u.password().is_some())
            {
                out.push((
                    *loc,
                    "the password in a sink `url` is a secret: write it as `${VAR}` (e.g. postgres://user:${PGPASSWORD}@host/db) and set VAR in the environment, not in the file".to_string(),
                ));
            }
        }
    }
    out
}
