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

/// Parses one YAML document. An empty file is an empty mapping.
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
    };
    builder.document()
}

struct Builder<'a, I: Iterator<Item = (Event<'a>, Loc)>> {
    events: std::iter::Peekable<I>,
    anchors: Vec<(usize, Node)>,
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
                    root = Some(self.node()?);
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

    fn node(&mut self) -> Result<Node, SyntaxError> {
        let Some((ev, loc)) = self.events.next() else {
            return Err(SyntaxError {
                loc: Loc::default(),
                message: "unexpected end of YAML".into(),
            });
        };
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
                    items.push(self.node()?);
                }
                self.events.next();
                (Node::Seq { items, loc }, anchor)
            }
            Event::MappingStart(anchor, _) => {
                let mut entries: Vec<(Key, Node)> = Vec::new();
                while !matches!(self.events.peek(), Some((Event::MappingEnd, _)) | None) {
                    let key = match self.node()? {
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
                    let value = self.node()?;
                    entries.push((key, value));
                }
                self.events.next();
                (Node::Map { entries, loc }, anchor)
            }
            Event::Alias(id) => {
                let found = self
                    .anchors
                    .iter()
                    .rev()
                    .find(|(a, _)| *a == id)
                    .map(|(_, n)| n.clone());
                return found.ok_or(SyntaxError {
                    loc,
                    message: "alias to an unknown anchor".into(),
                });
            }
            _ => {
                return Err(SyntaxError {
                    loc,
                    message: "unexpected YAML event".into(),
                });
            }
        };
        if anchor > 0 {
            self.anchors.push((anchor, node.clone()));
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
