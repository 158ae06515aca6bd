//! A YAML document as a tree of located nodes.
//!
//! serde would stop at the first problem and forget where values came from; validation needs
//! both every problem and the `LINE:COL` of each value, so the spec is read into this tree
//! (saphyr-parser events) and checked by hand in the sibling modules.

use std::borrow::Cow;

use saphyr_parser::{Event, Parser, ScalarStyle};

/// 1-based line and column of a node's first character.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord, Hash)]
pub struct Loc {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Node {
    /// A scalar; `quoted` scalars are always strings (`"1"` is not a number).
    Scalar {
        value: String,
        quoted: bool,
        loc: Loc,
    },
    Seq {
        items: Vec<Node>,
        loc: Loc,
    },
    /// Keys keep their own location so an unknown key can be pointed at.
    Map {
        entries: Vec<(Key, Node)>,
        loc: Loc,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub name: String,
    pub loc: Loc,
}

/// A syntax error: where the parser stopped and why.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntaxError {
    pub loc: Loc,
    pub message: String,
}

impl Node {
    pub fn loc(&self) -> Loc {
        match self {
            Node::Scalar { loc, .. } | Node::Seq { loc, .. } | Node::Map { loc, .. } => *loc,
        }
    }

    /// The name of this node's kind, for "expected a mapping, found a list" messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Scalar { value, quoted, .. } => {
                if !quoted && is_null(value) {
                    "null"
                } else {
                    "a scalar"
                }
            }
            Node::Seq { .. } => "a list",
            Node::Map { .. } => "a mapping",
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Node::Scalar { value, quoted: false, .. } if is_null(value))
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }

    /// Looks a key up in a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map { entries, .. } => {
                entries.iter().find(|(k, _)| k.name == key).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    /// Replaces `${VAR}` and `${VAR:-default}` in every scalar. Returns the variables that are
    /// unset and have no default, with where they were used.
    pub fn interpolate(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Vec<(Loc, String)> {
        let mut missing = Vec::new();
        self.interpolate_into(env, &mut missing);
        missing
    }

    fn interpolate_into(
        &mut self,
        env: &dyn Fn(&str) -> Option<String>,
        missing: &mut Vec<(Loc, String)>,
    ) {
        match self {
            Node::Scalar { value, loc, .. } => {
                if value.contains("${") {
                    match interpolate(value, env) {
                        Ok(v) => *value = v,
                        Err(msg) => missing.push((*loc, msg)),
                    }
                }
            }
            Node::Seq { items, .. } => items
                .iter_mut()
                .for_each(|n| n.interpolate_into(env, missing)),
            Node::Map { entries, .. } => entries
                .iter_mut()
                .for_each(|(_, n)| n.interpolate_into(env, missing)),
        }
    }
}

fn is_null(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

/// Expands `${VAR}` / `${VAR:-default}`; `$${` escapes a literal `${`.
pub fn interpolate(input: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        if rest[..start].ends_with('$') {
            out.push_str(&rest[..start - 1]);
            out.push_str("${");
            rest = &rest[start + 2..];
            continue;
        }
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!(
                "unterminated `${{` in `{input}` (write `${{VAR}}` or `${{VAR:-default}}`)"
            ));
        };
        let body = &after[..end];
        let (name, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "`${{{body}}}` is not a valid variable reference (use `${{NAME}}` or `${{NAME:-default}}`)"
            ));
        }
        match (
            env(name).filter(|v| !v.is_empty() || default.is_none()),
            default,
        ) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => {
                return Err(format!(
                    "environment variable `{name}` is not set (set it, or give a default with `${{{name}:-default}}`)"
                ));
            }
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Most nodes a document may hold once its aliases are expanded. A spec file has hundreds;
/// a "billion laughs" file (anchors of aliases of anchors…) has billions, and would take
/// every byte of memory to expand.
pub const MAX_NODES: usize = 100_000;
/// Deepest nesting of lists and mappings, aliases expanded (the tree is walked recursively).
pub const MAX_DEPTH: usize = 128;

/// Parses one YAML document. An empty file is an empty mapping. Aliases are expanded, within
/// [`MAX_NODES`] and [`MAX_DEPTH`]: a document beyond either is an error at the node that
/// crosses the limit.
pub fn parse(text: &str) -> Result<Node, SyntaxError> {
    let mut events = Vec::new();
    for ev in Parser::new_from_str(text) {
        match ev {
            Ok((ev, span)) => events.push((
                ev,
                Loc {
                    line: span.start.line(),
                    col: span.start.col() + 1,
                },
            )),
            Err(e) => {
                return Err(SyntaxError {
                    loc: Loc {
                        line: e.marker().line(),
                        col: e.marker().col() + 1,
                    },
                    message: format!("invalid YAML: {}", e.info()),
                });
            }
        }
    }
    let mut builder = Builder {
        events: events.into_iter().peekable(),
        anchors: Vec::new(),
        nodes: 0,
    };
    builder.document()
}

struct Builder<'a, I: Iterator<Item = (Event<'a>, Loc)>> {
    events: std::iter::Peekable<I>,
    /// Anchor id → its node, how many nodes it holds and how deep it nests.
    anchors: Vec<(usize, Anchored)>,
    /// Nodes of the tree so far, aliases expanded.
    nodes: usize,
}

struct Anchored {
    node: Node,
    size: usize,
    height: usize,
}

/// Nesting levels of `node` (a scalar is 1).
fn height(node: &Node) -> usize {
    match node {
        Node::Scalar { .. } => 1,
        Node::Seq { items, .. } => 1 + items.iter().map(height).max().unwrap_or(0),
        Node::Map { entries, .. } => 1 + entries.iter().map(|(_, n)| height(n)).max().unwrap_or(0),
    }
}

impl<'a, I: Iterator<Item = (Event<'a>, Loc)>> Builder<'a, I> {
    fn document(&mut self) -> Result<Node, SyntaxError> {
        let mut root = None;
        while let Some((ev, loc)) = self.events.next() {
            match ev {
                Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
                Event::StreamEnd => break,
                Event::DocumentStart(_) => {
                    if root.is_some() {
                        return Err(SyntaxError {
                            loc,
                            message: "only one YAML document per file is allowed".into(),
                        });
                    }
                    root = Some(self.node(1)?);
                }
                _ => {
                    return Err(SyntaxError {
                        loc,
                        message: "unexpected YAML event".into(),
                    });
                }
            }
        }
        Ok(root.unwrap_or(Node::Map {
            entries: Vec::new(),
            loc: Loc { line: 1, col: 1 },
        }))
    }

    /// Counts `size` more nodes of the tree at `loc`; refuses a tree beyond [`MAX_NODES`].
    fn count(&mut self, size: usize, loc: Loc) -> Result<(), SyntaxError> {
        self.nodes = self.nodes.saturating_add(size);
        if self.nodes > MAX_NODES {
            return Err(SyntaxError {
                loc,
                message: format!(
                    "this document expands to more than {MAX_NODES} YAML nodes (aliases \
                     repeating anchors that repeat anchors); write the values out or use fewer aliases"
                ),
            });
        }
        Ok(())
    }

    /// The node starting at the next event, `depth` levels down (the root is 1).
    fn node(&mut self, depth: usize) -> Result<Node, SyntaxError> {
        let Some((ev, loc)) = self.events.next() else {
            return Err(SyntaxError {
                loc: Loc::default(),
                message: "unexpected end of YAML".into(),
            });
        };
        let too_deep = |loc| SyntaxError {
            loc,
            message: format!("lists and mappings nest deeper than {MAX_DEPTH} levels"),
        };
        if depth > MAX_DEPTH {
            return Err(too_deep(loc));
        }
        let before = self.nodes;
        if !matches!(ev, Event::Alias(_)) {
            self.count(1, loc)?;
        }
        let (node, anchor) = match ev {
            Event::Scalar(value, style, anchor, _) => {
                let quoted = !matches!(style, ScalarStyle::Plain);
                (
                    Node::Scalar {
                        value: Cow::into_owned(value),
                        quoted,
                        loc,
                    },
                    anchor,
                )
            }
            Event::SequenceStart(anchor, _) => {
                let mut items = Vec::new();
                while !matches!(self.events.peek(), Some((Event::SequenceEnd, _)) | None) {
                    items.push(self.node(depth + 1)?);
                }
                self.events.next();
                (Node::Seq { items, loc }, anchor)
            }
            Event::MappingStart(anchor, _) => {
                let mut entries: Vec<(Key, Node)> = Vec::new();
                while !matches!(self.events.peek(), Some((Event::MappingEnd, _)) | None) {
                    let key = match self.node(depth + 1)? {
                        Node::Scalar { value, loc, .. } => Key { name: value, loc },
                        other => {
                            return Err(SyntaxError {
                                loc: other.loc(),
                                message: "mapping keys must be plain strings".into(),
                            });
                        }
                    };
                    if entries.iter().any(|(k, _)| k.name == key.name) {
                        return Err(SyntaxError {
                            loc: key.loc,
                            message: format!("duplicate key `{}`", key.name),
                        });
                    }
                    let value = self.node(depth + 1)?;
                    entries.push((key, value));
                }
                self.events.next();
                (Node::Map { entries, loc }, anchor)
            }
            Event::Alias(id) => {
                let Some(i) = self.anchors.iter().rposition(|(a, _)| *a == id) else {
                    return Err(SyntaxError {
                        loc,
                        message: "alias to an unknown anchor".into(),
                    });
                };
                let (size, h) = (self.anchors[i].1.size, self.anchors[i].1.height);
                // Counted before it is copied: the copies are what a bomb multiplies.
                self.count(size, loc)?;
                if depth + h - 1 > MAX_DEPTH {
                    return Err(too_deep(loc));
                }
                return Ok(self.anchors[i].1.node.clone());
            }
            _ => {
                return Err(SyntaxError {
                    loc,
                    message: "unexpected YAML event".into(),
                });
            }
        };
        if anchor > 0 {
            self.anchors.push((
                anchor,
                Anchored {
                    size: self.nodes - before,
                    height: height(&node),
                    node: node.clone(),
                },
            ));
        }
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        (name == "HOME_DIR").then(|| "/home/x".to_string())
    }

    #[test]
    fn locations_are_one_based() {
        let n = parse("name: clicks\nviews:\n  - name: a\n").unwrap();
        let Node::Map { entries, .. } = &n else {
            panic!("not a map")
        };
        assert_eq!(entries[0].0.loc, Loc { line: 1, col: 1 });
        assert_eq!(entries[0].1.loc(), Loc { line: 1, col: 7 });
        let views = n.get("views").unwrap();
        let Node::Seq { items, .. } = views else {
            panic!("not a seq")
        };
        assert_eq!(
            items[0].get("name").unwrap().loc(),
            Loc { line: 3, col: 11 }
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        let err = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(err.loc.line >= 1, "{err:?}");
        assert!(err.message.starts_with("invalid YAML"), "{err:?}");
        let dup = parse("a: 1\na: 2\n").unwrap_err();
        assert_eq!(dup.loc, Loc { line: 2, col: 1 });
    }

    #[test]
    fn interpolation() {
        assert_eq!(interpolate("${HOME_DIR}/x", &env).unwrap(), "/home/x/x");
        assert_eq!(interpolate("${NOPE:-dflt}", &env).unwrap(), "dflt");
        assert_eq!(interpolate("${NOPE:-}", &env).unwrap(), "");
        assert_eq!(interpolate("$${HOME_DIR}", &env).unwrap(), "${HOME_DIR}");
        assert!(
            interpolate("${NOPE}", &env)
                .unwrap_err()
                .contains("`NOPE` is not set")
        );
        assert!(interpolate("${oops", &env).is_err());
    }

    /// `levels` anchors, each a list of ten aliases of the previous one: 10^levels leaves.
    pub(crate) fn alias_bomb(levels: usize) -> String {
        let mut s = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..=levels {
            let p = format!("*a{}", i - 1);
            s.push_str(&format!("a{i}: &a{i} [{}]\n", vec![p; 10].join(", ")));
        }
        s
    }

    #[test]
    fn an_alias_bomb_is_refused_where_it_goes_off() {
        let started = std::time::Instant::now();
        for levels in [6, 9] {
            let err = parse(&alias_bomb(levels)).unwrap_err();
            assert!(
                err.message.contains("more than 100000 YAML nodes"),
                "{err:?}"
            );
            // a0..a3 hold 11 + 111 + 1111 + 11111 nodes; a4's aliases cross the limit.
            assert_eq!(err.loc.line, 5, "{err:?}");
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // Aliases as spec files use them stay fine.
        let n = parse("base: &b {x: 1, y: [1, 2]}\nc: *b\nd: *b\n").unwrap();
        assert_eq!(n.get("d"), n.get("base"));
        assert!(parse(&alias_bomb(3)).is_ok());
    }

    #[test]
    fn nesting_is_bounded_even_through_aliases() {
        let deep = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
        let err = parse(&deep).unwrap_err();
        assert!(err.message.contains("deeper than 128"), "{err:?}");
        assert!(parse(&format!("{}{}", "[".repeat(100), "]".repeat(100))).is_ok());
        // 70 levels under an anchor, placed 70 levels down again by an alias.
        let inner = format!("{}{}", "[".repeat(70), "]".repeat(70));
        let text = format!("a: &a {inner}\nb: {}*a{}\n", "[".repeat(70), "]".repeat(70));
        let err = parse(&text).unwrap_err();
        assert!(err.message.contains("deeper than 128"), "{err:?}");
        assert_eq!(err.loc.line, 2, "{err:?}");
    }

    #[test]
    fn quoted_scalars_stay_strings_and_empty_file_is_a_map() {
        let n = parse("a: \"1\"\nb: 1\n").unwrap();
        assert!(matches!(
            n.get("a"),
            Some(Node::Scalar { quoted: true, .. })
        ));
        assert!(matches!(parse("").unwrap(), Node::Map { .. }));
    }
}
