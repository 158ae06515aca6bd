//! `verify`: the two engines over the same sealed segments must agree. The batch engine scans
//! every segment at once; the speed engine computes partials per segment and merges them with
//! the accumulator, as a server does. Any difference is a bug in one of them.

use std::sync::Arc;

use polars::prelude::*;

use super::scan;
use crate::lake::Lake;
use crate::plan::Plan;
use crate::speed::lookups::Lookups;
use crate::state::State;

/// Relative tolerance for floating-point results: the engines sum in different orders.
const REL_TOL: f64 = 1e-9;

/// The outcome for one view.
#[derive(Debug, Clone)]
pub struct ViewCheck {
    pub view: String,
    pub rows: usize,
    /// Human-readable differences; empty when the engines agree.
    pub differences: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub segments: usize,
    pub events: u64,
    pub views: Vec<ViewCheck>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.views.iter().all(|v| v.differences.is_empty())
    }
}

/// Recomputes every view of the plan's pipeline over its sealed segments in both engines.
pub async fn verify(plan: Arc<Plan>, state: &State, lake: &Lake) -> anyhow::Result<Report> {
    let pipeline = plan.pipeline().name.clone();
    let (_, segments) = super::sealed(state, &pipeline).await?;
    let events = segments.iter().map(|s| s.rows).sum();
    let lookups = Lookups::reader(plan.pipeline(), lake);
    let source = scan::open_parts(lake, &lookups, &segments, |_| {}).await?;
    let n = segments.len();
    let views = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<ViewCheck>> {
        let mut out = Vec::new();
        for v in 0..plan.pipeline().views.len() {
            let batch = plan.finish(v, scan::view_partials(&plan, v, &source)?)?;
            let speed = plan.finish(v, scan::speed_partials(&plan, v, &source)?)?;
            out.push(ViewCheck {
                view: plan.pipeline().views[v].name.clone(),
                rows: batch.height(),
                differences: compare(&batch, &speed),
            });
        }
        Ok(out)
    })
    .await??;
    Ok(Report {
        segments: n,
        events,
        views,
    })
}

/// Differences between two finished frames (batch, speed), at most a few per column.
pub fn compare(batch: &DataFrame, speed: &DataFrame) -> Vec<String> {
    const MAX_PER_COLUMN: usize = 5;
    let mut out = Vec::new();
    if batch.height() != speed.height() {
        out.push(format!(
            "batch has {} rows, speed has {}",
            batch.height(),
            speed.height()
        ));
        return out;
    }
    if batch.schema() != speed.schema() {
        out.push(format!(
            "schemas differ: batch {:?}, speed {:?}",
            batch.schema(),
            speed.schema()
        ));
        return out;
    }
    for (b, s) in batch.columns().iter().zip(speed.columns()) {
        let name = b.name().to_string();
        let mut found = 0;
        let floats = b.dtype().is_float();
        let (bs, ss) = (b.as_materialized_series(), s.as_materialized_series());
        if floats {
            let (Ok(bf), Ok(sf)) = (bs.cast(&DataType::Float64), ss.cast(&DataType::Float64))
            else {
                out.push(format!("column `{name}`: cannot compare"));
                continue;
            };
            let (Ok(bf), Ok(sf)) = (bf.f64(), sf.f64()) else {
                out.push(format!("column `{name}`: cannot compare"));
                continue;
            };
            for (i, (x, y)) in bf.iter().zip(sf.iter()).enumerate() {
                let same = match (x, y) {
                    (None, None) => true,
                    (Some(x), Some(y)) => {
                        (x.is_nan() && y.is_nan())
                            || (x - y).abs() <= REL_TOL * x.abs().max(y.abs()).max(1.0)
                    }
                    _ => false,
                };
                if !same {
                    found += 1;
                    if found <= MAX_PER_COLUMN {
                        out.push(format!("row {i}, `{name}`: batch {x:?}, speed {y:?}"));
                    }
                }
            }
        } else {
            for i in 0..bs.len() {
                let (x, y) = (bs.get(i), ss.get(i));
                let same = match (&x, &y) {
                    (Ok(x), Ok(y)) => x == y,
                    _ => false,
                };
                if !same {
                    found += 1;
                    if found <= MAX_PER_COLUMN {
                        out.push(format!(
                            "row {i}, `{name}`: batch {}, speed {}",
                            x.map(|v| v.to_string()).unwrap_or_default(),
                            y.map(|v| v.to_string()).unwrap_or_default()
                        ));
                    }
                }
            }
        }
        if found > MAX_PER_COLUMN {
            out.push(format!(
                "… and {} more differences in `{name}`",
                found - MAX_PER_COLUMN
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_tolerates_rounding_and_reports_real_differences() {
        let a = df!("k" => ["a", "b"], "x" => [1.0, 2.0]).unwrap();
        let b = df!("k" => ["a", "b"], "x" => [1.0 + 1e-13, 2.0]).unwrap();
        assert!(compare(&a, &b).is_empty());
        let c = df!("k" => ["a", "c"], "x" => [1.0, 2.5]).unwrap();
        let d = compare(&a, &c);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].contains("`k`") && d[1].contains("`x`"), "{d:?}");
        let e = df!("k" => ["a"], "x" => [1.0]).unwrap();
        assert_eq!(compare(&a, &e).len(), 1);
    }
}
