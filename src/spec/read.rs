//! Typed reads from the located YAML tree; each failed read records a diagnostic and yields
//! `None`, so validation continues and reports every problem.

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::diag::{Diagnostics, did_you_mean};
use super::yaml::{Key, Loc, Node};

/// A mapping whose keys were checked against the allowed ones.
pub struct Obj<'a> {
    pub loc: Loc,
    entries: &'a [(Key, Node)],
}

impl<'a> Obj<'a> {
    /// `what` names the mapping in messages ("pipeline", "source", "view `x`").
    pub fn new(
        d: &mut Diagnostics,
        node: &'a Node,
        what: &str,
        allowed: &[&str],
    ) -> Option<Obj<'a>> {
        let Node::Map { entries, loc } = node else {
            d.error(
                node.loc(),
                format!("{what} must be a mapping, found {}", node.kind()),
            );
            return None;
        };
        for (key, _) in entries {
            if !allowed.contains(&key.name.as_str()) {
                d.error(
                    key.loc,
                    format!(
                        "unknown key `{}` in {what}{}",
                        key.name,
                        did_you_mean(&key.name, allowed.iter().copied())
                    ),
                );
            }
        }
        Some(Obj { loc: *loc, entries })
    }

    pub fn get(&self, key: &str) -> Option<&'a Node> {
        self.entries
            .iter()
            .find(|(k, _)| k.name == key)
            .map(|(_, v)| v)
    }

    /// Like `get`, and a null value counts as absent.
    pub fn value(&self, key: &str) -> Option<&'a Node> {
        self.get(key).filter(|n| !n.is_null())
    }

    pub fn required(&self, d: &mut Diagnostics, key: &str, what: &str) -> Option<&'a Node> {
        let v = self.value(key);
        if v.is_none() {
            d.error(self.loc, format!("{what} is missing required key `{key}`"));
        }
        v
    }
}

pub fn string(d: &mut Diagnostics, node: &Node, what: &str) -> Option<String> {
    match node {
        Node::Scalar { value, .. } if !node.is_null() => Some(value.clone()),
        _ => {
            d.error(
                node.loc(),
                format!("`{what}` must be a string, found {}", node.kind()),
            );
            None
        }
    }
}

pub fn integer(d: &mut Diagnostics, node: &Node, what: &str) -> Option<u64> {
    match node {
        Node::Scalar {
            value,
            quoted: false,
            ..
        } => match value.replace('_', "").parse::<u64>() {
            Ok(n) => Some(n),
            Err(_) => {
                d.error(
                    node.loc(),
                    format!("`{what}` must be a whole number ≥ 0, found `{value}`"),
                );
                None
            }
        },
        _ => {
            d.error(
                node.loc(),
                format!("`{what}` must be a whole number, found {}", describe(node)),
            );
            None
        }
    }
}

/// The whole number `key` of `obj` (`default` when absent), which must lie in `range` and fit
/// a `T`; otherwise `key` must be what `must` says ("at least 1").
pub fn integer_in<T: TryFrom<u64>>(
    d: &mut Diagnostics,
    obj: &Obj,
    key: &str,
    default: u64,
    range: RangeInclusive<u64>,
    must: &str,
) -> Option<T> {
    let n = match obj.value(key) {
        None => default,
        Some(node) => integer(d, node, key)?,
    };
    match T::try_from(n) {
        Ok(v) if range.contains(&n) => Some(v),
        _ => {
            d.error(
                obj.get(key).map_or(obj.loc, Node::loc),
                format!("`{key}` must be {must}"),
            );
            None
        }
    }
}

pub fn boolean(d: &mut Diagnostics, node: &Node, what: &str) -> Option<bool> {
    match node {
        Node::Scalar {
            value,
            quoted: false,
            ..
        } if matches!(value.as_str(), "true" | "True" | "TRUE") => Some(true),
        Node::Scalar {
            value,
            quoted: false,
            ..
        } if matches!(value.as_str(), "false" | "False" | "FALSE") => Some(false),
        _ => {
            d.error(
                node.loc(),
                format!("`{what}` must be true or false, found {}", describe(node)),
            );
            None
        }
    }
}

pub fn duration(d: &mut Diagnostics, node: &Node, what: &str) -> Option<Duration> {
    let text = string(d, node, what)?;
    match super::duration::parse(&text) {
        Ok(v) if v.is_zero() => {
            d.error(node.loc(), format!("`{what}` must be longer than zero"));
            None
        }
        Ok(v) => Some(v),
        Err(e) => {
            d.error(node.loc(), format!("`{what}`: {e}"));
            None
        }
    }
}

/// The entries of a mapping whose entries are all alike (`schema`, `metrics`, `columns`):
/// `shape` says what an entry is (`column: type`).
pub fn entries<'a>(
    d: &mut Diagnostics,
    node: &'a Node,
    key: &str,
    shape: &str,
) -> Option<&'a [(Key, Node)]> {
    let Node::Map { entries, .. } = node else {
        d.error(
            node.loc(),
            format!(
                "`{key}` must be a mapping of {shape}, found {}",
                node.kind()
            ),
        );
        return None;
    };
    Some(entries)
}

/// Whether an entry's key is a column or metric name (`what`), reported when it is not.
pub fn identifier(d: &mut Diagnostics, key: &Key, what: &str) -> bool {
    let ok = is_identifier(&key.name);
    if !ok {
        d.error(
            key.loc,
            format!(
                "invalid {what} name `{}`: use letters, digits and `_`",
                key.name
            ),
        );
    }
    ok
}

/// The items of a list.
fn list<'a>(d: &mut Diagnostics, node: &'a Node, what: &str) -> Option<&'a [Node]> {
    let Node::Seq { items, .. } = node else {
        d.error(
            node.loc(),
            format!("`{what}` must be a list, found {}", node.kind()),
        );
        return None;
    };
    Some(items)
}

/// The items of a non-empty list of named mappings (`views`, `tasks`), each built by `build`.
pub struct Named<'a, T> {
    /// The items that built, in order.
    pub built: Vec<T>,
    /// The `name` of every item that has one, built or not, in order.
    pub names: Vec<&'a str>,
    /// Every item built and no name was given twice.
    pub ok: bool,
}

/// Reads the list `key` of named `what`s (`views` of `view`s): it must have an item, a name
/// given twice is reported at its second item, and every item is built whatever else is wrong.
pub fn named<'a, T>(
    d: &mut Diagnostics,
    node: &'a Node,
    key: &str,
    what: &str,
    mut build: impl FnMut(&mut Diagnostics, &'a Node) -> Option<T>,
) -> Option<Named<'a, T>> {
    let items = list(d, node, key)?;
    if items.is_empty() {
        d.error(
            node.loc(),
            format!("`{key}` is empty: declare at least one {what}"),
        );
        return None;
    }
    let mut out = Named {
        built: Vec::new(),
        names: Vec::new(),
        ok: true,
    };
    for item in items {
        if let Some(name_node) = item.get("name")
            && let Some(name) = name_node.as_str()
        {
            if out.names.contains(&name) {
                d.error(name_node.loc(), format!("duplicate {what} name `{name}`"));
                out.ok = false;
            }
            out.names.push(name);
        }
        match build(d, item) {
            Some(t) => out.built.push(t),
            None => out.ok = false,
        }
    }
    Some(out)
}

/// A list of strings, each with its location (for "unknown column" pointing at the item).
pub fn string_list(d: &mut Diagnostics, node: &Node, what: &str) -> Option<Vec<(String, Loc)>> {
    let items = list(d, node, what)?;
    let mut out = Vec::with_capacity(items.len());
    let mut ok = true;
    for item in items {
        match string(d, item, what) {
            Some(s) => out.push((s, item.loc())),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

/// Pipeline, view, workflow and task names: `[a-z][a-z0-9_]*`.
pub fn name(d: &mut Diagnostics, node: &Node, what: &str) -> Option<String> {
    let s = string(d, node, what)?;
    if is_name(&s) {
        Some(s)
    } else {
        d.error(
            node.loc(),
            format!("invalid {what} `{s}`: use lowercase letters, digits and `_`, starting with a letter"),
        );
        None
    }
}

pub fn is_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
}

/// Column and metric names: SQL identifiers.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn describe(node: &Node) -> String {
    match node {
        Node::Scalar { value, .. } if !node.is_null() => format!("`{value}`"),
        _ => node.kind().to_string(),
    }
}

/// A mapping of string settings (`options:` of an object store): each value a string.
pub fn string_map(
    d: &mut Diagnostics,
    node: &Node,
    what: &str,
) -> Option<BTreeMap<String, String>> {
    let entries = entries(d, node, what, "setting: value")?;
    let mut out = BTreeMap::new();
    let mut ok = true;
    for (k, v) in entries {
        match string(d, v, &k.name) {
            Some(s) => {
                out.insert(k.name.clone(), s);
            }
            None => ok = false,
        }
    }
    ok.then_some(out)
}
