//! A pipeline's `views:`: each view's grouping, window and metrics (aggregate calls checked
//! against the columns).

use super::sinks::{self, ViewShape};
use super::unknown_column;
use crate::spec::diag::{Diagnostics, did_you_mean};
use crate::spec::model::*;
use crate::spec::read::{self, Obj};
use crate::spec::yaml::{Loc, Node};

pub const AGGREGATES: &[&str] = &[
    "count",
    "sum",
    "min",
    "max",
    "avg",
    "stddev",
    "variance",
    "first",
    "last",
    "approx_count_distinct",
    "approx_quantile",
];

pub(super) fn views(
    d: &mut Diagnostics,
    node: &Node,
    columns: &[(String, ColumnType)],
    check_columns: bool,
) -> Option<Vec<View>> {
    let views = read::named(d, node, "views", "view", |d, item| {
        view(d, item, columns, check_columns)
    })?;
    if views.ok {
        shared_destinations(d, node, &views.built);
    }
    views.ok.then_some(views.built)
}

/// Two views delivering to one destination would overwrite each other's rows (and fight over
/// one progress record): reported at the second sink. `built` are the views of the list
/// `node`, all of them, in order.
fn shared_destinations(d: &mut Diagnostics, node: &Node, built: &[View]) {
    let mut seen: Vec<(String, &str)> = Vec::new();
    for (view, sink, loc) in sinks_at(node, built) {
        let dest = sink.target.destination();
        match seen.iter().find(|(d, _)| *d == dest) {
            Some((_, other)) if *other != view.name => d.error(
                loc,
                format!(
                    "sink `{}` is already the destination of view `{other}`: each table, topic or file takes one view",
                    sink.target.name()
                ),
            ),
            Some(_) => {}
            None => seen.push((dest, &view.name)),
        }
    }
}

/// Every sink of the views `built` (those of the list `node`, all of them, in order), with
/// the view and where the sink is written.
pub(super) fn sinks_at<'a>(node: &Node, built: &'a [View]) -> Vec<(&'a View, &'a Sink, Loc)> {
    let Node::Seq { items, .. } = node else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (view, item) in built.iter().zip(items) {
        if let Some(Node::Seq { items, .. }) = item.get("sinks") {
            out.extend(
                view.sinks
                    .iter()
                    .zip(items)
                    .map(|(s, n)| (view, s, n.loc())),
            );
        }
    }
    out
}

fn view(
    d: &mut Diagnostics,
    node: &Node,
    columns: &[(String, ColumnType)],
    check_columns: bool,
) -> Option<View> {
    let obj = Obj::new(
        d,
        node,
        "view",
        &[
            "name",
            "description",
            "group_by",
            "window",
            "metrics",
            "sinks",
        ],
    )?;
    let name = obj
        .required(d, "name", "view")
        .and_then(|n| read::name(d, n, "view name"));
    let group_by = match obj.value("group_by") {
        None => Some(Vec::new()),
        Some(n) => read::string_list(d, n, "group_by").and_then(|cols| {
            let mut ok = true;
            for (c, loc) in &cols {
                if check_columns && !columns.iter().any(|(n, _)| n == c) {
                    d.error(*loc, unknown_column("group_by", c, columns));
                    ok = false;
                }
            }
            ok.then(|| cols.into_iter().map(|(c, _)| c).collect())
        }),
    };
    let window = obj.required(d, "window", "view").and_then(|n| window(d, n));
    let metrics = obj
        .required(d, "metrics", "view")
        .and_then(|n| metrics(d, n, columns, check_columns));
    if let (Some(g), Some(m)) = (&group_by, &metrics) {
        for metric in m {
            if g.contains(&metric.name)
                || ["window_start", "window_end"].contains(&metric.name.as_str())
            {
                let loc = node
                    .get("metrics")
                    .and_then(|ms| ms.get(&metric.name))
                    .map_or(obj.loc, Node::loc);
                d.error(
                    loc,
                    format!(
                        "metric name `{}` clashes with an output column",
                        metric.name
                    ),
                );
            }
        }
    }
    let sinks = match obj.value("sinks") {
        None => Some(Vec::new()),
        Some(n) => {
            let mut columns = vec!["window_start", "window_end"];
            columns.extend(group_by.iter().flatten().map(String::as_str));
            columns.extend(metrics.iter().flatten().map(|m| m.name.as_str()));
            let shape = ViewShape {
                window: window.as_ref(),
                columns,
            };
            sinks::sinks(d, n, &shape)
        }
    };
    Some(View {
        name: name?,
        group_by: group_by?,
        window: window?,
        metrics: metrics?,
        sinks: sinks?,
    })
}

fn window(d: &mut Diagnostics, node: &Node) -> Option<Window> {
    const HINT: &str = "write `1m`, `all`, {tumbling: 5m}, {hopping: {size: 10m, every: 1m}} or {session: {gap: 30m}}";
    match node {
        Node::Scalar { value, .. } if value == "all" => Some(Window::All),
        Node::Scalar { value, .. } => match crate::spec::duration::parse(value) {
            Ok(size) if !size.is_zero() => Some(Window::Tumbling { size }),
            _ => {
                d.error(node.loc(), format!("invalid window `{value}`: {HINT}"));
                None
            }
        },
        Node::Map { entries, .. } if entries.len() == 1 => {
            let (key, value) = &entries[0];
            match key.name.as_str() {
                "tumbling" => {
                    read::duration(d, value, "tumbling").map(|size| Window::Tumbling { size })
                }
                "hopping" => {
                    let o = Obj::new(d, value, "hopping window", &["size", "every"])?;
                    let size = o
                        .required(d, "size", "hopping window")
                        .and_then(|n| read::duration(d, n, "size"));
                    let every = o
                        .required(d, "every", "hopping window")
                        .and_then(|n| read::duration(d, n, "every"));
                    let (size, every) = (size?, every?);
                    if size < every || !size.as_millis().is_multiple_of(every.as_millis()) {
                        d.error(
                            value.loc(),
                            format!(
                                "hopping window size {} must be a whole multiple of every {}",
                                crate::spec::duration::format(size),
                                crate::spec::duration::format(every)
                            ),
                        );
                        return None;
                    }
                    Some(Window::Hopping { size, every })
                }
                "session" => {
                    let o = Obj::new(d, value, "session window", &["gap"])?;
                    let gap = o
                        .required(d, "gap", "session window")
                        .and_then(|n| read::duration(d, n, "gap"));
                    Some(Window::Session { gap: gap? })
                }
                other => {
                    d.error(
                        key.loc,
                        format!(
                            "unknown window kind `{other}`{}: {HINT}",
                            did_you_mean(other, ["tumbling", "hopping", "session"])
                        ),
                    );
                    None
                }
            }
        }
        _ => {
            d.error(node.loc(), format!("invalid window: {HINT}"));
            None
        }
    }
}

fn metrics(
    d: &mut Diagnostics,
    node: &Node,
    columns: &[(String, ColumnType)],
    check_columns: bool,
) -> Option<Vec<Metric>> {
    let entries = read::entries(d, node, "metrics", "name: aggregate")?;
    if entries.is_empty() {
        d.error(
            node.loc(),
            "`metrics` is empty: declare at least one, e.g. `events: count()`",
        );
        return None;
    }
    let mut out = Vec::new();
    let mut ok = true;
    for (key, value) in entries {
        if !read::identifier(d, key, "metric") {
            ok = false;
        }
        let Some(text) = read::string(d, value, &key.name) else {
            ok = false;
            continue;
        };
        match aggregate(&text, columns, check_columns) {
            Ok(aggregate) => out.push(Metric {
                name: key.name.clone(),
                aggregate,
            }),
            Err(e) => {
                d.error(value.loc(), format!("metric `{}`: {e}", key.name));
                ok = false;
            }
        }
    }
    ok.then_some(out)
}

/// Parses `name(args)` and checks the argument's column and type.
pub fn aggregate(
    text: &str,
    columns: &[(String, ColumnType)],
    check_columns: bool,
) -> Result<Aggregate, String> {
    let t = text.trim();
    let (func, args) = match t.split_once('(') {
        Some((f, rest)) if rest.ends_with(')') => {
            (f.trim().to_ascii_lowercase(), &rest[..rest.len() - 1])
        }
        _ => {
            return Err(format!(
                "`{t}` is not an aggregate call; write e.g. `count()`, `sum(amount)`, `approx_quantile(latency_ms, 0.95)`"
            ));
        }
    };
    let args: Vec<&str> = args
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    if !AGGREGATES.contains(&func.as_str()) {
        return Err(format!(
            "unknown aggregate `{func}`{}",
            did_you_mean(&func, AGGREGATES.iter().copied())
        ));
    }
    let arity = |n: usize| -> Result<(), String> {
        if args.len() == n {
            Ok(())
        } else {
            Err(format!(
                "`{func}` takes {n} argument{}, found {}",
                if n == 1 { "" } else { "s" },
                args.len()
            ))
        }
    };
    let column = |i: usize, need: &[ColumnType], kind: &str| -> Result<String, String> {
        let c = args[i].to_string();
        if !check_columns {
            return Ok(c);
        }
        let Some((_, ty)) = columns.iter().find(|(n, _)| *n == c) else {
            return Err(format!(
                "unknown column `{c}`{}",
                did_you_mean(&c, columns.iter().map(|(n, _)| n.as_str()))
            ));
        };
        if !need.is_empty() && !need.contains(ty) {
            return Err(format!(
                "`{func}` needs a {kind} column, but `{c}` is a {}",
                ty.name()
            ));
        }
        Ok(c)
    };
    const NUMERIC: &[ColumnType] = &[ColumnType::Int, ColumnType::Float];
    const ORDERED: &[ColumnType] = &[
        ColumnType::Int,
        ColumnType::Float,
        ColumnType::Timestamp,
        ColumnType::String,
    ];
    Ok(match func.as_str() {
        "count" if args.is_empty() || args == ["*"] => Aggregate::Count,
        "count" => {
            arity(1)?;
            Aggregate::CountCol(column(0, &[], "")?)
        }
        "sum" => {
            arity(1)?;
            Aggregate::Sum(column(0, NUMERIC, "numeric (int or float)")?)
        }
        "avg" => {
            arity(1)?;
            Aggregate::Avg(column(0, NUMERIC, "numeric (int or float)")?)
        }
        "stddev" => {
            arity(1)?;
            Aggregate::Stddev(column(0, NUMERIC, "numeric (int or float)")?)
        }
        "variance" => {
            arity(1)?;
            Aggregate::Variance(column(0, NUMERIC, "numeric (int or float)")?)
        }
        "min" => {
            arity(1)?;
            Aggregate::Min(column(0, ORDERED, "int, float, timestamp or string")?)
        }
        "max" => {
            arity(1)?;
            Aggregate::Max(column(0, ORDERED, "int, float, timestamp or string")?)
        }
        "first" => {
            arity(1)?;
            Aggregate::First(column(0, &[], "")?)
        }
        "last" => {
            arity(1)?;
            Aggregate::Last(column(0, &[], "")?)
        }
        "approx_count_distinct" => {
            arity(1)?;
            Aggregate::ApproxCountDistinct(column(0, &[], "")?)
        }
        "approx_quantile" => {
            arity(2)?;
            let c = column(0, NUMERIC, "numeric (int or float)")?;
            let q: f64 = args[1]
                .parse()
                .ok()
                .filter(|q: &f64| (0.0..=1.0).contains(q))
                .ok_or_else(|| {
                    format!("quantile `{}` must be a number between 0 and 1", args[1])
                })?;
            Aggregate::ApproxQuantile(c, q)
        }
        _ => unreachable!("checked against AGGREGATES"),
    })
}
