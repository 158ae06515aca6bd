//! Nested columns (`path: $.a.b[0]`, `from: meta.KEY`): the schema's paths as a tree that is
//! walked in the same single pass over the line as flat columns. Values on a path are parsed
//! in place; everything beside the paths is checked and skipped, so no JSON tree is built.

use std::collections::BTreeMap;

use super::json::Scanner;
use super::{Decoder, Slot};
use crate::spec::{ColumnType, JsonPath, PathStep};

/// Where the schema's columns sit under one JSON object or array.
#[derive(Debug, Clone, Default)]
pub(super) struct Tree {
    keys: Vec<(String, Node)>,
    indexes: Vec<(usize, Node)>,
}

#[derive(Debug, Clone)]
enum Node {
    Column(usize),
    Inner(Tree),
}

impl Tree {
    /// The tree of every column, or None when every column is the top-level key of its name
    /// (the flat decoder handles those).
    pub fn build(
        columns: &[(String, ColumnType)],
        paths: &BTreeMap<String, JsonPath>,
    ) -> Option<Tree> {
        if paths.is_empty() {
            return None;
        }
        let mut root = Tree::default();
        for (i, (name, _)) in columns.iter().enumerate() {
            match paths.get(name) {
                Some(p) => root.insert(&p.0, i),
                None => root.insert(&[PathStep::Key(name.clone())], i),
            }
        }
        Some(root)
    }

    /// Validation guarantees no path is a prefix of another; a clash keeps the first.
    fn insert(&mut self, steps: &[PathStep], column: usize) {
        let Some((first, rest)) = steps.split_first() else {
            return;
        };
        let node = match first {
            PathStep::Key(k) => match self.keys.iter().position(|(n, _)| n == k) {
                Some(i) => &mut self.keys[i].1,
                None => {
                    self.keys.push((k.clone(), Node::Inner(Tree::default())));
                    &mut self.keys.last_mut().expect("just pushed").1
                }
            },
            PathStep::Index(x) => match self.indexes.iter().position(|(n, _)| n == x) {
                Some(i) => &mut self.indexes[i].1,
                None => {
                    self.indexes.push((*x, Node::Inner(Tree::default())));
                    &mut self.indexes.last_mut().expect("just pushed").1
                }
            },
        };
        match node {
            Node::Inner(t) if rest.is_empty() => {
                if t.keys.is_empty() && t.indexes.is_empty() {
                    *node = Node::Column(column);
                }
            }
            Node::Inner(t) => t.insert(rest, column),
            Node::Column(_) => {}
        }
    }

    fn key(&self, k: &str) -> Option<&Node> {
        self.keys.iter().find(|(n, _)| n == k).map(|(_, v)| v)
    }

    fn index(&self, x: usize) -> Option<&Node> {
        self.indexes.iter().find(|(n, _)| *n == x).map(|(_, v)| v)
    }
}

/// Nesting the walk follows along paths before values are only skipped (which has its own
/// limit): paths are short, so this only guards against a pathological schema.
const MAX_PATH_DEPTH: usize = 64;

impl Decoder {
    /// The object at `s` (on its `{`), filling the slots of the columns under `tree`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn object(
        &self,
        tree: &Tree,
        s: &mut Scanner,
        line: &str,
        slots: &mut [Slot],
        buf: &mut String,
        key_buf: &mut String,
        depth: usize,
    ) -> Result<(), String> {
        s.expect(b'{', "`{`")?;
        s.ws();
        if s.peek() == Some(b'}') {
            s.pos += 1;
            return Ok(());
        }
        loop {
            s.ws();
            key_buf.clear();
            let key = s.string(key_buf)?.resolve(line, key_buf);
            let node = tree.key(key);
            s.ws();
            s.expect(b':', "`:`")?;
            s.ws();
            self.step(node, s, line, slots, buf, key_buf, depth)?;
            s.ws();
            match s.peek() {
                Some(b',') => s.pos += 1,
                Some(b'}') => {
                    s.pos += 1;
                    return Ok(());
                }
                _ => return Err(s.err("expected `,` or `}`")),
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn array(
        &self,
        tree: &Tree,
        s: &mut Scanner,
        line: &str,
        slots: &mut [Slot],
        buf: &mut String,
        key_buf: &mut String,
        depth: usize,
    ) -> Result<(), String> {
        s.expect(b'[', "`[`")?;
        s.ws();
        if s.peek() == Some(b']') {
            s.pos += 1;
            return Ok(());
        }
        let mut i = 0;
        loop {
            s.ws();
            self.step(tree.index(i), s, line, slots, buf, key_buf, depth)?;
            i += 1;
            s.ws();
            match s.peek() {
                Some(b',') => s.pos += 1,
                Some(b']') => {
                    s.pos += 1;
                    return Ok(());
                }
                _ => return Err(s.err("expected `,` or `]`")),
            }
        }
    }

    /// The value at `s`: a column's value, a container to walk into, or one to skip.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        node: Option<&Node>,
        s: &mut Scanner,
        line: &str,
        slots: &mut [Slot],
        buf: &mut String,
        key_buf: &mut String,
        depth: usize,
    ) -> Result<(), String> {
        match node {
            Some(Node::Column(i)) => {
                self.json_value(*i, s, line, buf, &mut slots[*i])?;
            }
            Some(Node::Inner(t)) if depth < MAX_PATH_DEPTH => match s.peek() {
                Some(b'{') => self.object(t, s, line, slots, buf, key_buf, depth + 1)?,
                Some(b'[') => self.array(t, s, line, slots, buf, key_buf, depth + 1)?,
                // A scalar where the path goes deeper: the columns under it stay missing.
                _ => s.skip_value(buf, depth + 1)?,
            },
            _ => s.skip_value(buf, depth + 1)?,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use polars::prelude::*;

    use super::super::{Decoded, Decoder};
    use crate::spec::pipeline::parse_path;
    use crate::spec::{Archive, ColumnType, Format, JsonPath, Pipeline, Source};

    fn pipeline(columns: &[(&str, ColumnType, Option<&str>)]) -> Pipeline {
        Pipeline {
            name: "orders".into(),
            description: None,
            file: "pipelines/orders.yaml".into(),
            source: Source::Http,
            format: Format::Json,
            schema: columns
                .iter()
                .map(|(n, t, _)| (n.to_string(), *t))
                .collect(),
            paths: columns
                .iter()
                .filter_map(|(n, _, p)| {
                    let p = (*p)?;
                    let path = match p.strip_prefix("meta.") {
                        Some(k) => JsonPath::meta(k),
                        None => parse_path(p).unwrap(),
                    };
                    Some((n.to_string(), path))
                })
                .collect(),
            event_time: "ts".into(),
            event_id: None,
            dedupe_window: Duration::from_secs(60),
            partitions: 1,
            partition_key: None,
            buffer: None,
            filter: None,
            columns: vec![],
            lookups: vec![],
            archive: Archive {
                segment_rows: 10,
                segment_age: Duration::from_secs(1),
            },
            views: vec![],
        }
    }

    fn nested() -> Pipeline {
        pipeline(&[
            ("ts", ColumnType::Timestamp, Some("$.time")),
            ("device", ColumnType::String, Some("$.body.device.id")),
            ("temp", ColumnType::Float, Some("$.readings[1].value")),
            ("store", ColumnType::String, None),
            ("odd", ColumnType::String, Some("$['a key'][0][2]")),
            ("msg", ColumnType::String, Some("meta.message_id")),
        ])
    }

    fn column(d: &Decoded, c: &str) -> Vec<AnyValue<'static>> {
        let s = d.events.column(c).unwrap().as_materialized_series().clone();
        s.iter().map(|v| v.into_static()).collect()
    }

    #[test]
    fn nested_paths_are_read_in_one_pass() {
        let input = concat!(
            r#"{"store":"s1","body":{"x":[1,{"y":2}],"device":{"kind":"t","id":"d1"}},"readings":[{"value":1.5},{"value":2.5,"unit":"C"}],"time":1714564800000}"#,
            "\n",
            // Missing and mistyped intermediates leave the column null, never the line bad.
            r#"{"time":"2024-05-01T12:00:00Z","body":{"device":"flat"},"readings":[{"value":9}],"a key":[[0,1,"deep"]]}"#,
            "\n",
            r#"{"time":1,"readings":7,"body":null,"$meta":{"message_id":"m-3"}}"#,
            "\n",
            // A wrong type at the end of a path rejects the line like a flat column would.
            r#"{"time":1,"readings":[{},{"value":"hot"}]}"#,
            "\n",
            // Values beside the paths are still checked.
            r#"{"time":1,"body":{"device":{"id":"d","bad":tru}}}"#,
            "\n",
        );
        let d = Decoder::new(&nested()).decode(input.as_bytes());
        assert_eq!(d.events.height(), 3, "{:?}", d.rejected);
        assert_eq!(
            column(&d, "device"),
            vec![
                AnyValue::StringOwned("d1".into()),
                AnyValue::Null,
                AnyValue::Null
            ]
        );
        assert_eq!(
            column(&d, "temp"),
            vec![AnyValue::Float64(2.5), AnyValue::Null, AnyValue::Null]
        );
        assert_eq!(column(&d, "store")[0], AnyValue::StringOwned("s1".into()));
        assert_eq!(column(&d, "odd")[1], AnyValue::StringOwned("deep".into()));
        assert_eq!(column(&d, "msg")[2], AnyValue::StringOwned("m-3".into()));
        let reasons: Vec<(usize, &str)> = d
            .rejected
            .iter()
            .map(|r| (r.line, r.reason.as_str()))
            .collect();
        assert_eq!(reasons.len(), 2);
        assert_eq!(reasons[0].0, 4);
        assert!(
            reasons[0].1.contains("`temp`: expected a number"),
            "{reasons:?}"
        );
        assert_eq!(reasons[1].0, 5);
        assert!(reasons[1].1.starts_with("invalid JSON"), "{reasons:?}");
    }

    #[test]
    fn the_last_meta_object_wins_over_one_the_producer_wrote() {
        let p = pipeline(&[
            ("ts", ColumnType::Timestamp, None),
            ("msg", ColumnType::String, Some("meta.message_id")),
        ]);
        let input = r#"{"ts":1,"$meta":{"message_id":"forged"},"$meta":{"message_id":"real"}}"#;
        let d = Decoder::new(&p).decode(input.as_bytes());
        assert_eq!(
            column(&d, "msg"),
            vec![AnyValue::StringOwned("real".into())]
        );
    }

    #[test]
    fn flat_schemas_build_no_tree() {
        let p = pipeline(&[("ts", ColumnType::Timestamp, None)]);
        assert!(Decoder::new(&p).tree.is_none());
    }
}
