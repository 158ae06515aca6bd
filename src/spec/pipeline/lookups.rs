//! A pipeline's `lookups:`: reference tables joined to every event on one column, before the
//! filter. Their columns are `NAME.COLUMN` in `filter` and `columns`; the columns a lookup has
//! (and their types) are declared in its `schema`, so `validate` can check every reference
//! without reading the table, and both layers type a column the same whatever the file holds.

use std::collections::BTreeMap;

use super::objects;
use crate::spec::diag::{Diagnostics, did_you_mean};
use crate::spec::model::*;
use crate::spec::read::{self, Obj};
use crate::spec::yaml::{Loc, Node};

const KEYS: &[&str] = &[
    "from",
    "key",
    "on",
    "schema",
    "refresh",
    "on_missing",
    "valid_from",
    "valid_to",
    "options",
];

/// `lookups:` — a mapping `NAME: {from, key, on, schema, …}`; `columns` are the pipeline's
/// schema columns, which `on` must name.
pub(super) fn lookups(
    d: &mut Diagnostics,
    node: &Node,
    columns: &[(String, ColumnType)],
    schema_ok: bool,
) -> Option<Vec<Lookup>> {
    let entries = read::entries(d, node, "lookups", "name: {from, key, on, schema}")?;
    let mut out = Vec::with_capacity(entries.len());
    let mut ok = true;
    for (key, value) in entries {
        if !read::is_name(&key.name) {
            d.error(
                key.loc,
                format!(
                    "invalid lookup name `{}`: use lowercase letters, digits and `_`, starting with a letter",
                    key.name
                ),
            );
            ok = false;
            continue;
        }
        if columns.iter().any(|(c, _)| *c == key.name) {
            d.error(
                key.loc,
                format!(
                    "lookup `{}` has the name of a column of the schema: rename one (`{}.COLUMN` must say which)",
                    key.name, key.name
                ),
            );
            ok = false;
        }
        match lookup(d, &key.name, value, columns, schema_ok) {
            Some(l) => out.push(l),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn lookup(
    d: &mut Diagnostics,
    name: &str,
    node: &Node,
    columns: &[(String, ColumnType)],
    schema_ok: bool,
) -> Option<Lookup> {
    let what = format!("lookup `{name}`");
    let obj = Obj::new(d, node, &what, KEYS)?;
    let schema = obj
        .required(d, "schema", &what)
        .and_then(|n| lookup_schema(d, n, name));
    let from = obj
        .required(d, "from", &what)
        .and_then(|n| source(d, &obj, n, name));
    let column = |d: &mut Diagnostics, key: &str| -> Option<(String, Loc)> {
        let n = obj.required(d, key, &what)?;
        Some((read::string(d, n, key)?, n.loc()))
    };
    let key = column(d, "key");
    let on = column(d, "on");
    let mut ok = true;
    // The key: a column of the lookup's schema, of the type of `on`.
    let key_type = match (&key, &schema) {
        (Some((k, loc)), Some(s)) => match s.iter().find(|(c, _)| c == k) {
            Some((_, t)) => Some(*t),
            None => {
                d.error(
                    *loc,
                    format!(
                        "lookup `{name}`: `key` names unknown column `{k}` of its schema{}",
                        did_you_mean(k, s.iter().map(|(c, _)| c.as_str()))
                    ),
                );
                ok = false;
                None
            }
        },
        _ => None,
    };
    if let (Some(t), Some((k, loc))) = (key_type, &key)
        && !matches!(t, ColumnType::String | ColumnType::Int)
    {
        d.error(
            *loc,
            format!(
                "lookup `{name}`: key column `{k}` is a {}; a key is a string or an int",
                t.name()
            ),
        );
        ok = false;
    }
    if let Some((o, loc)) = &on
        && schema_ok
    {
        match columns.iter().find(|(c, _)| c == o) {
            None => {
                d.error(
                    *loc,
                    format!(
                        "lookup `{name}`: `on` names unknown column `{o}` of the pipeline's schema{}",
                        did_you_mean(o, columns.iter().map(|(c, _)| c.as_str()))
                    ),
                );
                ok = false;
            }
            Some((_, t)) => {
                if let Some(kt) = key_type
                    && kt != *t
                {
                    d.error(
                        *loc,
                        format!(
                            "lookup `{name}`: `on` column `{o}` is a {} but the key `{}` is a {}: declare them alike",
                            t.name(),
                            key.as_ref().map_or("", |k| k.0.as_str()),
                            kt.name()
                        ),
                    );
                    ok = false;
                }
            }
        }
    }
    let refresh = match obj.value("refresh") {
        None => Some(None),
        Some(n) => match read::duration(d, n, "refresh") {
            Some(r) if r.is_zero() => {
                d.error(
                    n.loc(),
                    "`refresh` must be longer than 0s (leave it out to read the table once, at start)",
                );
                None
            }
            Some(r) => Some(Some(r)),
            None => None,
        },
    };
    let on_missing = match obj.value("on_missing") {
        None => Some(OnMissing::Null),
        Some(n) => match read::string(d, n, "on_missing").as_deref() {
            Some("null") => Some(OnMissing::Null),
            Some("reject") => Some(OnMissing::Reject),
            Some(other) => {
                d.error(
                    n.loc(),
                    format!(
                        "unknown `on_missing` `{other}`{} (use `null`: the lookup's columns are null, or `reject`: the event goes to the dead-letter area)",
                        did_you_mean(other, ["null", "reject"])
                    ),
                );
                None
            }
            None => None,
        },
    };
    let valid = match (obj.value("valid_from"), obj.value("valid_to")) {
        (None, None) => Some(None),
        (Some(n), None) | (None, Some(n)) => {
            let (given, missing) = if obj.value("valid_from").is_some() {
                ("valid_from", "valid_to")
            } else {
                ("valid_to", "valid_from")
            };
            d.error(
                n.loc(),
                format!(
                    "lookup `{name}`: `{given}` needs `{missing}` too (a null value in either column leaves that side open)"
                ),
            );
            None
        }
        (Some(f), Some(t)) => {
            let bound = |d: &mut Diagnostics, n: &Node, key: &str| -> Option<String> {
                let c = read::string(d, n, key)?;
                let s = schema.as_ref()?;
                match s.iter().find(|(x, _)| *x == c) {
                    Some((_, ColumnType::Timestamp)) => Some(c),
                    Some((_, t)) => {
                        d.error(
                            n.loc(),
                            format!(
                                "lookup `{name}`: `{key}` column `{c}` is a {}, not a timestamp",
                                t.name()
                            ),
                        );
                        None
                    }
                    None => {
                        d.error(
                            n.loc(),
                            format!(
                                "lookup `{name}`: `{key}` names unknown column `{c}` of its schema{}",
                                did_you_mean(&c, s.iter().map(|(x, _)| x.as_str()))
                            ),
                        );
                        None
                    }
                }
            };
            let from = bound(d, f, "valid_from");
            let to = bound(d, t, "valid_to");
            Some(from.zip(to))
        }
    };
    let valid = match valid {
        Some(None) if obj.value("valid_from").is_some() => None,
        v => v,
    };
    Some(Lookup {
        name: name.to_string(),
        from: from?,
        key: key?.0,
        on: on?.0,
        schema: schema?,
        refresh: refresh?,
        on_missing: on_missing?,
        valid: valid?,
    })
    .filter(|_| ok)
}

/// A lookup's `schema`: `column: type` (only the flat form: a table has no nested values).
fn lookup_schema(
    d: &mut Diagnostics,
    node: &Node,
    name: &str,
) -> Option<Vec<(String, ColumnType)>> {
    let entries = read::entries(d, node, "schema", "column: type")?;
    if entries.is_empty() {
        d.error(
            node.loc(),
            format!("lookup `{name}`: `schema` declares no columns"),
        );
        return None;
    }
    let mut out = Vec::with_capacity(entries.len());
    let mut ok = true;
    for (key, value) in entries {
        if !read::identifier(d, key, "column") {
            ok = false;
            continue;
        }
        let Some(t) = read::string(d, value, &key.name) else {
            ok = false;
            continue;
        };
        match ColumnType::ALL.iter().find(|(n, _)| *n == t) {
            Some((_, ty)) => out.push((key.name.clone(), *ty)),
            None => {
                d.error(
                    value.loc(),
                    format!(
                        "unknown type `{t}` of lookup column `{}`{} (one of string, int, float, bool, timestamp)",
                        key.name,
                        did_you_mean(&t, ColumnType::ALL.iter().map(|(n, _)| *n))
                    ),
                );
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

/// `from:` — a path (lake-relative or a URL) of a `.csv` or `.parquet` file, or
/// `{postgres: {url, query}}`.
fn source(d: &mut Diagnostics, obj: &Obj, node: &Node, name: &str) -> Option<LookupSource> {
    let options = match obj.value("options") {
        None => Some(BTreeMap::new()),
        Some(n) => read::string_map(d, n, "options"),
    };
    if let Node::Map { .. } = node {
        let o = Obj::new(d, node, &format!("lookup `{name}` `from`"), &["postgres"])?;
        let pg = o.required(d, "postgres", &format!("lookup `{name}` `from`"))?;
        let what = format!("lookup `{name}` postgres source");
        let p = Obj::new(d, pg, &what, &["url", "query"])?;
        let url = p
            .required(d, "url", &what)
            .and_then(|n| Some((read::string(d, n, "url")?, n.loc())));
        let query = p
            .required(d, "query", &what)
            .and_then(|n| read::string(d, n, "query"));
        if let Some((u, loc)) = &url
            && !(u.starts_with("postgres://") || u.starts_with("postgresql://"))
        {
            d.error(
                *loc,
                format!(
                    "lookup `{name}`: postgres `url` must start with postgres://, found `{}`",
                    u.split("://").next().map_or(u.as_str(), |s| s)
                ),
            );
            return None;
        }
        if let Some(n) = obj.get("options") {
            d.error(
                n.loc(),
                "`options` configure the object store of a URL `from` (s3://, az://, gs://)",
            );
            return None;
        }
        return Some(LookupSource::Postgres {
            url: url?.0,
            query: query?,
        });
    }
    let path = read::string(d, node, "from")?;
    let loc = node.loc();
    let is_url = objects::is_url(&path);
    let what = format!("lookup `{name}` `from`");
    let named = objects::Named {
        what: &what,
        example: "reference/stores.csv",
    };
    let path_ok = match path.strip_prefix("./") {
        Some(rest) => project_file(d, &path, rest, loc, &what),
        None => objects::check(d, &path, loc, &named),
    };
    if !is_url && path_ok && obj.value("options").is_some() {
        d.error(
            obj.get("options").map_or(obj.loc, Node::loc),
            "`options` configure the object store of a URL `from` (s3://, az://, gs://); a lake-relative path uses the lake's own settings",
        );
        return None;
    }
    let format = [FileFormat::Parquet, FileFormat::Csv]
        .into_iter()
        .find(|f| path.ends_with(&format!(".{}", f.extension())));
    let Some(format) = format else {
        d.error(
            loc,
            format!(
                "lookup `{name}`: `from` `{path}` must end in .csv or .parquet (the extension says how to read it), or be {{postgres: {{url, query}}}}"
            ),
        );
        return None;
    };
    if !path_ok {
        return None;
    }
    Some(LookupSource::File {
        path,
        format,
        options: options?,
    })
}

/// `./REST`: a file of the project directory, by a relative path without empty, `.` or `..`
/// steps.
fn project_file(d: &mut Diagnostics, path: &str, rest: &str, loc: Loc, what: &str) -> bool {
    if rest.is_empty()
        || rest.contains('\\')
        || rest
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
    {
        d.error(
            loc,
            format!(
                "{what} `{path}`: write a file of the project like ./reference/stores.csv (no empty, `.` or `..` steps)"
            ),
        );
        return false;
    }
    true
}

/// Makes the project-relative `from` paths (`./reference/x.csv`) of `p`'s lookups
/// `file://` URLs of the files under `root`, the project directory.
pub fn resolve_project_paths(p: &mut Pipeline, root: &std::path::Path) {
    for l in &mut p.lookups {
        if let LookupSource::File { path, .. } = &mut l.from
            && let Some(rest) = path.strip_prefix("./")
        {
            let file = std::path::absolute(root.join(rest)).unwrap_or_else(|_| root.join(rest));
            if let Ok(u) = url::Url::from_file_path(&file) {
                *path = u.to_string();
            }
        }
    }
}

/// The columns lookups add for `filter` and `columns`: `NAME.COLUMN` with its type.
pub(super) fn columns(lookups: &[Lookup]) -> Vec<(String, ColumnType)> {
    lookups
        .iter()
        .flat_map(|l| l.schema.iter().map(|(c, t)| (l.column_name(c), *t)))
        .collect()
}

/// Where a postgres lookup's `url` carries a password written into the file rather than as
/// `${VAR}`: checked on the file as written, before interpolation.
pub(super) fn literal_lookup_secrets(root: &Node) -> Vec<(Loc, String)> {
    let mut out = Vec::new();
    let Some(Node::Map { entries, .. }) = root.get("lookups") else {
        return out;
    };
    for (_, lookup) in entries {
        if let Some(Node::Scalar { value, loc, .. }) = lookup
            .get("from")
            .and_then(|f| f.get("postgres"))
            .and_then(|p| p.get("url"))
            && !value.contains("${")
            && url::Url::parse(value).is_ok_and(|u| u.password().is_some())
        {
            out.push((
                *loc,
                "the password in a lookup's postgres `url` is a secret: write it as `${VAR}` (e.g. postgres://user:${PGPASSWORD}@host/db) and set VAR in the environment, not in the file".to_string(),
            ));
        }
    }
    out
}
