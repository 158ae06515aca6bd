//! Promote (blue/green): the definition of a pipeline's views in pipelines/ becomes the one
//! served. Every view whose definition there differs from the one served switches to a
//! version computed by the new definition — its candidate (`run --candidate`), or a current
//! version a run with the edited YAML already published — in ONE compare-and-set of the
//! state DB, like a publish; the candidates are forgotten in the same transaction.
//!
//! A running server switches in place ([`promote`]): its speed layer computes the partials of
//! what the new versions do not cover by the new definition beside the state it serves, then
//! installs them, the new versions and the definition under one lock
//! ([`PipelineRuntime::switch`]); ingest waits in the log meanwhile, answers are the old
//! definition's until then and the new one's after, never a mix, and its workflows' batch
//! runs compute the new definition from then on. In place means the same source, schema,
//! lookups, archive and dedupe settings, no view removed, and for views with sinks the same
//! sinks and served columns (an added view has none); views may change and be added (they run
//! after the others: [`in_place`]). Anything else takes a restart (promote without a server
//! running, [`promote_stored`], then `serve`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::pickup::batch_view;
use super::query::Served;
use crate::clock::{format_ns, now_ms};
use crate::plan::Plan;
use crate::spec::Pipeline;
use crate::speed::partials::Snapshot;
use crate::speed::runtime::{Serve, Switched};
use crate::state::{Cause, Install, LedgerEntry, Publication, PublicationId, State, StateError};

/// Why a promote did nothing.
#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    /// Nothing to promote, or not what this definition needs (HTTP 409).
    #[error("{0}")]
    Conflict(String),
    /// The state DB, the lake or the speed layer failed (HTTP 500); nothing changed.
    #[error("promote failed: {0}")]
    Other(String),
}

/// Where a promoted view's new version comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// Its candidate (`run --candidate`).
    Candidate,
    /// The current version: a run with the edited definition published it.
    Current,
    /// No batch version: the speed layer computes it from the archive.
    Speed,
}

/// What a promote does to one view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    pub view: String,
    #[serde(skip)]
    pub index: usize,
    pub from: Origin,
    /// The version it serves from the promote on (`None`: the speed layer alone).
    #[serde(skip)]
    pub publication: Option<Publication>,
    /// The current version the switch replaces.
    #[serde(skip)]
    pub expected: Option<PublicationId>,
    /// The run that computed it, when from a batch run.
    pub run: Option<String>,
}

/// A promote's outcome.
#[derive(Debug, Serialize, Deserialize)]
pub struct Promoted {
    pub pipeline: String,
    pub views: Vec<Step>,
    /// The instant the server switched (RFC 3339, to the nanosecond); `None` without a server.
    pub at: Option<String>,
    /// On nodes: each other live node and how its switch went (`switched`, or the error).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub nodes: BTreeMap<String, String>,
}

fn other(e: impl std::fmt::Display) -> PromoteError {
    PromoteError::Other(e.to_string())
}

/// A promote that raced a publish is the user's to retry, not a failure.
fn state_error(e: StateError) -> PromoteError {
    match e {
        StateError::PublicationRaced { view, .. } => PromoteError::Conflict(format!(
            "a batch run published view `{view}` while promoting; nothing was switched: promote again"
        )),
        e => other(e),
    }
}

/// The steps that make `plan` (the edited definition) served: one per view whose definition
/// differs from `running`'s (the server's), or — without a server — from its current
/// version's. A changed view needs a version by the new definition, unless it has none to
/// replace and a server computes it from the archive.
pub async fn steps(
    db: &State,
    plan: &Plan,
    running: Option<&Plan>,
) -> Result<Vec<Step>, PromoteError> {
    let pipeline = &plan.pipeline().name;
    let mut steps = Vec::new();
    let mut missing = Vec::new();
    for (index, view) in plan.pipeline().views.iter().enumerate() {
        let new = plan.logic_hash(index);
        let current = db
            .current_publication(pipeline, &view.name)
            .await
            .map_err(other)?;
        let candidate = db.candidate(pipeline, &view.name).await.map_err(other)?;
        let changed = match (running, &current) {
            // By name: a view new to the server has changed.
            (Some(r), _) => r
                .pipeline()
                .views
                .iter()
                .position(|v| v.name == view.name)
                .is_none_or(|i| r.logic_hash(i) != new),
            (None, Some(c)) => c.logic_hash != new,
            (None, None) => candidate.is_some(),
        };
        if !changed {
            continue;
        }
        let expected = current.as_ref().map(|c| c.id);
        let (from, publication) = match (current, candidate) {
            (Some(c), _) if c.logic_hash == new => (Origin::Current, Some(c)),
            (_, Some(c)) if c.publication.logic_hash == new => {
                (Origin::Candidate, Some(c.publication))
            }
            (None, None) if running.is_some() => (Origin::Speed, None),
            _ => {
                missing.push(view.name.clone());
                continue;
            }
        };
        steps.push(Step {
            view: view.name.clone(),
            index,
            from,
            run: publication.as_ref().map(|p| p.run_id.to_string()),
            publication,
            expected,
        });
    }
    if !missing.is_empty() {
        return Err(PromoteError::Conflict(format!(
            "view(s) {} of `{pipeline}` are defined differently in pipelines/ than they are served, and have no candidate computed by that definition: `lambda-ctl run {pipeline} --candidate` computes them, then promote",
            missing.join(", ")
        )));
    }
    if steps.is_empty() {
        return Err(PromoteError::Conflict(format!(
            "pipelines/ defines the views of `{pipeline}` as they are served: nothing to promote (`lambda-ctl discard {pipeline}` forgets candidates of other definitions)"
        )));
    }
    Ok(steps)
}

/// Promotes in the state DB alone, when no server runs: the next `serve` runs the definition
/// in pipelines/ and serves the promoted versions.
pub async fn promote_stored(db: &State, plan: &Plan) -> Result<Promoted, PromoteError> {
    let steps = steps(db, plan, None).await?;
    let name = plan.pipeline().name.clone();
    db.promote(&name, &switches(&steps))
        .await
        .map_err(state_error)?;
    Ok(Promoted {
        pipeline: name,
        views: steps,
        at: None,
        nodes: BTreeMap::new(),
    })
}

fn switches(steps: &[Step]) -> Vec<(String, Option<PublicationId>, PublicationId)> {
    steps
        .iter()
        .filter_map(|s| {
            let p = s.publication.as_ref()?;
            Some((s.view.clone(), s.expected, p.id))
        })
        .collect()
}

/// Who runs a promote on nodes (`serve --node`), where every node serves the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// The node asked: it switches, commits the new versions and records what the views serve
    /// from now on and the rows restated; then the other live nodes follow ([`followers`]).
    Lead,
    /// Another node led, switching its views to these logic hashes (by view name): this one
    /// switches to the same definition — which its pipelines/ must hold — and records
    /// nothing (the versions are current already); a node that runs it has nothing to do.
    Follow(BTreeMap<String, String>),
}

/// The logic hash of each view of `plan`, by name.
fn hashes(plan: &Plan) -> BTreeMap<String, String> {
    let views = &plan.pipeline().views;
    (0..views.len())
        .map(|i| (views[i].name.clone(), plan.logic_hash(i)))
        .collect()
}

/// Promotes the definition in pipelines/ on the running server `served` (see the module docs).
pub async fn promote(served: &Served, role: Role) -> Result<Promoted, PromoteError> {
    let rt = served.runtime.clone();
    let root = served
        .root
        .clone()
        .ok_or_else(|| other("the server has no project directory"))?;
    // No batch run of this server's workflows computes meanwhile, and no other promote.
    let switching = rt.switching();
    let _switching = switching.lock().await;
    let running = rt.plan();
    let plan = edited(root.clone(), rt.pipeline.name.clone())
        .await
        .map_err(other)?
        .map_err(PromoteError::Conflict)?;
    let plan = in_place(&running, &plan).map_err(|why| {
        PromoteError::Conflict(format!(
            "cannot switch `{}` in place: {why}. Stop the server, run `lambda-ctl promote {}` and start it again",
            plan.pipeline().name,
            plan.pipeline().name
        ))
    })?;
    let plan = Arc::new(plan);
    if let Role::Follow(led) = &role {
        if hashes(&running) == *led {
            return Ok(Promoted {
                pipeline: plan.pipeline().name.clone(),
                views: Vec::new(),
                at: None,
                nodes: BTreeMap::new(),
            });
        }
        if hashes(&plan) != *led {
            return Err(PromoteError::Conflict(format!(
                "pipelines/ on this node defines the views of `{}` differently from the node that promoted them: deploy the same pipelines/ to every node, then promote again",
                plan.pipeline().name
            )));
        }
    }
    let steps = steps(rt.db(), &plan, Some(&running)).await?;
    let mut serve: Vec<Serve> = plan.pipeline().views.iter().map(|_| Serve::Keep).collect();
    for s in &steps {
        let batch = match &s.publication {
            Some(p) => Some(
                batch_view(&plan, rt.lake(), s.index, p)
                    .await
                    .map_err(|e| other(format!("{e:#}")))?,
            ),
            None => None,
        };
        serve[s.index] = Serve::Batch(batch);
    }
    let (db, name, switches) = (
        rt.db().clone(),
        plan.pipeline().name.clone(),
        switches(&steps),
    );
    let commit = Box::pin(async move { Ok(db.promote(&name, &switches).await?) });
    let switched = rt.switch(plan.clone(), serve, commit).await.map_err(|e| {
        match e.downcast::<StateError>() {
            Ok(e) => state_error(e),
            Err(e) => other(format!("{e:#}")),
        }
    })?;
    let at = switched.at;
    let pipeline = plan.pipeline().name.clone();
    if matches!(role, Role::Follow(_)) {
        tracing::info!(%pipeline, views = steps.len(), "followed another node's promote: the views run the definition in pipelines/");
        return Ok(Promoted {
            pipeline,
            views: steps,
            at: Some(format_ns(at.ns())),
            nodes: BTreeMap::new(),
        });
    }
    // What the views serve from now on, for `as_of` answers (a failure loses the record, not
    // the switch: answers before it say the definition changed).
    let installs: Vec<Install> = steps
        .iter()
        .map(|s| Install {
            pipeline: pipeline.clone(),
            view: s.view.clone(),
            at_ns: at.ns(),
            publication: s.publication.as_ref().map(|p| p.id),
            logic_hash: plan.logic_hash(s.index),
        })
        .collect();
    super::travel::record_definitions(rt.db(), &root, &plan).await;
    if let Err(e) = rt.db().record_served(&installs).await {
        tracing::error!(%pipeline, error = %e, "promoted, but cannot record what the views serve from now on: `as_of` answers between now and the next install say the definition changed");
    }
    for s in &steps {
        tracing::info!(%pipeline, view = %s.view, from = ?s.from, run = ?s.run, "promoted: the view runs the definition in pipelines/");
    }
    // The rows the new definition changed go to the restatement ledger, as a publication's.
    match restated(&steps, switched).await {
        Ok(entries) if entries.is_empty() => {}
        Ok(entries) => {
            if let Err(e) = rt.db().record_restated(&entries).await {
                tracing::error!(%pipeline, error = %e, entries = entries.len(), "promoted, but cannot record the rows it restated in the ledger");
            }
        }
        Err(e) => {
            tracing::error!(%pipeline, error = %format!("{e:#}"), "promoted, but cannot tell which rows it restated: they are missing from the restatement ledger (a bug: report it with this error; the answers are unaffected)");
        }
    }
    Ok(Promoted {
        pipeline,
        views: steps,
        at: Some(format_ns(at.ns())),
        nodes: BTreeMap::new(),
    })
}

/// The path of the internal endpoint that makes a node follow a promote.
pub fn follow_path(pipeline: &str) -> String {
    format!("/v1/internal/pipelines/{pipeline}/promote")
}

/// After node `node` led a promote of `served`'s pipeline: asks every other live node to
/// follow (with `token`; the body: the views' logic hashes by name, [`Role::Follow`]), so
/// every node answers by the same definition — a node left on the
/// old one would refuse the others' open segments and answer those partitions as stale. Each
/// node's outcome: `switched`, `already switched`, or why not (it then runs the new
/// definition once restarted; its answers name the partitions it cannot mirror meanwhile).
pub async fn followers(
    served: &Served,
    node: &str,
    token: Option<&str>,
) -> BTreeMap<String, String> {
    let pipeline = served.runtime.pipeline.name.clone();
    let led = hashes(&served.runtime.plan());
    let db = served.runtime.db();
    let nodes = match crate::speed::nodes::overview(db, [pipeline.as_str()], now_ms()).await {
        Ok(nodes) => nodes,
        Err(e) => return BTreeMap::from([("*".to_string(), format!("listing the nodes: {e}"))]),
    };
    let client = reqwest::Client::new();
    let asks = nodes
        .into_iter()
        .filter(|n| n.alive && n.name != node)
        .map(|n| {
            let mut req = client
                .post(format!("{}{}", n.listen, follow_path(&pipeline)))
                .json(&led)
                .timeout(FOLLOW_TIMEOUT);
            if let Some(token) = token {
                req = req.bearer_auth(token);
            }
            async move {
                let outcome = match req.send().await {
                    Ok(resp) if resp.status().is_success() => match resp.json::<Promoted>().await {
                        Ok(p) if p.views.is_empty() => "already switched".to_string(),
                        Ok(_) => "switched".to_string(),
                        Err(e) => format!("unreadable answer: {e}"),
                    },
                    Ok(resp) => {
                        let status = resp.status();
                        format!("{status}: {}", resp.text().await.unwrap_or_default())
                    }
                    Err(e) => format!("unreachable: {e}"),
                };
                (n.name, outcome)
            }
        });
    let outcomes: BTreeMap<String, String> =
        futures::future::join_all(asks).await.into_iter().collect();
    for (name, outcome) in &outcomes {
        if outcome != "switched" && outcome != "already switched" {
            tracing::warn!(%pipeline, node = %name, %outcome, "a node did not follow the promote; it runs the new definition once restarted");
        }
    }
    outcomes
}

/// How long a node may take to follow a promote (it computes the open segments' partials by
/// the new definition first).
const FOLLOW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);

/// The ledger entries of the rows each promoted view's answer changed at the switch: its
/// answer by the old definition just before against the new one's just after.
async fn restated(steps: &[Step], switched: Switched) -> anyhow::Result<Vec<LedgerEntry>> {
    let plan = switched
        .changed
        .first()
        .map(|(_, _, after)| after.plan.clone());
    let Some(plan) = plan else {
        return Ok(Vec::new());
    };
    let old = switched.old;
    let causes: Vec<Option<(String, Cause)>> = switched
        .changed
        .iter()
        .map(|(v, _, _)| {
            let step = steps.iter().find(|s| s.index == *v)?;
            let p = step.publication.as_ref()?;
            let cause = Cause::Publication {
                run_id: p.run_id,
                publication: p.id,
            };
            Some((step.view.clone(), cause))
        })
        .collect();
    let changed = switched.changed;
    let pipeline = plan.pipeline().name.clone();
    tokio::task::spawn_blocking(move || {
        let at = now_ms();
        let mut out = Vec::new();
        for ((v, before, after), cause) in changed.into_iter().zip(causes) {
            // A view the speed layer computes alone has no publication to name as the cause.
            let Some((view, cause)) = cause else { continue };
            let horizon = |s: &Snapshot| s.batch.as_ref().and_then(|b| b.horizon_ms);
            let (hb, ha) = (horizon(&before), horizon(&after));
            let rows = plan.changed_from(v, (&old, &before.frames(), hb), (&after.frames(), ha))?;
            let names = (pipeline.as_str(), view.as_str());
            out.extend(
                rows.into_iter()
                    .map(|r| LedgerEntry::of(names, cause, r, at)),
            );
        }
        Ok(out)
    })
    .await?
}

/// The pipeline `name` as pipelines/ in `root` defines it now, compiled; why not, if it does
/// not (the project no longer loads, or has no such pipeline).
pub(super) async fn edited(root: PathBuf, name: String) -> anyhow::Result<Result<Plan, String>> {
    Ok(tokio::task::spawn_blocking(move || {
        let project = crate::spec::load(&root)
            .map_err(|e| format!("the project in pipelines/ no longer loads: {e}"))?;
        let p = project
            .pipeline(&name)
            .ok_or_else(|| format!("pipeline `{name}` is no longer in pipelines/"))?;
        Plan::compile(p).map_err(|e| format!("{e:#}"))
    })
    .await?)
}

/// The definition a server running `running` switches to for `new` (the edited one): its
/// views are the running ones in their order — a view's index never changes while a server
/// runs — then the added ones in file order. Why it cannot switch in place, if it cannot.
pub fn in_place(running: &Plan, new: &Plan) -> Result<Plan, String> {
    let (a, b) = (running.pipeline(), new.pipeline());
    let differs: Vec<&str> = [
        ("source", a.source != b.source || a.format != b.format),
        ("schema", a.schema != b.schema || a.paths != b.paths),
        ("event_time", a.event_time != b.event_time),
        (
            "event_id",
            a.event_id != b.event_id || a.dedupe_window != b.dedupe_window,
        ),
        ("lookups", a.lookups != b.lookups),
        ("archive", a.archive != b.archive),
        (
            "partitions",
            a.partitions != b.partitions || a.partition_key != b.partition_key,
        ),
    ]
    .into_iter()
    .filter_map(|(what, differs)| differs.then_some(what))
    .collect();
    if !differs.is_empty() {
        return Err(format!("its {} changed", differs.join(", ")));
    }
    let index = |p: &Pipeline, name: &str| p.views.iter().position(|v| v.name == name);
    let mut views = Vec::with_capacity(b.views.len());
    for (i, va) in a.views.iter().enumerate() {
        let Some(j) = index(b, &va.name) else {
            return Err(format!("view `{}` was removed", va.name));
        };
        let vb = &b.views[j];
        if va.sinks != vb.sinks {
            return Err(format!("the sinks of view `{}` changed", va.name));
        }
        if !va.sinks.is_empty() && running.output_schema(i) != new.output_schema(j) {
            return Err(format!(
                "view `{}` has sinks and its columns changed",
                va.name
            ));
        }
        views.push(vb.clone());
    }
    for vb in b.views.iter().filter(|v| index(a, &v.name).is_none()) {
        if !vb.sinks.is_empty() {
            return Err(format!("the added view `{}` has sinks", vb.name));
        }
        views.push(vb.clone());
    }
    let arranged = Pipeline { views, ..b.clone() };
    Plan::compile(&arranged).map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(yaml: &str) -> Plan {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("pipelines")).unwrap();
        std::fs::write(dir.path().join("pipelines/orders.yaml"), yaml).unwrap();
        let project = crate::spec::load(dir.path()).expect("valid spec");
        Plan::compile(project.pipeline("orders").unwrap()).unwrap()
    }

    const BASE: &str = "
name: orders
source:
  type: http
format: json
schema:
  ts: timestamp
  country: string
  amount: float
event_time: ts
views:
  - name: by_country
    group_by: [country]
    window: 1m
    metrics:
      n: count()
      total: sum(amount)
  - name: overall
    window: all
    metrics:
      n: count()
";

    #[test]
    fn a_server_switches_view_definitions_in_place_and_nothing_else() {
        let running = plan(BASE);
        let names = |p: &Plan| {
            p.pipeline()
                .views
                .iter()
                .map(|v| v.name.clone())
                .collect::<Vec<_>>()
        };
        // A window, a metric, a filter: in place, each view where it was.
        for edit in [
            BASE.replace("window: 1m", "window: 2m"),
            BASE.replace(
                "total: sum(amount)",
                "total: sum(amount)\n      big: max(amount)",
            ),
            BASE.replace("event_time: ts", "event_time: ts\nfilter: amount > 0"),
        ] {
            let switched = in_place(&running, &plan(&edit)).unwrap();
            assert_eq!(names(&switched), ["by_country", "overall"], "{edit}");
        }
        // An added view runs after the running ones, wherever the file has it; a running
        // view's index never changes.
        let added = BASE.replace(
            "views:\n",
            "views:\n  - name: first\n    window: 5m\n    metrics:\n      n: count()\n",
        );
        let switched = in_place(&running, &plan(&added)).unwrap();
        assert_eq!(names(&switched), ["by_country", "overall", "first"]);
        assert_eq!(
            switched.logic_hash(0),
            running.logic_hash(0),
            "the same view, the same logic"
        );
        // A view removed; the schema; the format: a restart.
        let why = in_place(&running, &plan(&BASE.replace("name: overall", "name: all")));
        assert_eq!(why.err().as_deref(), Some("view `overall` was removed"));
        let why = in_place(
            &running,
            &plan(&BASE.replace("amount: float", "amount: float\n  page: string")),
        );
        assert_eq!(why.err().as_deref(), Some("its schema changed"));
        let why = in_place(
            &running,
            &plan(&BASE.replace("format: json", "format: csv")),
        );
        assert_eq!(why.err().as_deref(), Some("its source changed"));
    }
}
