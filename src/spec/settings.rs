//! `lambda.yaml` → [`Settings`]; every key optional, defaults are the embedded stack.

use std::collections::BTreeMap;
use std::path::Path;

use super::diag::Diagnostics;
use super::model::{BatchSettings, ServeSettings, Settings, SqlSettings};
use super::read::{self, Obj};
use super::yaml::Node;

pub const DEFAULT_STATE: &str = "sqlite://.lambda/state.db";
pub const DEFAULT_LAKE: &str = "file://.lambda/lake";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_MAX_BODY_BYTES: u64 = 64 * 1024 * 1024;
/// `serve.history`: 30 days of `as_of` answers.
pub const DEFAULT_HISTORY: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
/// `serve.sql.statement_timeout`.
pub const DEFAULT_SQL_STATEMENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// `serve.sql.max_rows`.
pub const DEFAULT_SQL_MAX_ROWS: u64 = 1_000_000;
/// `batch.scale_out_segments`: below this, a run stays in one process.
pub const DEFAULT_SCALE_OUT_SEGMENTS: u64 = 64;
/// `batch.group_segments`.
pub const DEFAULT_GROUP_SEGMENTS: u64 = 16;

pub fn build(d: &mut Diagnostics, root: Option<&Node>, project: &Path) -> Option<Settings> {
    let empty = Node::Map {
        entries: Vec::new(),
        loc: Default::default(),
    };
    let obj = Obj::new(
        d,
        root.unwrap_or(&empty),
        "lambda.yaml",
        &[
            "state",
            "lake",
            "lake_options",
            "serve",
            "timezone",
            "batch",
        ],
    )?;
    let str_or = |d: &mut Diagnostics, key: &str, default: &str| match obj.value(key) {
        None => Some(default.to_string()),
        Some(n) => read::string(d, n, key),
    };
    let state = str_or(d, "state", DEFAULT_STATE).and_then(|s| {
        let resolved = resolve_state(&s, project);
        if resolved.is_none() {
            d.error(
                obj.get("state").map_or(obj.loc, Node::loc),
                format!(
                    "unsupported state URL `{s}` (use sqlite://PATH or postgres://USER@HOST/DB)"
                ),
            );
        }
        resolved
    });
    let lake = str_or(d, "lake", DEFAULT_LAKE).and_then(|s| {
        let resolved = resolve_lake(&s, project);
        if resolved.is_none() {
            d.error(obj.get("lake").map_or(obj.loc, Node::loc), format!(
                "unsupported lake URL `{s}` (use file://PATH, s3://BUCKET/PREFIX, az://CONTAINER/PREFIX, gs://BUCKET/PREFIX or memory://)"
            ));
        }
        resolved
    });
    let lake_options = match obj.value("lake_options") {
        None => Some(BTreeMap::new()),
        Some(Node::Map { entries, .. }) => {
            let mut out = BTreeMap::new();
            for (k, v) in entries {
                if let Some(s) = read::string(d, v, &k.name) {
                    out.insert(k.name.clone(), s);
                }
            }
            Some(out)
        }
        Some(n) => {
            d.error(
                n.loc(),
                format!("`lake_options` must be a mapping, found {}", n.kind()),
            );
            None
        }
    };
    let serve = match obj.value("serve") {
        None => Some(ServeSettings { listen: DEFAULT_LISTEN.into(), token: None, max_body_bytes: DEFAULT_MAX_BODY_BYTES as usize, protect_metrics: false, sql: None, history: DEFAULT_HISTORY }),
        Some(n) => Obj::new(d, n, "serve", &["listen", "token", "max_body_bytes", "protect_metrics", "sql", "history"]).and_then(|s| {
            let listen = s.value("listen").map_or(Some(DEFAULT_LISTEN.to_string()), |n| read::string(d, n, "listen"));
            if let (Some(l), Some(n)) = (&listen, s.value("listen"))
                && l.parse::<std::net::SocketAddr>().is_err()
            {
                d.error(n.loc(), format!("`listen` must be HOST:PORT with an IP address, e.g. 127.0.0.1:8080, found `{l}`"));
            }
            let token = s.value("token").and_then(|n| token(d, n));
            let max = s.value("max_body_bytes").map_or(Some(DEFAULT_MAX_BODY_BYTES), |n| read::integer(d, n, "max_body_bytes"));
            let protect_metrics = s.value("protect_metrics").map_or(Some(false), |n| read::boolean(d, n, "protect_metrics"));
            if let (Some(true), None, Some(n)) = (protect_metrics, &token, s.value("protect_metrics")) {
                d.error(n.loc(), "`protect_metrics: true` needs a `token` to protect /metrics with".to_string());
            }
            let sql = match s.value("sql") {
                None => Some(None),
                Some(n) => sql_settings(d, n).map(Some),
            };
            let history = s.value("history").map_or(Some(DEFAULT_HISTORY), |n| read::duration(d, n, "history"));
            Some(ServeSettings { listen: listen?, token, max_body_bytes: usize::try_from(max?).ok()?, protect_metrics: protect_metrics?, sql: sql?, history: history? })
        }),
    };
    let timezone = match obj.value("timezone") {
        None => Some(chrono_tz::UTC),
        Some(n) => {
            read::string(d, n, "timezone").and_then(|s| super::workflow::timezone(d, n.loc(), &s))
        }
    };
    let batch = match obj.value("batch") {
        None => Some(BatchSettings {
            scale_out_segments: DEFAULT_SCALE_OUT_SEGMENTS as usize,
            group_segments: DEFAULT_GROUP_SEGMENTS as usize,
        }),
        Some(n) => batch_settings(d, n),
    };
    Some(Settings {
        batch: batch?,
        state: state?,
        lake: lake?,
        lake_options: lake_options?,
        serve: serve?,
        timezone: timezone?,
    })
}

/// `serve.sql: {listen: HOST:PORT, statement_timeout: 30s, max_rows: 1000000}`.
fn sql_settings(d: &mut Diagnostics, n: &Node) -> Option<SqlSettings> {
    let s = Obj::new(d, n, "sql", &["listen", "statement_timeout", "max_rows"])?;
    let listen = s
        .required(d, "listen", "`serve.sql`")
        .and_then(|n| read::string(d, n, "listen").map(|l| (l, n)))
        .and_then(|(l, n)| {
            if l.parse::<std::net::SocketAddr>().is_err() {
                d.error(
                    n.loc(),
                    format!("`listen` must be HOST:PORT with an IP address, e.g. 127.0.0.1:5433, found `{l}`"),
                );
                return None;
            }
            Some(l)
        });
    let statement_timeout = match s.value("statement_timeout") {
        None => Some(DEFAULT_SQL_STATEMENT_TIMEOUT),
        Some(n) => read::duration(d, n, "statement_timeout"),
    };
    let max_rows = match s.value("max_rows") {
        None => Some(DEFAULT_SQL_MAX_ROWS),
        Some(n) => read::integer(d, n, "max_rows").and_then(|m| {
            if m == 0 {
                d.error(n.loc(), "`max_rows` must be at least 1".to_string());
                return None;
            }
            Some(m)
        }),
    };
    Some(SqlSettings {
        listen: listen?,
        statement_timeout: statement_timeout?,
        max_rows: usize::try_from(max_rows?).ok()?,
    })
}

fn batch_settings(d: &mut Diagnostics, n: &Node) -> Option<BatchSettings> {
    let b = Obj::new(d, n, "batch", &["scale_out_segments", "group_segments"])?;
    let count = |d: &mut Diagnostics, key: &str, default: u64, min: u64| match b.value(key) {
        None => Some(default),
        Some(n) => read::integer(d, n, key).and_then(|v| {
            if v < min {
                d.error(
                    n.loc(),
                    format!("`{key}` must be at least {min}, found {v}"),
                );
                return None;
            }
            Some(v)
        }),
    };
    let scale_out = count(d, "scale_out_segments", DEFAULT_SCALE_OUT_SEGMENTS, 0);
    let group = count(d, "group_segments", DEFAULT_GROUP_SEGMENTS, 1);
    Some(BatchSettings {
        scale_out_segments: usize::try_from(scale_out?).ok()?,
        group_segments: usize::try_from(group?).ok()?,
    })
}

/// `sqlite://rel/path` is relative to the project; postgres URLs pass through.
fn resolve_state(url: &str, project: &Path) -> Option<String> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Some(url.to_string());
    }
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    if rest == ":memory:" {
        return Some("sqlite::memory:".into());
    }
    let (path, query) = rest
        .split_once('?')
        .map_or((rest, None), |(p, q)| (p, Some(q)));
    let abs = absolute(project, path);
    Some(match query {
        Some(q) => format!("sqlite://{}?{q}", abs.display()),
        None => format!("sqlite://{}", abs.display()),
    })
}

/// `file://rel/dir` (or a bare path) is relative to the project; cloud URLs pass through.
fn resolve_lake(url: &str, project: &Path) -> Option<String> {
    for scheme in [
        "s3://",
        "s3a://",
        "az://",
        "abfs://",
        "abfss://",
        "azure://",
        "gs://",
        "memory://",
    ] {
        if url.starts_with(scheme) {
            return Some(url.to_string());
        }
    }
    if url.contains("://") && !url.starts_with("file://") {
        return None;
    }
    let path = url.strip_prefix("file://").unwrap_or(url);
    Some(format!("file://{}", absolute(project, path).display()))
}

fn absolute(project: &Path, path: &str) -> std::path::PathBuf {
    let p = Path::new(path);
    let joined = if p.is_absolute() {
        p.to_path_buf()
    } else {
        project.join(p)
    };
    std::path::absolute(&joined).unwrap_or(joined)
}

/// `serve.token`. Absent or null — `token:`, or an unquoted `${VAR:-}` whose variable is unset
/// or empty — means no token. A string that is empty or blank is refused: it reads like
/// a token and would leave the API open.
fn token(d: &mut Diagnostics, n: &Node) -> Option<String> {
    let t = read::string(d, n, "token")?;
    if t.trim().is_empty() {
        d.error(
            n.loc(),
            "`token` is empty, which would leave the API open: set a token, or remove the key to serve without one (`token: ${LAMBDA_TOKEN:-}` unquoted, with the variable unset, also means none)".to_string(),
        );
        return None;
    }
    if t.trim() != t {
        d.error(
            n.loc(),
            "`token` starts or ends with whitespace, which an Authorization header cannot carry"
                .to_string(),
        );
        return None;
    }
    Some(t)
}
