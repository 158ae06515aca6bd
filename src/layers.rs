//! The layer rule of src/lib.rs, checked: every path into the crate (`crate::…`, `$crate::…`,
//! and `super::…` that climbs to the crate root) in every file under src/ names its own
//! top-level module, a layer below it, or a leaf. Leaves import no other module of the crate.
//! No file is exempt; a module missing from the order below fails too, so the order stays
//! complete. Comments and string literals are not code and are skipped.

use std::path::Path;

/// The documented order, lowest first (src/lib.rs): a module may import only those before it.
const ORDER: &[&str] = &[
    "spec",
    "plan",
    "lake",
    "state",
    "speed",
    "batch",
    "sources",
    "serving",
    "orchestration",
    "cli",
];

/// Beside the layers, usable by all, importing none: time helpers, durable local files, the
/// metric primitives — and, for tests only, the fuzz harness and this check.
const LEAVES: &[&str] = &["clock", "fsync", "telemetry", "fuzz", "layers"];

/// Where a file sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// src/lib.rs and src/main.rs: they declare the modules and sit above all of them.
    Root,
    Layer(usize),
    Leaf,
}

fn place(module: &str) -> Option<Place> {
    if LEAVES.contains(&module) {
        return Some(Place::Leaf);
    }
    ORDER.iter().position(|m| *m == module).map(Place::Layer)
}

/// The file `rel` (relative to src/, `/`-separated): its top-level module (None: the crate
/// root) and its module depth (src/a.rs and src/a/mod.rs: 1; src/a/b.rs: 2).
fn module_of(rel: &str) -> (Option<String>, usize) {
    let parts: Vec<&str> = rel.split('/').collect();
    if parts.len() == 1 && matches!(parts[0], "lib.rs" | "main.rs") {
        return (None, 0);
    }
    let top = parts[0].trim_end_matches(".rs").to_string();
    let last = parts[parts.len() - 1];
    let depth = if last == "mod.rs" {
        parts.len() - 1
    } else {
        parts.len()
    };
    (Some(top), depth)
}

/// `text` with comments, string and character literals blanked out (newlines kept, so line
/// numbers stay).
fn code_only(text: &str) -> Vec<u8> {
    let b = text.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for c in &mut out[from..to] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    };
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < b.len() {
        let prev_ident = i > 0 && ident(b[i - 1]);
        if b[i..].starts_with(b"//") {
            let end = b[i..]
                .iter()
                .position(|c| *c == b'\n')
                .map_or(b.len(), |n| i + n);
            blank(&mut out, i, end);
            i = end;
        } else if b[i..].starts_with(b"/*") {
            let (mut depth, mut j) = (0usize, i);
            while j < b.len() {
                if b[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if b[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j);
            i = j;
        } else if let Some(body) = raw_string_body(b, i).filter(|_| !prev_ident) {
            // Raw string: r"…", r#"…"#, br#"…"#; `body` is where its text starts.
            let hashes = b[..body - 1]
                .iter()
                .rev()
                .take_while(|c| **c == b'#')
                .count();
            let mut close = vec![b'"'];
            close.extend(std::iter::repeat_n(b'#', hashes));
            let end = b[body..]
                .windows(close.len())
                .position(|w| w == close.as_slice())
                .map_or(b.len(), |n| body + n + close.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(b.len());
            blank(&mut out, i, end);
            i = end;
        } else if b[i] == b'\''
            && (!prev_ident || (b[i - 1] == b'b' && (i < 2 || !ident(b[i - 2]))))
        {
            // A character literal ('a', '\n', '\u{1}', '"', b'x'); a lifetime has no closing
            // quote.
            let end = if b.get(i + 1) == Some(&b'\\') {
                b.get(i + 3..)
                    .and_then(|rest| rest.iter().position(|c| *c == b'\''))
                    .map(|n| i + 3 + n + 1)
            } else {
                let len = text[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + len) == Some(&b'\'')).then_some(i + 2 + len)
            };
            match end {
                Some(end) => {
                    blank(&mut out, i, end);
                    i = end;
                }
                None => i += 1,
            }
        } else {
            i += 1;
        }
    }
    out
}

/// Where the text of a raw string starting at `i` (`r"`, `r#"`, `br##"`, …) begins; `None`
/// when none starts there.
fn raw_string_body(b: &[u8], i: usize) -> Option<usize> {
    let k = if b[i..].starts_with(b"br") {
        i + 2
    } else if b[i] == b'r' {
        i + 1
    } else {
        return None;
    };
    let hashes = b[k..].iter().take_while(|c| **c == b'#').count();
    (b.get(k + hashes) == Some(&b'"')).then_some(k + hashes + 1)
}

/// One import of another top-level module.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Import {
    line: usize,
    module: String,
}

/// The first segments of the path tree starting at `at` (after `crate::` or the `super::`
/// that reaches the root): `x` of `x::…`, or each item's first segment of `{a::…, b, …}`.
fn first_segments(code: &[u8], at: usize) -> Vec<(usize, String)> {
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let skip_ws = |mut i: usize| {
        while i < code.len() && code[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    let word = |i: usize| -> Option<(usize, String)> {
        let end = code[i..]
            .iter()
            .position(|c| !ident(*c))
            .map_or(code.len(), |n| i + n);
        (end > i).then(|| (i, String::from_utf8_lossy(&code[i..end]).into_owned()))
    };
    let i = skip_ws(at);
    if code.get(i) != Some(&b'{') {
        return word(i).into_iter().collect();
    }
    // Items of the group at nesting depth 1.
    let mut out = Vec::new();
    let (mut depth, mut j, mut item_start) = (0usize, i, true);
    while j < code.len() {
        match code[j] {
            b'{' => {
                depth += 1;
                item_start = depth == 1;
            }
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    break;
                }
            }
            b',' if depth == 1 => item_start = true,
            c if item_start && depth == 1 && !c.is_ascii_whitespace() => {
                item_start = false;
                if let Some(w) = word(j) {
                    out.push(w);
                }
            }
            _ => {}
        }
        j += 1;
    }
    out
}

/// Every top-level module the code of file `rel` names.
fn imports(rel: &str, text: &str) -> Vec<Import> {
    let code = code_only(text);
    let (_, base_depth) = module_of(rel);
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let line_of = |pos: usize| code[..pos].iter().filter(|c| **c == b'\n').count() + 1;
    let at_word = |i: usize, w: &[u8]| {
        code[i..].starts_with(w)
            && (i == 0 || !ident(code[i - 1]))
            && code.get(i + w.len()).is_none_or(|c| !ident(*c))
    };
    // Inline modules open at brace depths: `mod tests {` adds a level for `super::`.
    let mut out = Vec::new();
    let mut brace = 0usize;
    let mut inline_mods: Vec<usize> = Vec::new();
    let mut pending_mod = false;
    let mut i = 0;
    while i < code.len() {
        let c = code[i];
        if c == b'{' {
            brace += 1;
            if pending_mod {
                inline_mods.push(brace);
                pending_mod = false;
            }
        } else if c == b'}' {
            if inline_mods.last() == Some(&brace) {
                inline_mods.pop();
            }
            brace = brace.saturating_sub(1);
        } else if c == b';' {
            pending_mod = false;
        } else if at_word(i, b"mod") {
            pending_mod = true;
            i += 3;
            continue;
        } else if at_word(i, b"crate") && code[i + 5..].starts_with(b"::") {
            for (pos, module) in first_segments(&code, i + 7) {
                out.push(Import {
                    line: line_of(pos),
                    module,
                });
            }
            i += 7;
            continue;
        } else if at_word(i, b"super") {
            // A chain of `super::` as long as the module depth reaches the crate root.
            let mut j = i;
            let mut ups = 0;
            while at_word(j, b"super") && code[j + 5..].starts_with(b"::") {
                ups += 1;
                j += 7;
            }
            if ups > 0 && ups >= base_depth + inline_mods.len() {
                for (pos, module) in first_segments(&code, j) {
                    out.push(Import {
                        line: line_of(pos),
                        module,
                    });
                }
            }
            i = j.max(i + 5);
            continue;
        }
        i += 1;
    }
    out
}

/// What is wrong with the imports of file `rel` (relative to src/), as `src/FILE:LINE: …`.
fn violations(rel: &str, text: &str) -> Vec<String> {
    let (module, _) = module_of(rel);
    let from = match &module {
        None => Place::Root,
        Some(m) => match place(m) {
            Some(p) => p,
            None => {
                return vec![format!(
                    "src/{rel}:1: module `{m}` is in neither the layer order nor the leaves of src/lib.rs"
                )];
            }
        },
    };
    let mut out = Vec::new();
    for Import { line, module: to } in imports(rel, text) {
        if Some(&to) == module.as_ref() || matches!(to.as_str(), "self" | "super" | "crate") {
            continue;
        }
        let Some(target) = place(&to) else {
            out.push(format!(
                "src/{rel}:{line}: imports `{to}`, in neither the layer order nor the leaves"
            ));
            continue;
        };
        let ok = match (from, target) {
            (Place::Root, _) => true,
            (Place::Leaf, _) => false,
            (Place::Layer(_), Place::Leaf) => true,
            (Place::Layer(a), Place::Layer(b)) => b < a,
            (Place::Layer(_), Place::Root) => false,
        };
        if !ok {
            let me = module.as_deref().unwrap_or("the crate root");
            let why = match from {
                Place::Leaf => "a leaf imports no module of the crate".to_string(),
                _ => format!("`{to}` is a layer above `{me}` ({})", ORDER.join(" → ")),
            };
            out.push(format!("src/{rel}:{line}: `{me}` imports `{to}`: {why}"));
        }
    }
    out
}

/// Every `.rs` file under `dir`, relative to `root`, `/`-separated, sorted.
fn rust_files(root: &Path, dir: &Path, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(root, &path, out);
        } else if path.extension().is_some_and(|x| x == "rs") {
            let rel = path.strip_prefix(root).unwrap();
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            out.push(parts.join("/"));
        }
    }
    out.sort();
}

#[test]
fn every_module_imports_only_layers_below_it_and_leaves() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &src, &mut files);
    assert!(files.len() > 50, "found only {files:?}");
    let mut found = Vec::new();
    let mut seen = 0;
    for rel in &files {
        let text = std::fs::read_to_string(src.join(rel)).unwrap();
        seen += imports(rel, &text).len();
        found.extend(violations(rel, &text));
    }
    // The scan itself works: the crate is full of imports.
    assert!(seen > 100, "only {seen} imports found");
    assert!(
        found.is_empty(),
        "imports against the layer order of src/lib.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_check_names_each_upward_import_with_its_file_and_line() {
    let text = "use std::sync::Arc;\n\
                use crate::plan::Plan;\n\
                use crate::serving::time::now_ms;\n\
                use crate::{\n    lake::Lake,\n    batch::{self, scan},\n    clock,\n};\n\
                fn f() { crate::sources::spawn(); crate::state::x(); }\n";
    assert_eq!(
        violations("speed/runtime.rs", text),
        [
            "src/speed/runtime.rs:3: `speed` imports `serving`: `serving` is a layer above `speed` (spec → plan → lake → state → speed → batch → sources → serving → orchestration → cli)",
            "src/speed/runtime.rs:6: `speed` imports `batch`: `batch` is a layer above `speed` (spec → plan → lake → state → speed → batch → sources → serving → orchestration → cli)",
            "src/speed/runtime.rs:9: `speed` imports `sources`: `sources` is a layer above `speed` (spec → plan → lake → state → speed → batch → sources → serving → orchestration → cli)",
        ]
    );
    // Down the order, its own module and leaves: fine, from any file of the module.
    let down = "use crate::{spec::Pipeline, plan, clock::now_ms, telemetry};\nuse super::log;\n";
    assert!(violations("speed/runtime.rs", down).is_empty());
    assert!(violations("cli/serve.rs", "use crate::serving::app::App;").is_empty());
    assert!(violations("lib.rs", "pub use crate::cli::main;").is_empty());
}

#[test]
fn the_check_follows_super_to_the_root_and_skips_comments_and_strings() {
    // `super::super` from a second-level file is the crate root.
    let up = "use super::super::orchestration::Orchestrator;\nuse super::log;\n";
    assert_eq!(violations("speed/door.rs", up).len(), 1);
    // From a top-level file one `super` is the root; inside `mod tests` it is the file.
    assert_eq!(violations("lake.rs", "use super::serving::App;").len(), 1);
    let tests = "#[cfg(test)]\nmod tests {\n    use super::*;\n    use super::super::cli;\n}\n";
    assert_eq!(
        violations("lake.rs", tests),
        [
            "src/lake.rs:4: `lake` imports `cli`: `cli` is a layer above `lake` (spec → plan → lake → state → speed → batch → sources → serving → orchestration → cli)"
        ]
    );
    let quiet = "// use crate::cli;\n/* crate::cli /* nested */ crate::cli */\n\
                 const A: &str = \"crate::cli\";\nconst B: &str = r#\"crate::cli \"x\"\"#;\n\
                 const C: char = '\"'; fn f<'a>(x: &'a str) {}\n$crate::spec::x!();\n";
    assert!(violations("plan/mod.rs", quiet).is_empty());
    assert_eq!(
        violations("plan/mod.rs", "const C: char = '\"';\nuse crate::cli;").len(),
        1
    );
}

#[test]
fn leaves_import_nothing_and_every_module_is_placed() {
    assert_eq!(
        violations("clock.rs", "use crate::spec::duration;"),
        ["src/clock.rs:1: `clock` imports `spec`: a leaf imports no module of the crate"]
    );
    assert_eq!(
        violations("newthing/mod.rs", "use crate::spec;"),
        [
            "src/newthing/mod.rs:1: module `newthing` is in neither the layer order nor the leaves of src/lib.rs"
        ]
    );
    assert_eq!(
        violations("cli/mod.rs", "use crate::elsewhere::x;"),
        ["src/cli/mod.rs:1: imports `elsewhere`, in neither the layer order nor the leaves"]
    );
}
