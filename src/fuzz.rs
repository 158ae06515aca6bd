//! Bounded fuzzing inside `cargo test`: every parser that reads outside input — the NDJSON and
//! CSV decoders, the event-time parser, the spec reader (pipelines, workflows, `lambda.yaml`)
//! and the view-query URL parameters — is fed the seeds under `tests/fuzz/corpus/TARGET/` and
//! a few hundred mutations of them (bit flips, inserted tokens, cuts, splices), then checked
//! for panics and for its invariants (a decoder accounts for every record and gives every
//! rejection a reason; every spec problem is located).
//!
//! A failing case is shrunk by proptest and printed; add the input to the corpus as a file (the
//! seeds are checked as they are before any mutation, so it is replayed on every run), then
//! fix it. Proptest's own
//! failure files are off: the corpus is the regression list. The whole pass takes a few
//! seconds; `LAMBDA_FUZZ_CASES=N` runs N cases per target instead (a longer local session).

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

use crate::plan::decode::timestamp;
use crate::plan::{Decoded, Plan};
use crate::serving::query::ViewQuery;
use crate::spec::diag::{Diagnostic, Diagnostics};
use crate::spec::{Format, Pipeline, pipeline, settings, workflow, yaml};

/// Cases per target in a `cargo test` run, unless `LAMBDA_FUZZ_CASES` says otherwise.
const DEFAULT_CASES: u32 = 256;

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
fn fuzz(target: &str, cases: u32, check: impl Fn(&[u8])) {
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

const FUZZ_PIPELINE: &str = r#"
name: fuzz
source: {type: http}
format: FORMAT
schema:
  ts: timestamp
  id: string
  page: string
  n: int
  x: float
  ok: bool
event_time: ts
event_id: id
filter: "n IS NULL OR n >= 0"
columns:
  section: "split_part(page, '/', 2)"
views:
  - name: by_page
    group_by: [page]
    window: 1m
    metrics:
      events: count()
      total: sum(x)
      slowest: max(x)
  - name: sections
    group_by: [section]
    window: {session: {gap: 5m}}
    metrics:
      events: count()
      first_page: first(page)
"#;

fn plan(format: Format) -> Plan {
    let text = FUZZ_PIPELINE.replace(
        "FORMAT",
        match format {
            Format::Json => "json",
            Format::Csv => "csv",
        },
    );
    let node = yaml::parse(&text).unwrap();
    let mut d = Diagnostics::new(Path::new("pipelines/fuzz.yaml"));
    let p: Pipeline = pipeline::build(&mut d, &node, Path::new("pipelines/fuzz.yaml"))
        .unwrap_or_else(|| panic!("{:?}", d.into_vec()));
    Plan::compile(&p).unwrap()
}

fn blank(line: &[u8]) -> bool {
    line.iter().all(|c| matches!(c, b' ' | b'\t' | b'\r'))
}

/// What holds for any decoder output: the schema's columns, required values present, every
/// rejection with a reason and a line of the input, in input order; the accepted events go
/// through the plan's partials without a failure.
fn check_decoded(plan: &Plan, input: &[u8], d: &Decoded) {
    let names: Vec<&str> = d
        .events
        .get_column_names()
        .iter()
        .map(|c| c.as_str())
        .collect();
    assert_eq!(names, ["ts", "id", "page", "n", "x", "ok"]);
    assert_eq!(d.events.column("ts").unwrap().null_count(), 0);
    let ids = d.events.column("id").unwrap().str().unwrap();
    assert!(ids.iter().all(|id| id.is_some_and(|id| !id.is_empty())));
    let lines = input.split(|b| *b == b'\n').count();
    let mut last = 0;
    for r in &d.rejected {
        assert!(!r.reason.trim().is_empty(), "{r:?}");
        assert!(r.line > last && r.line <= lines, "{r:?} after line {last}");
        last = r.line;
    }
    if d.events.height() > 0 {
        crate::speed::runtime::partials_of(plan, &d.events).unwrap();
        plan.filter_mask(&d.events).unwrap();
    }
}

#[test]
fn fuzz_ndjson_decoder() {
    let plan = plan(Format::Json);
    fuzz("ndjson", DEFAULT_CASES, |input| {
        let d = plan.decode(input);
        check_decoded(&plan, input, &d);
        // Every line that is not blank is one event, accepted or rejected.
        let body = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
        let records = body.split(|b| *b == b'\n').filter(|l| !blank(l)).count();
        assert_eq!(
            d.events.height() + d.rejected.len(),
            records,
            "{:?}",
            d.rejected
        );
    });
}

/// Thin on purpose: the CSV decoder's record splitting is being reworked; this calls only its
/// public entry point.
#[test]
fn fuzz_csv_decoder() {
    let plan = plan(Format::Csv);
    fuzz("csv", DEFAULT_CASES, |input| {
        let d = plan.decode(input);
        check_decoded(&plan, input, &d);
        let body = input.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(input);
        let records = body.split(|b| *b == b'\n').filter(|l| !blank(l)).count();
        let decided = d.events.height() + d.rejected.len();
        // One line per record without quotes; the header is no event unless it is rejected.
        if !body.contains(&b'"') {
            let header_rejected = d
                .rejected
                .first()
                .is_some_and(|r| r.reason.starts_with("invalid CSV header"));
            assert_eq!(
                decided,
                records.saturating_sub(1) + usize::from(header_rejected),
                "{:?}",
                d.rejected
            );
        } else {
            assert!(decided <= records, "{decided} of {records} records");
        }
    });
}

#[test]
fn fuzz_timestamp_parser() {
    fuzz("timestamp", DEFAULT_CASES * 4, |input| {
        let text = String::from_utf8_lossy(input);
        for s in [text.as_ref(), text.trim()] {
            let parsed = timestamp::parse(s);
            if let Some(ms) = parsed {
                assert!(timestamp::in_range(ms), "{s:?} → {ms}");
                // What it parsed, written back, reads the same.
                let written = crate::serving::time::format_ms(ms);
                assert_eq!(timestamp::parse(&written), Some(ms), "{s:?} → {written}");
            }
            let unsigned = s.strip_prefix('-').unwrap_or(s);
            if !unsigned.is_empty() && unsigned.bytes().all(|c| c.is_ascii_digit()) {
                let expected = s.parse::<i64>().ok().filter(|ms| timestamp::in_range(*ms));
                assert_eq!(parsed, expected, "{s:?}");
            }
        }
    });
}

/// The diagnostics reading `text` as each kind of spec file gives.
fn spec_diagnostics(text: &str) -> Vec<Diagnostic> {
    let node = match yaml::parse(text) {
        Ok(n) => n,
        Err(e) => {
            let mut d = Diagnostics::new(Path::new("x.yaml"));
            d.error(e.loc, e.message);
            return d.into_vec();
        }
    };
    let env = |name: &str| (name == "HOME").then(|| "/root".to_string());
    let mut interpolated = node;
    let mut d = Diagnostics::new(Path::new("x.yaml"));
    for (loc, message) in interpolated.interpolate(&env) {
        d.error(loc, message);
    }
    pipeline::build(&mut d, &interpolated, Path::new("pipelines/x.yaml"));
    workflow::build(
        &mut d,
        &interpolated,
        Path::new("workflows/x.yaml"),
        chrono_tz::UTC,
    );
    settings::build(&mut d, Some(&interpolated), Path::new("/project"));
    d.into_vec()
}

#[test]
fn fuzz_spec_reader() {
    fuzz("spec", DEFAULT_CASES, |input| {
        let text = String::from_utf8_lossy(input);
        let lines = text.split('\n').count();
        for diag in spec_diagnostics(&text) {
            assert!(
                diag.loc.line >= 1 && diag.loc.col >= 1 && diag.loc.line <= lines + 1,
                "not located: {diag}"
            );
            assert!(!diag.message.trim().is_empty(), "{diag}");
        }
    });
}

#[test]
fn fuzz_view_query_parameters() {
    const NOW: i64 = 1_763_719_200_000;
    fuzz("query", DEFAULT_CASES * 2, |input| {
        let (query, accept) = match input.iter().position(|b| *b == b'\n') {
            Some(i) => (&input[..i], Some(String::from_utf8_lossy(&input[i + 1..]))),
            None => (input, None),
        };
        let params: Vec<(String, String)> = url::form_urlencoded::parse(query)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let has = |key: &str| params.iter().any(|(k, _)| k == key);
        let (from, to) = (has("from"), has("to"));
        let reserved = ["from", "to", "format", "origin"];
        let filters = params
            .iter()
            .filter(|(k, _)| !reserved.contains(&k.as_str()))
            .count();
        match ViewQuery::from_params(params, NOW, accept.as_deref()) {
            Ok((q, _csv)) => {
                assert_eq!((q.from.is_some(), q.to.is_some()), (from, to));
                assert_eq!(q.filters.len(), filters);
            }
            Err(message) => assert!(!message.is_empty()),
        }
    });
}
