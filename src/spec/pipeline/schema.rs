//! A pipeline's `schema:`: the declared columns, and where each is read from (a JSON path
//! into the event, or a key of the source's metadata).

use std::collections::BTreeMap;

use crate::spec::diag::{Diagnostics, did_you_mean};
use crate::spec::model::*;
use crate::spec::read::{self, Obj};
use crate::spec::yaml::{Loc, Node};

/// Declared columns and the paths of those not read from the top-level key of their name.
type Mapped = (Vec<(String, ColumnType)>, BTreeMap<String, JsonPath>);

/// `schema:` — each entry `col: TYPE` (the top-level key `col`), or
/// `col: {type: TYPE, path: $.a.b[0]}`, or `col: {type: TYPE, from: meta.KEY}`.
pub(super) fn schema(
    d: &mut Diagnostics,
    node: &Node,
    source: Option<&Source>,
    format: Option<Format>,
) -> Option<Mapped> {
    let entries = read::entries(d, node, "schema", "column: type")?;
    if entries.is_empty() {
        d.error(node.loc(), "`schema` declares no columns");
        return None;
    }
    let mut out = Vec::new();
    let mut paths: BTreeMap<String, (JsonPath, Loc)> = BTreeMap::new();
    // `from: meta.KEY` columns: the type each value arrives as, checked against the column's.
    let mut meta_types: Vec<(String, ColumnType, Loc)> = Vec::new();
    let mut ok = true;
    for (key, value) in entries {
        if !read::identifier(d, key, "column") {
            ok = false;
        }
        let (ty_node, path) = match value {
            Node::Map { .. } => {
                let what = format!("column `{}`", key.name);
                let Some(o) = Obj::new(d, value, &what, &["type", "path", "from"]) else {
                    ok = false;
                    continue;
                };
                let Some(t) = o.required(d, "type", &what) else {
                    ok = false;
                    continue;
                };
                let path = match (o.value("path"), o.value("from")) {
                    (Some(_), Some(f)) => {
                        d.error(
                            f.loc(),
                            format!("column `{}` has both `path` and `from`: use one", key.name),
                        );
                        ok = false;
                        None
                    }
                    (Some(p), None) => json_path(d, p),
                    (None, Some(f)) => meta_path(d, f, source).map(|(p, arrives)| {
                        meta_types.push((key.name.clone(), arrives, f.loc()));
                        p
                    }),
                    (None, None) => None,
                };
                if (o.value("path").is_some() || o.value("from").is_some()) && path.is_none() {
                    ok = false;
                }
                if let Some(p) = &path
                    && format == Some(Format::Csv)
                {
                    let n = o.value("path").or(o.value("from")).unwrap_or(value);
                    d.error(
                        n.loc(),
                        format!(
                            "column `{}`: `{}` applies to JSON events only (this pipeline's format is csv)",
                            key.name,
                            if p.meta_key().is_some() { "from" } else { "path" }
                        ),
                    );
                    ok = false;
                }
                (t, path.map(|p| (p, value.loc())))
            }
            _ => (value, None),
        };
        let Some(ty) = read::string(d, ty_node, &key.name) else {
            ok = false;
            continue;
        };
        match ColumnType::ALL.iter().find(|(n, _)| *n == ty) {
            Some((_, t)) => out.push((key.name.clone(), *t)),
            None => {
                let names = ColumnType::ALL.map(|(n, _)| n);
                d.error(
                    ty_node.loc(),
                    format!(
                        "unknown type `{ty}` for column `{}`{} (one of {})",
                        key.name,
                        did_you_mean(&ty, names),
                        names.join(", ")
                    ),
                );
                ok = false;
            }
        }
        if let Some(p) = path {
            paths.insert(key.name.clone(), p);
        }
    }
    for (col, arrives, loc) in &meta_types {
        if let Some((_, t)) = out.iter().find(|(c, _)| c == col)
            && !arrives.fits(*t)
        {
            d.error(
                *loc,
                format!(
                    "column `{col}` is a {}, but this metadata arrives as a {} (declare it `{}`)",
                    t.name(),
                    arrives.name(),
                    arrives.name()
                ),
            );
            ok = false;
        }
    }
    // Every column reads one value: no path may lead into another column's value.
    let all: Vec<(&str, JsonPath, Loc)> = out
        .iter()
        .map(|(c, _)| match paths.get(c) {
            Some((p, loc)) => (c.as_str(), p.clone(), *loc),
            None => (
                c.as_str(),
                JsonPath(vec![PathStep::Key(c.clone())]),
                Loc::default(),
            ),
        })
        .collect();
    for (i, (a, pa, _)) in all.iter().enumerate() {
        for (b, pb, loc) in &all[i + 1..] {
            let (short, long) = if pa.0.len() <= pb.0.len() {
                (pa, pb)
            } else {
                (pb, pa)
            };
            if long.0.starts_with(&short.0) {
                let at = if *loc == Loc::default() {
                    paths.get(*a).map_or(node.loc(), |(_, l)| *l)
                } else {
                    *loc
                };
                d.error(
                    at,
                    if pa == pb {
                        format!("columns `{a}` and `{b}` read the same value `{pa}`")
                    } else {
                        format!(
                            "columns `{a}` (`{pa}`) and `{b}` (`{pb}`): one path leads into the other's value"
                        )
                    },
                );
                ok = false;
            }
        }
    }
    let paths = paths.into_iter().map(|(c, (p, _))| (c, p)).collect();
    ok.then_some((out, paths))
}

/// `path: $.a.b[0]` — checked where it is written (the column of the offending character).
fn json_path(d: &mut Diagnostics, node: &Node) -> Option<JsonPath> {
    let text = read::string(d, node, "path")?;
    match parse_path(&text) {
        Ok(p) => Some(p),
        Err((at, msg)) => {
            let mut loc = node.loc();
            if let Node::Scalar { quoted, .. } = node
                && !text.contains('\n')
            {
                loc.col += at + usize::from(*quoted);
            }
            d.error(loc, format!("invalid path `{text}`: {msg}"));
            None
        }
    }
}

/// A JSONPath of keys and indexes from the event's root: `$.a.b`, `$.a[0]`, `$['a b']`.
/// The error is the byte offset of the problem and what is wrong there.
pub fn parse_path(s: &str) -> Result<JsonPath, (usize, String)> {
    let b = s.as_bytes();
    if b.first() != Some(&b'$') {
        return Err((
            0,
            "a path starts at the event's root `$`, like `$.body.id`".into(),
        ));
    }
    let mut i = 1;
    let mut steps = Vec::new();
    while i < b.len() {
        match b[i] {
            b'.' => {
                let start = i + 1;
                let mut j = start;
                while j < b.len() && !matches!(b[j], b'.' | b'[') {
                    j += 1;
                }
                let key = &s[start..j];
                if key.is_empty() {
                    return Err((start, "expected a key after `.`".into()));
                }
                if key
                    .chars()
                    .any(|c| c.is_whitespace() || "]'\"*?@()".contains(c))
                {
                    return Err((
                        start,
                        format!(
                            "`{key}` is not a plain key (write `['{key}']` for a key with such characters; wildcards and filters are not supported)"
                        ),
                    ));
                }
                steps.push(PathStep::Key(key.to_string()));
                i = j;
            }
            b'[' => {
                let start = i + 1;
                match b.get(start) {
                    Some(&q @ (b'\'' | b'"')) => {
                        let Some(len) = s[start + 1..].find(q as char) else {
                            return Err((start, "unterminated quoted key".into()));
                        };
                        let key = &s[start + 1..start + 1 + len];
                        let close = start + 1 + len + 1;
                        if b.get(close) != Some(&b']') {
                            return Err((close, "expected `]` after the quoted key".into()));
                        }
                        steps.push(PathStep::Key(key.to_string()));
                        i = close + 1;
                    }
                    _ => {
                        let Some(len) = s[start..].find(']') else {
                            return Err((i, "unterminated `[`".into()));
                        };
                        let idx = &s[start..start + len];
                        match idx.parse::<usize>() {
                            Ok(n) if idx.bytes().all(|c| c.is_ascii_digit()) => {
                                steps.push(PathStep::Index(n))
                            }
                            _ => {
                                return Err((
                                    start,
                                    format!(
                                        "`[{idx}]` is not an array index (write a number like `[0]`, or a quoted key like `['k']`)"
                                    ),
                                ));
                            }
                        }
                        i = start + len + 1;
                    }
                }
            }
            _ => return Err((i, "expected `.key` or `[index]`".into())),
        }
    }
    if steps.is_empty() {
        return Err((1, "the path names no value (write `$.key`)".into()));
    }
    if steps.first() == Some(&PathStep::Key(META_KEY.into())) {
        return Err((
            2,
            format!("`{META_KEY}` is reserved for broker metadata: use `from: meta.KEY`"),
        ));
    }
    Ok(JsonPath(steps))
}

/// `from: meta.KEY` — a key the pipeline's source carries. Returns the path and the type the
/// value arrives as.
fn meta_path(
    d: &mut Diagnostics,
    node: &Node,
    source: Option<&Source>,
) -> Option<(JsonPath, ColumnType)> {
    let text = read::string(d, node, "from")?;
    let Some(key) = text.strip_prefix("meta.") else {
        d.error(
            node.loc(),
            format!("`from: {text}`: write `from: meta.KEY` (broker metadata), or `path:` for a value of the event"),
        );
        return None;
    };
    let source = source?;
    let keys = source.meta_keys();
    if keys.is_empty() {
        d.error(
            node.loc(),
            format!(
                "`from: {text}`: the {} source carries no metadata",
                source.kind()
            ),
        );
        return None;
    }
    let Some((_, t)) = keys.iter().find(|(k, _)| *k == key) else {
        let names: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
        d.error(
            node.loc(),
            format!(
                "unknown metadata key `{key}` of the {} source{} (one of {})",
                source.kind(),
                did_you_mean(key, names.iter().copied()),
                names.join(", ")
            ),
        );
        return None;
    };
    Some((JsonPath::meta(key), *t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse_and_print_back() {
        for (text, shown) in [
            ("$.body.device.id", "$.body.device.id"),
            ("$.readings[0].value", "$.readings[0].value"),
            ("$['a key'][2]", "$[\"a key\"][2]"),
            ("$[\"x\"]", "$.x"),
        ] {
            assert_eq!(parse_path(text).unwrap().to_string(), shown, "{text}");
        }
        assert_eq!(JsonPath::meta("message_id").to_string(), "meta.message_id");
    }

    #[test]
    fn bad_paths_say_where() {
        for (text, at) in [
            ("body.id", 0),
            ("$", 1),
            ("$.", 2),
            ("$.a..b", 4),
            ("$.a[x]", 4),
            ("$.a[0", 3),
            ("$['a]", 2),
            ("$.a[*]", 4),
            ("$.a b", 2),
            ("$.$meta.message_id", 2),
        ] {
            let (got, msg) = parse_path(text).expect_err(text);
            assert_eq!(got, at, "{text}: {msg}");
        }
    }
}
