//! The plan against a deliberately naive model: plain loops over the events, written without
//! polars or any code of the plan, for every aggregate × window kind, on random events split
//! into random chunks.

use std::collections::HashSet;
use std::time::Duration;

use polars::prelude::*;
use proptest::prelude::*;

use super::{LookupSet, Plan, PlanError, quantile};
use crate::spec::pipeline::aggregate;
use crate::spec::{Archive, ColumnType, Format, Metric, Pipeline, Source, View, Window};

const TUMBLING: u64 = 100;
const HOP_SIZE: u64 = 300;
const HOP_EVERY: u64 = 100;
const GAP: u64 = 50;

/// `name: aggregate` of every metric under test, in the columns of [`schema`].
const METRICS: &[(&str, &str)] = &[
    ("c", "count()"),
    ("cx", "count(x)"),
    ("sx", "sum(x)"),
    ("sn", "sum(n)"),
    ("mnx", "min(x)"),
    ("mxs", "max(s)"),
    ("mnt", "min(ts)"),
    ("my", "max(y)"),
    ("ax", "avg(x)"),
    ("an", "avg(n)"),
    ("vx", "variance(x)"),
    ("sdn", "stddev(n)"),
    ("fs", "first(s)"),
    ("lb", "last(b)"),
    ("fx", "first(x)"),
    ("ln", "last(n)"),
    ("ds", "approx_count_distinct(s)"),
    ("dn", "approx_count_distinct(n)"),
    ("qx", "approx_quantile(x, 0.5)"),
    ("qn", "approx_quantile(n, 0.9)"),
];

fn schema() -> Vec<(String, ColumnType)> {
    [
        ("ts", ColumnType::Timestamp),
        ("k", ColumnType::String),
        ("x", ColumnType::Float),
        ("n", ColumnType::Int),
        ("s", ColumnType::String),
        ("b", ColumnType::Bool),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t))
    .collect()
}

fn view(name: &str, window: Window, keyed: bool) -> View {
    View {
        name: name.into(),
        group_by: if keyed { vec!["k".into()] } else { vec![] },
        window,
        metrics: METRICS
            .iter()
            .map(|(n, a)| Metric {
                name: n.to_string(),
                aggregate: aggregate(a, &[], false).expect("test aggregates parse"),
            })
            .collect(),
        sinks: Vec::new(),
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

pub(super) fn test_pipeline() -> Pipeline {
    Pipeline {
        name: "events".into(),
        description: None,
        file: "pipelines/events.yaml".into(),
        source: Source::Http,
        format: Format::Json,
        schema: schema(),
        paths: Default::default(),
        event_time: "ts".into(),
        event_id: None,
        dedupe_window: Duration::from_secs(86_400),
        partitions: 1,
        partition_key: None,
        buffer: None,
        filter: Some("n IS NULL OR n <> 7".into()),
        columns: vec![("y".into(), "x * 2".into())],
        lookups: vec![],
        archive: Archive {
            segment_rows: 1000,
            segment_age: Duration::from_secs(60),
        },
        views: vec![
            view("tumbling", Window::Tumbling { size: ms(TUMBLING) }, true),
            view(
                "hopping",
                Window::Hopping {
                    size: ms(HOP_SIZE),
                    every: ms(HOP_EVERY),
                },
                true,
            ),
            view("session", Window::Session { gap: ms(GAP) }, true),
            view("all", Window::All, true),
            view("all_unkeyed", Window::All, false),
            view("session_unkeyed", Window::Session { gap: ms(GAP) }, false),
            view(
                "tumbling_unkeyed",
                Window::Tumbling { size: ms(TUMBLING) },
                false,
            ),
            // Reads no column at all (not even event time): every event still counts.
            View {
                name: "count_unkeyed".into(),
                group_by: vec![],
                window: Window::All,
                metrics: vec![Metric {
                    name: "n".into(),
                    aggregate: aggregate("count()", &[], false).expect("count parses"),
                }],
                sinks: Vec::new(),
            },
        ],
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Ev {
    t: i64,
    k: Option<String>,
    x: Option<f64>,
    n: Option<i64>,
    s: Option<String>,
    b: Option<bool>,
}

fn ev_strategy() -> impl Strategy<Value = Ev> {
    (
        -300i64..700,
        prop::option::weighted(0.85, prop::sample::select(vec!["a", "b", "c"])),
        // Quarter steps keep float sums exact, so sums compare exactly across splits.
        prop::option::weighted(0.8, (-1600i32..1600).prop_map(|q| q as f64 / 4.0)),
        prop::option::weighted(0.8, -50i64..50),
        prop::option::weighted(
            0.8,
            prop::sample::select(vec!["p", "q", "r", "s", "t", "u", "é", "z"]),
        ),
        prop::option::weighted(0.8, any::<bool>()),
    )
        .prop_map(|(t, k, x, n, s, b)| Ev {
            t,
            k: k.map(String::from),
            x,
            n,
            s: s.map(String::from),
            b,
        })
}

/// Events as NDJSON, nulls written out or left out at random (`omit` bits).
fn ndjson(events: &[Ev], omit: u64) -> String {
    let mut out = String::new();
    for (i, e) in events.iter().enumerate() {
        let drop_nulls = (omit >> (i % 64)) & 1 == 1;
        let mut fields = vec![format!("\"ts\":{}", e.t)];
        let mut field = |name: &str, v: Option<String>| match v {
            Some(v) => fields.push(format!("\"{name}\":{v}")),
            None if drop_nulls => {}
            None => fields.push(format!("\"{name}\":null")),
        };
        field("k", e.k.as_ref().map(|s| format!("{s:?}")));
        field("x", e.x.map(|x| x.to_string()));
        field("n", e.n.map(|n| n.to_string()));
        field("s", e.s.as_ref().map(|s| format!("{s:?}")));
        field("b", e.b.map(|b| b.to_string()));
        out.push('{');
        out.push_str(&fields.join(","));
        out.push_str("}\n");
    }
    out
}

fn decode(plan: &Plan, events: &[Ev], omit: u64) -> DataFrame {
    let d = plan.decode(ndjson(events, omit).as_bytes());
    assert!(d.rejected.is_empty(), "{:?}", d.rejected);
    assert_eq!(d.events.height(), events.len());
    d.events
}

fn partial(plan: &Plan, view: usize, events: &DataFrame) -> DataFrame {
    plan.partials(
        view,
        plan.prepare(events.clone().lazy(), &LookupSet::none())
            .unwrap(),
    )
    .collect()
    .expect("partials compute")
}

/// One output cell, as both the plan and the model produce it.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Str(String),
    Bool(bool),
}

type Row = Vec<Cell>;

fn rows(df: &DataFrame) -> Vec<Row> {
    (0..df.height())
        .map(|i| {
            df.columns()
                .iter()
                .map(|c| match c.get(i).expect("row in range") {
                    AnyValue::Null => Cell::Null,
                    AnyValue::Int64(v) => Cell::Int(v),
                    AnyValue::Datetime(v, _, _) | AnyValue::DatetimeOwned(v, _, _) => Cell::Int(v),
                    AnyValue::Float64(v) => Cell::Float(v),
                    AnyValue::String(s) => Cell::Str(s.to_string()),
                    AnyValue::StringOwned(s) => Cell::Str(s.to_string()),
                    AnyValue::Boolean(b) => Cell::Bool(b),
                    other => panic!("unexpected output value {other:?}"),
                })
                .collect()
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Tolerance {
    Exact,
    /// Floats from merged partial states (Chan's formula): 1e-9 relative.
    Float,
    Distinct,
    Quantile,
}

fn tolerance(metric: &str) -> Tolerance {
    match metric {
        "vx" | "sdn" => Tolerance::Float,
        "ds" | "dn" => Tolerance::Distinct,
        "qx" | "qn" => Tolerance::Quantile,
        _ => Tolerance::Exact,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) + 1e-9
}

/// Compares plan rows with expected rows. `sketch_exact` for two plan outputs (sketches merge
/// exactly); otherwise sketches are held to their error bounds against exact answers.
fn assert_rows(
    actual: &[Row],
    expected: &[Row],
    columns: &[String],
    sketch_exact: bool,
    what: &str,
) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{what}: row count\nactual:   {actual:?}\nexpected: {expected:?}"
    );
    for (a, e) in actual.iter().zip(expected) {
        for ((x, y), name) in a.iter().zip(e).zip(columns) {
            let ok = match (tolerance(name), x, y) {
                (_, Cell::Null, Cell::Null) => true,
                (Tolerance::Float, Cell::Float(x), Cell::Float(y)) => close(*x, *y),
                (Tolerance::Distinct, Cell::Int(x), Cell::Int(y)) if !sketch_exact => {
                    (x - y).abs() as f64 <= 1.0 + 0.02 * *y as f64
                }
                (Tolerance::Quantile, Cell::Float(x), Cell::Float(y)) if !sketch_exact => {
                    (x - y).abs() <= quantile::ALPHA * y.abs() * (1.0 + 1e-9)
                }
                _ => x == y,
            };
            assert!(
                ok,
                "{what}: column `{name}`: {x:?} vs {y:?}\nrow:      {a:?}\nexpected: {e:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// The naive model.

fn windows_of(window: &Window, t: i64) -> Vec<(Option<i64>, Option<i64>)> {
    match window {
        Window::Tumbling { size } => {
            let size = size.as_millis() as i64;
            let start = t.div_euclid(size) * size;
            vec![(Some(start), Some(start + size))]
        }
        Window::Hopping { size, every } => {
            let (size, every) = (size.as_millis() as i64, every.as_millis() as i64);
            let mut out = Vec::new();
            let mut start = t.div_euclid(every) * every;
            while start + size > t {
                out.push((Some(start), Some(start + size)));
                start -= every;
            }
            out
        }
        Window::All => vec![(None, None)],
        Window::Session { .. } => unreachable!("sessions are assigned per key"),
    }
}

fn key_of(v: &View, e: &Ev) -> Option<Option<String>> {
    if v.group_by.is_empty() {
        None
    } else {
        Some(e.k.clone())
    }
}

/// (window_start, window_end, key — `None` when the view has no group_by).
type GroupId = (Option<i64>, Option<i64>, Option<Option<String>>);

/// (window_start, window_end, key) → events, for one view.
fn naive_groups(v: &View, events: &[Ev]) -> Vec<(GroupId, Vec<Ev>)> {
    let mut groups: Vec<(GroupId, Vec<Ev>)> = Vec::new();
    let mut push = |key: GroupId, e: &Ev| match groups.iter_mut().find(|(k, _)| *k == key) {
        Some((_, list)) => list.push(e.clone()),
        None => groups.push((key, vec![e.clone()])),
    };
    match v.window {
        Window::Session { gap } => {
            let gap = gap.as_millis() as i64;
            let mut keys: Vec<Option<Option<String>>> = Vec::new();
            for e in events {
                let k = key_of(v, e);
                if !keys.contains(&k) {
                    keys.push(k);
                }
            }
            for k in keys {
                let mut mine: Vec<&Ev> = events.iter().filter(|e| key_of(v, e) == k).collect();
                mine.sort_by_key(|e| e.t);
                let mut i = 0;
                while i < mine.len() {
                    let mut j = i;
                    while j + 1 < mine.len() && mine[j + 1].t - mine[j].t < gap {
                        j += 1;
                    }
                    let key = (Some(mine[i].t), Some(mine[j].t + gap), k.clone());
                    for e in &mine[i..=j] {
                        push(key.clone(), e);
                    }
                    i = j + 1;
                }
            }
        }
        ref w => {
            for e in events {
                for (start, end) in windows_of(w, e.t) {
                    push((start, end, key_of(v, e)), e);
                }
            }
        }
    }
    groups
}

fn column_of(e: &Ev, c: &str) -> Cell {
    match c {
        "ts" => Cell::Int(e.t),
        "k" => e.k.clone().map_or(Cell::Null, Cell::Str),
        "x" => e.x.map_or(Cell::Null, Cell::Float),
        "y" => e.x.map_or(Cell::Null, |x| Cell::Float(x * 2.0)),
        "n" => e.n.map_or(Cell::Null, Cell::Int),
        "s" => e.s.clone().map_or(Cell::Null, Cell::Str),
        "b" => e.b.map_or(Cell::Null, Cell::Bool),
        other => panic!("no column {other}"),
    }
}

fn cell_cmp(a: &Cell, b: &Cell) -> std::cmp::Ordering {
    match (a, b) {
        (Cell::Int(a), Cell::Int(b)) => a.cmp(b),
        (Cell::Float(a), Cell::Float(b)) => a.total_cmp(b),
        (Cell::Str(a), Cell::Str(b)) => a.cmp(b),
        (Cell::Bool(a), Cell::Bool(b)) => a.cmp(b),
        _ => panic!("comparing {a:?} with {b:?}"),
    }
}

fn as_f64(c: &Cell) -> f64 {
    match c {
        Cell::Int(i) => *i as f64,
        Cell::Float(f) => *f,
        other => panic!("not numeric: {other:?}"),
    }
}

fn naive_metric(text: &str, events: &[Ev]) -> Cell {
    let (func, rest) = text.split_once('(').expect("call");
    let arg = rest
        .trim_end_matches(')')
        .split(',')
        .next()
        .unwrap_or("")
        .trim();
    if func == "count" && arg.is_empty() {
        return Cell::Int(events.len() as i64);
    }
    // (time, value) of every non-null input, in event order.
    let vals: Vec<(i64, Cell)> = events
        .iter()
        .map(|e| (e.t, column_of(e, arg)))
        .filter(|(_, c)| *c != Cell::Null)
        .collect();
    let n = vals.len();
    let numeric_sum = || vals.iter().map(|(_, c)| as_f64(c)).sum::<f64>();
    if n == 0 {
        return match func {
            "count" | "approx_count_distinct" => Cell::Int(0),
            _ => Cell::Null,
        };
    }
    match func {
        "count" => Cell::Int(n as i64),
        "sum" => match vals[0].1 {
            Cell::Int(_) => Cell::Int(vals.iter().map(|(_, c)| as_f64(c) as i64).sum()),
            _ => Cell::Float(numeric_sum()),
        },
        "avg" => Cell::Float(numeric_sum() / n as f64),
        "min" => vals
            .iter()
            .map(|(_, c)| c.clone())
            .min_by(cell_cmp)
            .unwrap_or(Cell::Null),
        "max" => vals
            .iter()
            .map(|(_, c)| c.clone())
            .max_by(cell_cmp)
            .unwrap_or(Cell::Null),
        "variance" | "stddev" => {
            if n < 2 {
                return Cell::Null;
            }
            let mean = numeric_sum() / n as f64;
            let m2: f64 = vals.iter().map(|(_, c)| (as_f64(c) - mean).powi(2)).sum();
            let var = m2 / (n - 1) as f64;
            Cell::Float(if func == "stddev" { var.sqrt() } else { var })
        }
        "first" => vals
            .iter()
            .min_by(|a, b| a.0.cmp(&b.0).then_with(|| cell_cmp(&a.1, &b.1)))
            .map(|p| p.1.clone())
            .unwrap_or(Cell::Null),
        "last" => vals
            .iter()
            .max_by(|a, b| a.0.cmp(&b.0).then_with(|| cell_cmp(&a.1, &b.1)))
            .map(|p| p.1.clone())
            .unwrap_or(Cell::Null),
        "approx_count_distinct" => {
            let distinct: HashSet<String> = vals.iter().map(|(_, c)| format!("{c:?}")).collect();
            Cell::Int(distinct.len() as i64)
        }
        "approx_quantile" => {
            let q: f64 = rest
                .trim_end_matches(')')
                .split(',')
                .nth(1)
                .expect("quantile")
                .trim()
                .parse()
                .expect("q");
            let mut xs: Vec<f64> = vals.iter().map(|(_, c)| as_f64(c)).collect();
            xs.sort_by(f64::total_cmp);
            Cell::Float(xs[(q * (n - 1) as f64).floor() as usize])
        }
        other => panic!("no aggregate {other}"),
    }
}

/// The view's rows computed with plain loops, sorted like `finish` sorts them.
fn naive(v: &View, events: &[Ev]) -> Vec<Row> {
    // The pipeline's filter: `n IS NULL OR n <> 7`.
    let kept: Vec<Ev> = events.iter().filter(|e| e.n != Some(7)).cloned().collect();
    let mut groups = naive_groups(v, &kept);
    groups.sort_by(|(a, _), (b, _)| {
        a.0.cmp(&b.0).then_with(|| match (&a.2, &b.2) {
            // Null keys sort last.
            (Some(Some(x)), Some(Some(y))) => x.cmp(y),
            (Some(None), Some(Some(_))) => std::cmp::Ordering::Greater,
            (Some(Some(_)), Some(None)) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Equal,
        })
    });
    groups
        .into_iter()
        .map(|((start, end, key), evs)| {
            let mut row = vec![
                start.map_or(Cell::Null, Cell::Int),
                end.map_or(Cell::Null, Cell::Int),
            ];
            if let Some(k) = key {
                row.push(k.map_or(Cell::Null, Cell::Str));
            }
            row.extend(METRICS.iter().map(|(_, a)| naive_metric(a, &evs)));
            row
        })
        .collect()
}

fn column_names(df: &DataFrame) -> Vec<String> {
    df.get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Splits `events` at the given cut points (indices, any order, clamped).
fn chunks(events: &[Ev], cuts: &[usize]) -> Vec<Vec<Ev>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (events.len() + 1)).collect();
    cuts.sort_unstable();
    let mut out = Vec::new();
    let mut from = 0;
    for c in cuts {
        out.push(events[from..c].to_vec());
        from = c;
    }
    out.push(events[from..].to_vec());
    out
}

fn plan() -> Plan {
    Plan::compile(&test_pipeline()).expect("test pipeline compiles")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// finish(merge(partial(chunk)…)) equals the naive answer over all events, and equals
    /// finish(partial(all events)) — for every aggregate and window kind.
    #[test]
    fn merged_chunks_match_the_naive_model(
        events in prop::collection::vec(ev_strategy(), 0..60),
        cuts in prop::collection::vec(any::<usize>(), 0..4),
        omit in any::<u64>(),
    ) {
        let plan = plan();
        let parts: Vec<DataFrame> = chunks(&events, &cuts)
            .iter()
            .map(|c| decode(&plan, c, omit))
            .collect();
        let whole = decode(&plan, &events, !omit);
        for (i, v) in plan.pipeline().views.iter().enumerate() {
            let partials: Vec<DataFrame> = parts.iter().map(|p| partial(&plan, i, p)).collect();
            let merged = plan.finish(i, plan.merge(i, partials).unwrap()).unwrap();
            let at_once = plan.finish(i, partial(&plan, i, &whole)).unwrap();
            let columns = column_names(&merged);
            assert_rows(&rows(&merged), &naive(v, &events), &columns, false, &format!("{} merged vs naive", v.name));
            assert_rows(&rows(&merged), &rows(&at_once), &columns, true, &format!("{} merged vs at once", v.name));
        }
    }

    /// Any grouping and order of merges gives the same answer.
    #[test]
    fn merge_is_associative_and_commutative(
        events in prop::collection::vec(ev_strategy(), 0..45),
        cut_a in any::<usize>(),
        cut_b in any::<usize>(),
    ) {
        let plan = plan();
        let parts = chunks(&events, &[cut_a, cut_b]);
        let frames: Vec<DataFrame> = parts.iter().map(|c| decode(&plan, c, 0)).collect();
        for i in 0..plan.pipeline().views.len() {
            let p: Vec<DataFrame> = frames.iter().map(|f| partial(&plan, i, f)).collect();
            let m = |parts: Vec<DataFrame>| plan.merge(i, parts).unwrap();
            let left = m(vec![m(vec![p[0].clone(), p[1].clone()]), p[2].clone()]);
            let right = m(vec![p[0].clone(), m(vec![p[1].clone(), p[2].clone()])]);
            let reversed = m(vec![p[2].clone(), p[1].clone(), p[0].clone()]);
            // The speed layer's path: accumulators merged into each other.
            let mut acc = plan.accumulator(i);
            acc.absorb(&p[2]).unwrap();
            let mut other = plan.accumulator(i);
            other.absorb(&p[0]).unwrap();
            other.absorb(&p[1]).unwrap();
            acc.merge(other);
            let expected = rows(&plan.finish(i, left).unwrap());
            let name = &plan.pipeline().views[i].name;
            for (what, df) in [("right", right), ("reversed", reversed), ("accumulators", acc.to_partials().unwrap())] {
                let out = plan.finish(i, df).unwrap();
                assert_rows(&rows(&out), &expected, &column_names(&out), true, &format!("{name}: {what}"));
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// The batch layer's way — one query over all the events on polars' streaming engine,
    /// only sorted by `merge_scanned` — gives the merge's partials: the same groups in the same
    /// order with the same states (floats up to rounding: the engines add in other orders).
    #[test]
    fn scanned_partials_equal_merged_partials(
        events in prop::collection::vec(ev_strategy(), 0..60),
        omit in any::<u64>(),
    ) {
        let plan = plan();
        let frame = decode(&plan, &events, omit);
        for i in 0..plan.pipeline().views.len() {
            let name = &plan.pipeline().views[i].name;
            let prepared = plan.prepare(frame.clone().lazy(), &LookupSet::none()).unwrap();
            let streamed = plan
                .partials(i, prepared)
                .collect_with_engine(Engine::Streaming)
                .unwrap()
                .unwrap_single();
            let scanned = plan.merge_scanned(i, vec![streamed]).unwrap();
            let merged = plan.merge(i, vec![partial(&plan, i, &frame)]).unwrap();
            assert_eq!(scanned.schema(), merged.schema(), "{name}");
            for (a, b) in scanned.columns().iter().zip(merged.columns()) {
                if !a.dtype().is_float() {
                    let (a, b) = (a.as_materialized_series(), b.as_materialized_series());
                    assert!(a.equals_missing(b), "{name}: `{}`: {a:?} vs {b:?}", a.name());
                }
            }
            let (a, b) = (plan.finish(i, scanned).unwrap(), plan.finish(i, merged).unwrap());
            assert_rows(&rows(&a), &rows(&b), &column_names(&a), true, &format!("{name}: scanned vs merged"));
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Retention: what is served from the trimmed partials (windows ending after the horizon)
    /// is exactly what was served from all of them, each window as whole as before; tumbling
    /// and session partials trim exactly (all-time rows untouched).
    #[test]
    fn trimmed_partials_finish_to_the_windows_after_the_horizon(
        events in prop::collection::vec(ev_strategy(), 0..60),
        horizon in -400i64..900,
    ) {
        let plan = plan();
        let events = decode(&plan, &events, 0);
        for i in 0..plan.pipeline().views.len() {
            let p = partial(&plan, i, &events);
            let all = plan.finish(i, p.clone()).unwrap();
            let end = col("window_end").cast(DataType::Int64);
            let expected = all
                .lazy()
                .filter(end.clone().gt(lit(horizon)).or(end.clone().is_null()))
                .collect()
                .unwrap();
            let trimmed = plan.finish(i, plan.trim_partials(i, p, horizon).unwrap()).unwrap();
            let name = &plan.pipeline().views[i].name;
            // A hopping window that ended by the horizon may still get a newer pane (partial):
            // serving leaves such rows out by their end, so compare what is served.
            let served = trimmed
                .lazy()
                .filter(end.clone().gt(lit(horizon)).or(end.is_null()))
                .collect()
                .unwrap();
            assert_rows(&rows(&served), &rows(&expected), &column_names(&served), true, &format!("{name} at {horizon}"));
            if !matches!(plan.pipeline().views[i].window, Window::Hopping { .. }) {
                assert_eq!(served.height(), plan.finish(i, plan.trim_partials(i, partial(&plan, i, &events), horizon).unwrap()).unwrap().height(), "{name}: exact");
            }
        }
    }
}

#[test]
fn sessions_merge_across_chunk_boundaries() {
    let plan = plan();
    let session = plan
        .pipeline()
        .views
        .iter()
        .position(|v| v.name == "session")
        .unwrap();
    let ev = |t: i64| Ev {
        t,
        k: Some("a".into()),
        x: Some(1.0),
        n: None,
        s: None,
        b: None,
    };
    // 0, 40 and 80 are one session (gaps < 50); 130 starts another (gap exactly 50).
    let parts: Vec<DataFrame> = [vec![ev(0)], vec![ev(80), ev(130)], vec![ev(40)]]
        .iter()
        .map(|c| partial(&plan, session, &decode(&plan, c, 0)))
        .collect();
    // Before the middle event arrives the two ends are separate sessions…
    let early = plan
        .finish(session, plan.merge(session, parts[..2].to_vec()).unwrap())
        .unwrap();
    assert_eq!(early.height(), 3);
    // …and it bridges them.
    let out = plan
        .finish(session, plan.merge(session, parts).unwrap())
        .unwrap();
    let r = rows(&out);
    assert_eq!(r.len(), 2);
    assert_eq!(
        &r[0][..4],
        &[
            Cell::Int(0),
            Cell::Int(130),
            Cell::Str("a".into()),
            Cell::Int(3)
        ]
    );
    assert_eq!(
        &r[1][..4],
        &[
            Cell::Int(130),
            Cell::Int(180),
            Cell::Str("a".into()),
            Cell::Int(1)
        ]
    );
}

#[test]
fn hopping_windows_hold_an_event_size_over_every_times() {
    let plan = plan();
    let d = plan.decode(b"{\"ts\": 250, \"k\": \"a\", \"x\": 1.5}\n");
    let p = partial(&plan, 1, &d.events);
    assert_eq!(p.height(), 1, "one pane");
    let out = plan.finish(1, p).unwrap();
    let r = rows(&out);
    let windows: Vec<(Cell, Cell)> = r.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    assert_eq!(
        windows,
        [(0, 300), (100, 400), (200, 500)].map(|(a, b)| (Cell::Int(a), Cell::Int(b)))
    );
}

#[test]
fn output_columns_and_types() {
    let plan = plan();
    let out = plan.finish(0, plan.merge(0, vec![]).unwrap()).unwrap();
    assert_eq!(out.height(), 0);
    assert_eq!(out.schema().as_ref(), &plan.output_schema(0));
    let names = column_names(&out);
    assert_eq!(&names[..4], ["window_start", "window_end", "k", "c"]);
    let d = plan.decode(
        b"{\"ts\": \"1970-01-01T00:00:00.250Z\", \"x\": 2, \"n\": 3, \"s\": \"p\", \"b\": true}\n",
    );
    assert!(d.rejected.is_empty(), "{:?}", d.rejected);
    let out = plan.finish(0, partial(&plan, 0, &d.events)).unwrap();
    assert_eq!(out.schema().as_ref(), &plan.output_schema(0));
    assert_eq!(
        plan.partials_schema(0),
        partial(&plan, 0, &d.events).schema().as_ref().clone()
    );
}

#[test]
fn the_filter_and_derived_columns_run_before_aggregation() {
    let plan = plan();
    let d = plan.decode(b"{\"ts\": 1, \"x\": 2.5, \"n\": 7}\n{\"ts\": 2, \"x\": 4, \"n\": 1}\n{\"ts\": 3, \"x\": 1}\n");
    let prepared = plan
        .prepare(d.events.lazy(), &LookupSet::none())
        .unwrap()
        .collect()
        .unwrap();
    assert_eq!(prepared.height(), 2, "n = 7 is filtered out");
    let y: Vec<Option<f64>> = prepared
        .column("y")
        .unwrap()
        .f64()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(y, [Some(8.0), Some(2.0)]);
}

#[test]
fn partials_from_another_layout_are_an_error_not_a_panic() {
    let plan = plan();
    let d = plan.decode(b"{\"ts\": 1, \"k\": \"a\"}\n");
    let tumbling = partial(&plan, 0, &d.events);
    // Hopping partials have `pane_start` where tumbling ones have `window_start`.
    assert!(plan.merge(1, vec![tumbling.clone()]).is_err());
    let renamed = tumbling
        .clone()
        .lazy()
        .with_column(lit(1i32).alias("__rows"))
        .collect()
        .unwrap();
    assert!(plan.finish(0, renamed).is_err());
}

#[test]
fn partials_round_trip_through_parquet_with_their_version() {
    let plan = plan();
    let d = plan.decode(b"{\"ts\": 1, \"k\": \"a\", \"x\": 1.25, \"n\": 3, \"s\": \"p\"}\n{\"ts\": 120, \"s\": \"q\"}\n");
    for view in 0..plan.pipeline().views.len() {
        let mut merged = plan
            .merge(view, vec![partial(&plan, view, &d.events)])
            .unwrap();
        let mut bytes = Vec::new();
        plan.write_partials(view, &mut merged, &mut bytes).unwrap();
        let back = plan.read_partials(view, &bytes).unwrap();
        assert!(back.equals_missing(&merged), "{back}\n{merged}");
    }
    // Another logic (here: another view's) is refused, and so is a file without a version.
    let mut p0 = plan.merge(0, vec![partial(&plan, 0, &d.events)]).unwrap();
    let mut bytes = Vec::new();
    plan.write_partials(0, &mut p0, &mut bytes).unwrap();
    let mut tweaked = test_pipeline();
    tweaked.filter = None;
    let other = Plan::compile(&tweaked).unwrap();
    assert!(matches!(
        other.read_partials(0, &bytes),
        Err(PlanError::PartialsLogic { .. })
    ));
    let mut plain = Vec::new();
    ParquetWriter::new(&mut plain).finish(&mut p0).unwrap();
    assert!(matches!(
        plan.read_partials(0, &plain),
        Err(PlanError::PartialsFormat { found: None, .. })
    ));
}

#[test]
fn logic_hash_follows_the_answer_not_the_paperwork() {
    let base = test_pipeline();
    let hash = |p: &Pipeline| Plan::compile(p).unwrap().logic_hash(0);
    let h = hash(&base);
    assert_eq!(h.len(), 32);

    let mut same = base.clone();
    same.description = Some("now documented".into());
    same.source = Source::Generator { rate: 5.0 };
    same.archive.segment_rows = 7;
    same.event_id = Some("s".into());
    same.format = Format::Csv;
    same.views[0].name = "renamed".into();
    same.views[1].window = Window::All;
    assert_eq!(hash(&same), h);

    let changes: Vec<fn(&mut Pipeline)> = vec![
        |p| p.filter = Some("n IS NULL OR n <> 8".into()),
        |p| p.columns[0].1 = "x * 3".into(),
        |p| p.views[0].window = Window::Tumbling { size: ms(200) },
        |p| p.views[0].group_by = vec!["s".into()],
        |p| p.views[0].metrics[0].name = "events".into(),
        |p| p.views[0].metrics.swap(0, 1),
        |p| p.views[0].metrics[2].aggregate = aggregate("sum(n)", &[], false).unwrap(),
        |p| p.schema.push(("extra".into(), ColumnType::Int)),
        |p| p.schema[2].1 = ColumnType::Int,
    ];
    for (i, change) in changes.iter().enumerate() {
        let mut p = base.clone();
        change(&mut p);
        assert_ne!(hash(&p), h, "change #{i} must change the hash");
    }
    let mut two_times = base.clone();
    two_times.schema.push(("ts2".into(), ColumnType::Timestamp));
    let mut other_time = two_times.clone();
    other_time.event_time = "ts2".into();
    assert_ne!(hash(&two_times), hash(&other_time));
}

#[test]
fn compile_rejects_what_it_cannot_run() {
    let mut p = test_pipeline();
    p.views[0].group_by = vec!["window_start".into()];
    assert!(matches!(Plan::compile(&p), Err(PlanError::View { .. })));
    let mut p = test_pipeline();
    p.views[0].metrics[0].aggregate = aggregate("sum(s)", &[], false).unwrap();
    let err = Plan::compile(&p).unwrap_err().to_string();
    assert!(err.contains("cannot aggregate `s`"), "{err}");
    let mut p = test_pipeline();
    p.schema.push(("__t".into(), ColumnType::Int));
    p.views[0].group_by = vec!["__t".into()];
    assert!(matches!(Plan::compile(&p), Err(PlanError::View { .. })));
    let mut p = test_pipeline();
    p.filter = Some("x +".into());
    assert!(matches!(Plan::compile(&p), Err(PlanError::Expr { .. })));
}

#[test]
fn plan_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Plan>();
    check::<super::Accumulator>();
}

#[test]
fn sketches_hold_their_bounds_at_scale() {
    let mut p = test_pipeline();
    p.filter = None;
    let plan = Plan::compile(&p).unwrap();
    let all = plan
        .pipeline()
        .views
        .iter()
        .position(|v| v.name == "all_unkeyed")
        .unwrap();
    let metric = |name: &str| 2 + METRICS.iter().position(|(m, _)| *m == name).unwrap();
    let n = 60_000i64;
    let events = df!(
        "ts" => (0..n).collect::<Vec<_>>(),
        "k" => vec![Some("a"); n as usize],
        // 50 000 distinct floats, each quantile known exactly.
        "x" => (0..n).map(|i| (i % 50_000) as f64 * 0.5 + 1.0).collect::<Vec<_>>(),
        "n" => (0..n).map(|i| i % 20_000).collect::<Vec<_>>(),
        "s" => (0..n).map(|i| format!("user-{}", i % 30_000)).collect::<Vec<_>>(),
        "b" => vec![Some(true); n as usize],
    )
    .unwrap()
    .lazy()
    .with_column(col("ts").cast(DataType::Datetime(TimeUnit::Milliseconds, None)))
    .collect()
    .unwrap();
    // In four micro-batches, as the speed layer would see them.
    let parts: Vec<DataFrame> = (0..4)
        .map(|i| partial(&plan, all, &events.slice(i * 15_000, 15_000)))
        .collect();
    let out = rows(&plan.finish(all, plan.merge(all, parts).unwrap()).unwrap());
    let int = |c: &Cell| match c {
        Cell::Int(v) => *v as f64,
        other => panic!("{other:?}"),
    };
    for (name, exact) in [("ds", 30_000.0), ("dn", 20_000.0)] {
        let est = int(&out[0][metric(name)]);
        // 3.5 standard errors of 2^12 registers.
        assert!(
            (est - exact).abs() / exact < 0.057,
            "{name}: {est} vs {exact}"
        );
    }
    let mut xs: Vec<f64> = (0..n).map(|i| (i % 50_000) as f64 * 0.5 + 1.0).collect();
    xs.sort_by(f64::total_cmp);
    let Cell::Float(median) = out[0][metric("qx")] else {
        panic!()
    };
    let exact = xs[((n - 1) as f64 * 0.5).floor() as usize];
    assert!(
        (median - exact).abs() <= quantile::ALPHA * exact,
        "{median} vs {exact}"
    );
}

#[test]
fn csv_and_ndjson_give_the_same_answer() {
    let json = plan();
    let mut p = test_pipeline();
    p.format = Format::Csv;
    let csv = Plan::compile(&p).unwrap();
    let ndjson = b"{\"ts\":\"1970-01-01T00:00:00.120Z\",\"k\":\"a\",\"x\":1.5,\"s\":\"p, q\"}\n{\"ts\":130,\"k\":\"a\",\"n\":4,\"b\":false}\n";
    let text = b"s,ts,k,x,n,b\n\"p, q\",1970-01-01T00:00:00.120Z,a,1.5,,\n,130,a,,4,false\n";
    let a = json.decode(ndjson);
    let b = csv.decode(text);
    assert!(
        a.rejected.is_empty() && b.rejected.is_empty(),
        "{:?} {:?}",
        a.rejected,
        b.rejected
    );
    assert!(
        a.events.equals_missing(&b.events),
        "{}\n{}",
        a.events,
        b.events
    );
    let finish =
        |plan: &Plan, events: &DataFrame| plan.finish(0, partial(plan, 0, events)).unwrap();
    assert!(finish(&json, &a.events).equals_missing(&finish(&csv, &b.events)));
}
