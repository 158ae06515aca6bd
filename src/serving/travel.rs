//! Time travel: the answer a view served at an earlier instant, computed again from what is
//! kept — the publication installed then (the record of installs, [`Install`]) ⊕ the events
//! logged by then that it does not cover, read from the archive and the write-ahead log.
//!
//! Exact for the instant an answer reports (`as_of.at`): the log stamps requests with arrival
//! times that never decrease along positions, and every install takes its place among them
//! ([`crate::clock::Stamps`]), so "logged or installed by instant T" is what the served state
//! held when it stood at T. An instant between two answers gets what was logged or installed by
//! it; events are visible within milliseconds of being logged, so that is what a query at that
//! instant saw, up to those milliseconds.
//!
//! [`Install`]: crate::state::Install

use std::collections::BTreeMap;
use std::sync::Arc;

use polars::prelude::*;

use super::format::rows_json;
use super::query::{Answer, AsOf, QueryError, Served, ViewQuery, check_filters, filter, finish};
use crate::batch::load_partials;
use crate::clock::{Tick, format_ms, format_ns, now_ms};
use crate::plan::{LookupSet, Plan};
use crate::spec::Window;
use crate::speed::lookups::Lookups;
use crate::speed::record::{ARRIVAL_COLUMN, OFFSET_COLUMN};
use crate::speed::recovery::read_segment;
use crate::speed::runtime::PipelineRuntime;
use crate::state::{Publication, Segment};

/// How often the archive is read again when a segment was sealed while it was being read.
const ATTEMPTS: usize = 5;

/// View `view_idx`'s answer to `q` as it was served at instant `at`. The live answer when `at`
/// is not before it; [`QueryError::Gone`] when what `at` needs is no longer kept.
pub async fn answer_as_of(
    served: Arc<Served>,
    view_idx: usize,
    q: &ViewQuery,
    at: Tick,
) -> Result<Answer, QueryError> {
    let Some((df, as_of, columns)) = travel(&served, view_idx, q, at).await? else {
        let q = q.clone();
        return tokio::task::spawn_blocking(move || served.query(view_idx, &q))
            .await
            .map_err(|e| QueryError::Other(e.to_string()))?;
    };
    Ok(Answer {
        columns,
        rows: rows_json(&df),
        as_of,
    })
}

/// [`answer_as_of`] as the rows `q` selects in the view's output schema (what the SQL
/// interface runs its statements over). Blocking: for a thread the runtime lent (SQL
/// statements run on one).
pub fn frame_as_of(
    served: &Arc<Served>,
    view_idx: usize,
    q: &ViewQuery,
    at: Tick,
) -> Result<(DataFrame, AsOf), QueryError> {
    match tokio::runtime::Handle::current().block_on(travel(served, view_idx, q, at))? {
        Some((df, as_of, _)) => Ok((df, as_of)),
        None => served.frame(view_idx, q),
    }
}

/// The rows `q` selects of the answer view `view_idx` served at `at`, the view's columns then,
/// and where they came from; `None` when `at` is not before the live answer (which is the one
/// to give).
async fn travel(
    served: &Served,
    view_idx: usize,
    q: &ViewQuery,
    at: Tick,
) -> Result<Option<(DataFrame, AsOf, Vec<String>)>, QueryError> {
    let rt = served.runtime.clone();
    let running = rt.plan();
    let name = running.pipeline().views[view_idx].name.clone();
    if at >= rt.tick() {
        check_filters(&running.pipeline().views[view_idx], q)?;
        return Ok(None);
    }
    let history = i64::try_from(served.history.as_millis()).unwrap_or(i64::MAX);
    let oldest = now_ms().saturating_sub(history);
    if at.ms < oldest {
        return Err(QueryError::Gone(format!(
            "as_of {} is older than serve.history allows (answers reach back to {})",
            format_ns(at.ns()),
            format_ms(oldest)
        )));
    }
    let internal = |e: anyhow::Error| QueryError::Other(format!("{e:#}"));
    let pipeline = rt.pipeline.name.clone();
    let db = rt.db().clone();
    let (publication, logic) = match db
        .served_at(&pipeline, &name, at.ns())
        .await
        .map_err(|e| internal(e.into()))?
    {
        None => (None, None),
        Some((install, found)) => {
            if let (Some(id), None) = (install.publication, &found) {
                return Err(QueryError::Gone(format!(
                    "the batch view served at {} (publication {id}) is no longer kept",
                    format_ns(at.ns())
                )));
            }
            (found, Some(install.logic_hash))
        }
    };
    // The definition the view had then: the one running, or the one a server recorded.
    let (plan, view_idx, lookups) = match logic {
        Some(l) if l != running.logic_hash(view_idx) => {
            let Some((plan, idx)) = recorded(served, &name, &l).await.map_err(internal)? else {
                return Err(QueryError::Gone(format!(
                    "view `{name}` was computed by another definition at {} that no server recorded; answers reach back to when its definition last changed",
                    format_ns(at.ns())
                )));
            };
            let lookups = Lookups::reader(plan.pipeline(), rt.lake());
            (plan, idx, Some(lookups))
        }
        _ => (running, view_idx, None),
    };
    let view = plan.pipeline().views[view_idx].clone();
    check_filters(&view, q)?;
    let batch = match &publication {
        Some(p) => Some(
            load_partials(&plan, rt.lake(), view_idx, p)
                .await
                .map_err(|e| {
                    QueryError::Gone(format!(
                        "the batch view served at {} (publication {}) is no longer in the lake: {e:#}",
                        format_ns(at.ns()),
                        p.id
                    ))
                })?,
        ),
        None => None,
    };
    let cutoff: BTreeMap<u32, u64> = publication
        .as_ref()
        .map(|p| p.cutoff.clone())
        .unwrap_or_default();
    // Of the things that happened in `at`'s millisecond up to it, the installs are recorded:
    // the rest are events.
    let installs = db
        .installs_between(&pipeline, at.ms.saturating_mul(1_000_000), at.ns())
        .await
        .map_err(|e| internal(e.into()))?;
    let events_in_ms = u64::try_from(at.n).unwrap_or(0).saturating_sub(installs);
    // Each segment with the versions it recorded, read as that definition defines them.
    let lookups = lookups.as_ref().unwrap_or(&rt.lookups);
    let read = read_since(&rt, served.token.as_deref(), &cutoff, at.ms, lookups)
        .await
        .map_err(internal)?;
    let stale = read.stale.clone();

    let q = q.clone();
    let horizon = publication.as_ref().and_then(|p| p.horizon_ms);
    let (df, mut as_of) = tokio::task::spawn_blocking(move || {
        let (mut rank, events_in_ms) = match read.earlier_in_ms {
            Some(earlier) => (earlier, events_in_ms),
            // Several partitions: the events of `at`'s millisecond are not in one order.
            None => (0, if events_in_ms > 0 { u64::MAX } else { 0 }),
        };
        recompute(
            &plan,
            view_idx,
            batch,
            horizon,
            &read.frames,
            &q,
            |p, events| logged_by(events, cut(&cutoff, p), at.ms, events_in_ms, &mut rank),
        )
    })
    .await
    .map_err(|e| QueryError::Other(e.to_string()))??;
    as_of.describe(at, publication.as_ref());
    as_of.stale = stale;
    served.with_verified(&mut as_of);
    Ok(Some((df, as_of, super::query::columns(&view))))
}

/// The definition of view `view` with logic `logic`, compiled from the pipeline file a server
/// recorded when it ran it, and the view's index there; `None` when none was recorded or it
/// no longer reads the archive as this pipeline writes it (another schema).
async fn recorded(
    served: &Served,
    view: &str,
    logic: &str,
) -> anyhow::Result<Option<(Arc<Plan>, usize)>> {
    let key = (view.to_string(), logic.to_string());
    if let Some(found) = served.recorded.lock().get(&key) {
        return Ok(Some(found.clone()));
    }
    let found = compile_recorded(served, view, logic).await?;
    if let Some(found) = &found {
        served.recorded.lock().insert(key, found.clone());
    }
    Ok(found)
}

/// [`recorded`], read from the state DB and compiled.
async fn compile_recorded(
    served: &Served,
    view: &str,
    logic: &str,
) -> anyhow::Result<Option<(Arc<Plan>, usize)>> {
    let rt = &served.runtime;
    let Some(text) = rt.db().definition(&rt.pipeline.name, view, logic).await? else {
        return Ok(None);
    };
    let root = served.root.clone().unwrap_or_default();
    let p = match crate::spec::pipeline_from_text(&root, &rt.pipeline.file, &text) {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(pipeline = %rt.pipeline.name, %view, error = %e, "a recorded definition no longer reads");
            return Ok(None);
        }
    };
    if p.schema != rt.pipeline.schema || p.paths != rt.pipeline.paths {
        return Ok(None);
    }
    let plan = Plan::compile(&p)?;
    let Some(idx) = p.views.iter().position(|v| v.name == view) else {
        return Ok(None);
    };
    Ok((plan.logic_hash(idx) == logic).then(|| (Arc::new(plan), idx)))
}

/// Records the definition of every view of `plan` — the text of its pipeline file in the
/// project in `root`, when it still defines them so — for `as_of` answers after the
/// definition changes. A failure is logged: those answers say the definition changed instead.
pub async fn record_definitions(db: &crate::state::State, root: &std::path::Path, plan: &Plan) {
    let p = plan.pipeline();
    let text = match std::fs::read_to_string(root.join(&p.file)) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(pipeline = %p.name, error = %e, "cannot read the pipeline's file to record its definition");
            return;
        }
    };
    // Edited since it was loaded: what it says now is not what runs.
    let same = crate::spec::pipeline_from_text(root, &p.file, &text)
        .ok()
        .and_then(|read| Plan::compile(&read).ok())
        .is_some_and(|read| {
            // By name: a promote that added views runs them after the others.
            read.pipeline().views.len() == p.views.len()
                && p.views.iter().enumerate().all(|(v, view)| {
                    read.pipeline()
                        .views
                        .iter()
                        .position(|w| w.name == view.name)
                        .is_some_and(|w| read.logic_hash(w) == plan.logic_hash(v))
                })
        });
    if !same {
        tracing::warn!(pipeline = %p.name, "the pipeline's file changed since it was loaded: its definition is not recorded, and `as_of` answers from before its next change will say the definition changed");
        return;
    }
    for (v, view) in p.views.iter().enumerate() {
        if let Err(e) = db
            .record_definition(&p.name, &view.name, &plan.logic_hash(v), &text)
            .await
        {
            tracing::warn!(pipeline = %p.name, view = %view.name, error = %e, "cannot record the view's definition: `as_of` answers from before its next change will say the definition changed");
        }
    }
}

/// The first position of partition `p` that `cutoff` does not cover.
pub(super) fn cut(cutoff: &BTreeMap<u32, u64>, p: u32) -> u64 {
    cutoff.get(&p).copied().unwrap_or(0)
}

/// The events at positions from `cutoff` on, partition by partition, each in position order,
/// each part with the lookup versions it was enriched with; and, for a pipeline with one
/// partition, how many events logged in millisecond `ms` lie before the first of them (with
/// several, the events of one millisecond are in no one order: `None`).
pub(super) struct Read {
    pub frames: Vec<(u32, DataFrame, LookupSet)>,
    pub earlier_in_ms: Option<u64>,
    /// On a node: partitions whose open segment could not be read (no live owner, or the
    /// owner did not answer): the answer holds their sealed events only, and says so.
    pub stale: Vec<u32>,
}

/// Reads the sealed segments holding positions from `cutoff` on and the open segments from
/// the logs — again when a segment is sealed meanwhile (its events leave the log) — each with
/// the lookup versions it recorded (an open segment: those it is enriched with), loaded by
/// `lookups`. On a node, the open segment of a partition another node runs is read from that
/// node's log (`speed::nodes::fetch_logged`, with `token`).
pub(super) async fn read_since(
    rt: &PipelineRuntime,
    token: Option<&str>,
    cutoff: &BTreeMap<u32, u64>,
    ms: i64,
    lookups: &Lookups,
) -> anyhow::Result<Read> {
    let mut last_err = None;
    // Only a node asks others for their logs.
    let client = rt.node().map(|_| reqwest::Client::new());
    'attempt: for _ in 0..ATTEMPTS {
        let owners = match rt.node() {
            Some(_) => Some(crate::speed::nodes::owners(rt.db(), rt).await?),
            None => None,
        };
        let mut stale = Vec::new();
        let segments = rt.db().segments(&rt.pipeline.name).await?;
        let mut partitions: Vec<u32> = segments.iter().map(|s| s.partition).collect();
        partitions.extend(rt.partitions());
        partitions.sort_unstable();
        partitions.dedup();
        let single = partitions.len() <= 1;
        let mut frames = Vec::new();
        let mut sets: BTreeMap<Option<String>, LookupSet> = BTreeMap::new();
        let mut earlier_in_ms = None;
        for p in partitions {
            let mut own: Vec<&Segment> = segments.iter().filter(|s| s.partition == p).collect();
            own.sort_by_key(|s| s.lo);
            let sealed_end = own.last().map_or(0, |s| s.hi);
            let foreign = owners.as_ref().zip(client.as_ref()).filter(|_| !rt.owns(p));
            let open_events = match foreign.map(|(o, client)| (o.get(&p), client)) {
                // No node runs it now (it is moving): its sealed events only.
                Some((None, _)) => {
                    stale.push(p);
                    None
                }
                Some((Some((listen, _)), client)) => {
                    use crate::speed::nodes::{FetchLogged, fetch_logged};
                    let name = &rt.pipeline.name;
                    match fetch_logged(client, listen, token, name, p, sealed_end).await {
                        Ok(events) => events,
                        Err(FetchLogged::Sealed) => {
                            last_err = Some(anyhow::anyhow!("partition {p} sealed meanwhile"));
                            continue 'attempt;
                        }
                        Err(FetchLogged::Other(e)) => {
                            tracing::debug!(pipeline = %name, partition = p, owner = %listen, error = %format!("{e:#}"), "reading another node's open segment failed");
                            stale.push(p);
                            None
                        }
                    }
                }
                None => match rt.logged(p, sealed_end) {
                    Ok(events) => events,
                    Err(e) => {
                        last_err = Some(e);
                        continue 'attempt;
                    }
                },
            };
            let first_frame = frames.len();
            let after: Vec<&Segment> = own
                .iter()
                .copied()
                .filter(|s| s.hi > cut(cutoff, p))
                .collect();
            for s in &after {
                frames.push((
                    p,
                    read_segment(rt.lake(), s).await?,
                    lookups_of(lookups, &mut sets, &s.lookups).await?,
                ));
            }
            if let (Some(events), Some(open)) = (open_events, rt.open_lookups(p)) {
                let set = lookups_of(lookups, &mut sets, &open.record()).await?;
                frames.push((p, events, set));
            }
            if !single {
                continue;
            }
            // Events of `ms` before the first one read count among its events too.
            let first = after.first().map_or(sealed_end, |s| s.lo);
            let mut earlier = 0;
            if frames
                .get(first_frame)
                .is_some_and(|(_, f, _)| first_arrival(f) == Some(ms))
            {
                let mut before: Vec<&&Segment> = own.iter().filter(|s| s.hi <= first).collect();
                before.sort_by_key(|s| std::cmp::Reverse(s.lo));
                for s in before {
                    let df = read_segment(rt.lake(), s).await?;
                    let arrivals = arrivals(&df)?;
                    earlier += arrivals.iter().filter(|a| **a == Some(ms)).count() as u64;
                    if arrivals.iter().any(|a| a.is_some_and(|a| a < ms)) {
                        break;
                    }
                }
            }
            earlier_in_ms = Some(earlier);
        }
        if single {
            earlier_in_ms.get_or_insert(0);
        }
        return Ok(Read {
            frames,
            earlier_in_ms,
            stale,
        });
    }
    Err(last_err
        .unwrap_or_else(|| anyhow::anyhow!("the archive kept changing"))
        .context("reading the events logged since the batch view's cutoff"))
}

/// `batch` ⊕ the partials of the events of `frames` that `keep` selects (frame by frame, each
/// partition's in position order), merged and finished by `plan` without the windows retired
/// at `horizon`: the rows `q` selects, and the figures of where they came from (the rest of
/// `as_of` is the caller's).
pub(super) fn recompute(
    plan: &Plan,
    view_idx: usize,
    batch: Option<DataFrame>,
    horizon: Option<i64>,
    frames: &[(u32, DataFrame, LookupSet)],
    q: &ViewQuery,
    mut keep: impl FnMut(u32, &DataFrame) -> PolarsResult<BooleanChunked>,
) -> PolarsResult<(DataFrame, AsOf)> {
    let mut as_of = AsOf {
        batch_rows: batch.as_ref().map_or(0, |b| b.height() as u64),
        ..AsOf::default()
    };
    let mut partials: Vec<DataFrame> = batch.into_iter().collect();
    let mut kept = Vec::new();
    for (partition, events, lookups) in frames {
        let k = events.filter(&keep(*partition, events)?)?;
        let offsets = k.column(OFFSET_COLUMN)?.cast(&DataType::Int64)?;
        if let Some(last) = offsets.i64()?.max() {
            let end = as_of.positions.entry(*partition).or_default();
            *end = (*end).max(u64::try_from(last + 1).unwrap_or(0));
        }
        if k.height() > 0 {
            as_of.speed_segments += 1;
            as_of.speed_events += k.height() as u64;
            kept.push((k, lookups.clone()));
        }
    }
    for (events, lookups) in runs_alike(kept) {
        let part = plan
            .partials_masked(events, &lookups)?
            .parts
            .swap_remove(view_idx);
        as_of.speed_rows += part.height() as u64;
        partials.push(part);
    }
    let all_time = plan.pipeline().views[view_idx].window == Window::All;
    let df = match finish(plan, view_idx, partials, horizon)? {
        Some(df) => filter(df, q, all_time)?,
        None => DataFrame::empty_with_schema(&plan.output_schema(view_idx)),
    };
    Ok((df, as_of))
}

impl AsOf {
    /// Says the answer stands for instant `at` and came from `publication` (with the speed
    /// figures already in), computed now.
    pub(super) fn describe(&mut self, at: Tick, publication: Option<&Publication>) {
        self.at = format_ns(at.ns());
        self.batch_run = publication.map(|p| p.run_id.to_string());
        self.batch_cutoff = publication.map(|p| p.cutoff.clone()).unwrap_or_default();
        for (p, cutoff) in &self.batch_cutoff {
            let end = self.positions.entry(*p).or_default();
            *end = (*end).max(*cutoff);
        }
        self.batch_published_at = publication.map(|p| format_ms(p.published_at.timestamp_millis()));
        self.computed_at = format_ms(now_ms());
    }
}

/// Consecutive frames enriched alike, stacked into one chunk: the partials of the same events
/// are computed alike however sealing split them into segments (float sums added in one
/// order), so asking for one instant again does not depend on what was sealed meanwhile.
pub(super) fn runs_alike(frames: Vec<(DataFrame, LookupSet)>) -> Vec<(DataFrame, LookupSet)> {
    let mut out: Vec<(DataFrame, LookupSet)> = Vec::new();
    for (df, set) in frames {
        if let Some((last, last_set)) = out.last_mut()
            && last_set.record() == set.record()
            && let Some(df) = like(last, &df)
            && last.vstack_mut(&df).is_ok()
        {
            continue;
        }
        out.push((df, set));
    }
    // One chunk each: polars sums chunk by chunk, so the chunks must not depend on sealing.
    for (df, _) in &mut out {
        df.rechunk_mut();
    }
    out
}

/// `df` with the columns of `like` in their types (a segment read back from Parquet and the
/// log's events decoded may differ in a type's details); `None` when its columns differ.
fn like(like: &DataFrame, df: &DataFrame) -> Option<DataFrame> {
    if like.get_column_names() != df.get_column_names() {
        return None;
    }
    let columns = like
        .columns()
        .iter()
        .map(|c| df.column(c.name()).ok()?.cast(c.dtype()).ok())
        .collect::<Option<Vec<Column>>>()?;
    DataFrame::new(df.height(), columns).ok()
}

/// The versions `record` names (a segment's manifest row's, or an open segment's), loaded by
/// `lookups` once per record.
async fn lookups_of(
    lookups: &Lookups,
    sets: &mut BTreeMap<Option<String>, LookupSet>,
    record: &Option<String>,
) -> anyhow::Result<LookupSet> {
    if let Some(set) = sets.get(record) {
        return Ok(set.clone());
    }
    let set = lookups.recorded(record.as_deref()).await?;
    sets.insert(record.clone(), set.clone());
    Ok(set)
}

fn arrivals(df: &DataFrame) -> PolarsResult<Vec<Option<i64>>> {
    let c = df.column(ARRIVAL_COLUMN)?.cast(&DataType::Int64)?;
    Ok(c.i64()?.iter().collect())
}

fn first_arrival(df: &DataFrame) -> Option<i64> {
    arrivals(df).ok()?.first().copied().flatten()
}

/// Which of `events` (in position order) were logged by the instant of the `events_in_ms`-th
/// event of millisecond `ms` and are not covered (position `cutoff` and after); `rank` counts
/// the events of `ms` seen so far, across calls.
pub(super) fn logged_by(
    events: &DataFrame,
    cutoff: u64,
    ms: i64,
    events_in_ms: u64,
    rank: &mut u64,
) -> PolarsResult<BooleanChunked> {
    let offsets = events.column(OFFSET_COLUMN)?.cast(&DataType::Int64)?;
    let mut keep = Vec::with_capacity(events.height());
    for (arrival, offset) in arrivals(events)?.into_iter().zip(offsets.i64()?.iter()) {
        let by_then = match arrival {
            Some(a) if a < ms => true,
            Some(a) if a == ms => {
                *rank += 1;
                *rank <= events_in_ms
            }
            _ => false,
        };
        let uncovered = offset.is_some_and(|o| o >= cutoff as i64);
        keep.push(by_then && uncovered);
    }
    Ok(BooleanChunked::from_slice("keep".into(), &keep))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_count_by_their_place_in_their_millisecond() {
        let df = df!(
            ARRIVAL_COLUMN => [5i64, 6, 6, 6, 7],
            OFFSET_COLUMN => [10i64, 11, 12, 13, 14],
        )
        .unwrap();
        // Two of millisecond 6's events were logged by then; one more came before this frame.
        let mut rank = 1;
        let keep = logged_by(&df, 0, 6, 3, &mut rank).unwrap();
        let keep: Vec<bool> = keep.iter().map(|k| k == Some(true)).collect();
        assert_eq!(keep, [true, true, true, false, false]);
        assert_eq!(rank, 4);
        // Covered positions are the batch view's.
        let mut rank = 0;
        let keep = logged_by(&df, 12, 7, 0, &mut rank).unwrap();
        let keep: Vec<bool> = keep.iter().map(|k| k == Some(true)).collect();
        assert_eq!(keep, [false, false, true, true, false]);
    }
}
