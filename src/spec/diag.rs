//! Located problems in a project's YAML: `FILE:LINE:COL: message`.

use std::fmt;
use std::path::{Path, PathBuf};

use super::yaml::Loc;

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Diagnostic {
    /// The file as the user should see it: relative to the project directory when inside it.
    pub file: PathBuf,
    pub loc: Loc,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.loc.line,
            self.loc.col,
            self.message
        )
    }
}

/// Collects every problem of one file; validation never stops at the first.
#[derive(Debug)]
pub struct Diagnostics {
    file: PathBuf,
    pub(crate) items: Vec<Diagnostic>,
}

impl Diagnostics {
    pub fn new(file: &Path) -> Self {
        Diagnostics {
            file: file.to_path_buf(),
            items: Vec::new(),
        }
    }

    pub fn error(&mut self, loc: Loc, message: impl Into<String>) {
        self.items.push(Diagnostic {
            file: self.file.clone(),
            loc,
            message: message.into(),
        });
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn into_vec(self) -> Vec<Diagnostic> {
        self.items
    }
}

/// The spec failed validation: every problem, ordered by file and position.
#[derive(Debug, thiserror::Error)]
#[error("{}", render(.0))]
pub struct SpecErrors(pub Vec<Diagnostic>);

fn render(items: &[Diagnostic]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// ` (did you mean `x`?)` when one of `candidates` is close to `word`, else "".
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    let best = candidates
        .into_iter()
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3) && *d < c.len().max(word.len()))
        .min_by_key(|(d, _)| *d);
    match best {
        Some((_, c)) => format!(" (did you mean `{c}`?)"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions() {
        assert_eq!(
            did_you_mean("metricz", ["name", "metrics", "window"]),
            " (did you mean `metrics`?)"
        );
        assert_eq!(
            did_you_mean("cnt", ["count", "sum"]),
            " (did you mean `count`?)"
        );
        assert_eq!(did_you_mean("zzzzzz", ["count", "sum"]), "");
    }
}
