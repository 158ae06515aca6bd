//! Bounded fuzzing inside `cargo test`: every parser that reads outside input — the NDJSON and
//! CSV decoders, the event-time parser, the spec reader (pipelines, workflows, `lambda.yaml`)
//! and the view-query URL parameters — is fed the seeds under `tests/fuzz/corpus/TARGET/` and
//! a few hundred mutations of them (bit flips, inserted tokens, cuts, splices), then checked
//! for panics and for its invariants (a decoder accounts for every record and gives every
//! rejection a reason; every spec problem is located).
//!
//! This file is the harness only, a leaf that imports nothing of the crate; each target lives
//! with the layer it fuzzes (`plan::fuzz`, `spec::fuzz`, `serving::fuzz`), so no test reaches
//! up the layers.
//!
//! A failing case is shrunk by proptest and printed; add the input to the corpus as a file (the
//! seeds are checked as they are before any mutation, so it is replayed on every run), then
//! fix it. Proptest's own
//! failure files are off: the corpus is the regression list. The whole pass takes a few
//! seconds; `LAMBDA_FUZZ_CASES=N` runs N cases per target instead (a longer local session).

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Cases per target in a `cargo test` run, unless `LAMBDA_FUZZ_CASES` says otherwise.
pub(crate) const DEFAULT_CASES: u32 = 256;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/corpus")
        .join(target)
}

/// Every seed of `target`, sorted by file name.
fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = corpus_dir(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "empty corpus {}", dir.display());
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// Fragments worth inserting: the syntax of every format read here, and edge values.
const TOKENS: &[&[u8]] = &[
    b"\"",
    b"\"\"",
    b",",
    b"\n",
    b"\r\n",
    b"\r",
    b" ",
    b"\t",
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b"null",
    b"true",
    b"\\u0000",
    b"\\ud800",
    b"\\",
    b"\xEF\xBB\xBF",
    b"\xff",
    b"\xc3",
    b"-",
    b"+",
    b"e308",
    b"9223372036854775808",
    b"-9223372036854775809",
    b"1e400",
    b"0.5",
    b"Z",
    b"+14:00",
    b"T",
    b"2024-02-29T23:59:60Z",
    b"9999-12-31T23:59:59.999Z",
    b"&",
    b"=",
    b"%",
    b"%ff",
    b"*a",
    b"&a ",
    b"<<: *a",
    b"- ",
    b": ",
    b"${",
    b"${X:-",
    b"}",
    b"#",
    b"!!str ",
    b"---\n",
    b"...\n",
    b"|\n",
    b">-\n",
    b"'",
    b"now",
    b"-1h",
    b"+106751991167d",
    b"ms",
];

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR a byte (position modulo the length).
    Flip(usize, u8),
    Insert(usize, usize),
    InsertByte(usize, u8),
    Delete(usize, usize),
    /// Copy a range of another seed here.
    Splice(usize, usize, usize, usize),
    /// Repeat a range (long lines, deep nesting).
    Repeat(usize, usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(a, b)| Mutation::Flip(a, b)),
        (any::<usize>(), 0..TOKENS.len()).prop_map(|(a, t)| Mutation::Insert(a, t)),
        (any::<usize>(), any::<u8>()).prop_map(|(a, b)| Mutation::InsertByte(a, b)),
        (any::<usize>(), 1usize..16).prop_map(|(a, n)| Mutation::Delete(a, n)),
        (any::<usize>(), any::<usize>(), any::<usize>(), 1usize..64)
            .prop_map(|(a, s, f, n)| Mutation::Splice(a, s, f, n)),
        (any::<usize>(), 1usize..16, 1usize..64).prop_map(|(a, n, k)| Mutation::Repeat(a, n, k)),
    ]
}

fn apply(seeds: &[Vec<u8>], seed: usize, mutations: &[Mutation]) -> Vec<u8> {
    let mut b = seeds[seed].clone();
    let at = |b: &Vec<u8>, i: usize| if b.is_empty() { 0 } else { i % (b.len() + 1) };
    for m in mutations {
        match *m {
            Mutation::Flip(i, x) if !b.is_empty() => {
                let i = i % b.len();
                b[i] ^= x;
            }
            Mutation::Flip(..) => {}
            Mutation::Insert(i, t) => {
                let i = at(&b, i);
                b.splice(i..i, TOKENS[t].iter().copied());
            }
            Mutation::InsertByte(i, x) => {
                let i = at(&b, i);
                b.insert(i, x);
            }
            Mutation::Delete(i, n) => {
                let i = at(&b, i);
                let end = (i + n).min(b.len());
                b.drain(i..end);
            }
            Mutation::Splice(i, s, from, n) => {
                let other = &seeds[s % seeds.len()];
                let from = if other.is_empty() {
                    0
                } else {
                    from % other.len()
                };
                let part = other[from..(from + n).min(other.len())].to_vec();
                let i = at(&b, i);
                b.splice(i..i, part);
            }
            Mutation::Repeat(i, n, k) => {
                let i = at(&b, i);
                let part = b[i..(i + n).min(b.len())].to_vec();
                for _ in 0..k {
                    b.splice(i..i, part.iter().copied());
                }
            }
        }
    }
    b
}

/// Runs `check` on every seed of `target`, then on mutations of them.
pub(crate) fn fuzz(target: &str, cases: u32, check: impl Fn(&[u8])) {
    let seeds = corpus(target);
    for s in &seeds {
        check(s);
    }
    let cases = std::env::var("LAMBDA_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2048,
        ..Config::default()
    });
    let n = seeds.len();
    let strategy = (0..n, proptest::collection::vec(mutation(), 1..8))
        .prop_map(move |(s, m)| apply(&seeds, s, &m));
    let result = runner.run(&strategy, |input| {
        // A panic is what we are looking for; proptest catches it, shrinks the input and
        // reports it with the message.
        check(&input);
        Ok(())
    });
    if let Err(e) = result {
        panic!(
            "fuzz target `{target}` failed: {e}\n(add the minimal input to {} and fix it)",
            corpus_dir(target).display()
        );
    }
}
