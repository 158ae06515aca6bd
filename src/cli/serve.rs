//! `lambda-ctl serve`: the speed layer for every pipeline, its sources, the views' sinks, the
//! scheduler and workers of the workflows, the HTTP API, and SQL over the PostgreSQL wire
//! protocol when `serve.sql` is set.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::CliError;
use crate::lake::Lake;
use crate::orchestration::fanout::{Groups, Help};
use crate::orchestration::layers::Layers;
use crate::orchestration::{Orchestrator, api, overview};
use crate::plan::Plan;
use crate::serving::app::App;
use crate::serving::metrics::Ops;
use crate::serving::pickup::Pickup;
use crate::serving::query::Served;
use crate::serving::{self, server, sink};
use crate::speed::nodes::{HANDOVER, Keeper, Mirror};
use crate::speed::runtime::PipelineRuntime;
use crate::state::State;
use crate::{sources, spec};

/// How long shutdown waits for a sink's delivery under way.
const SINK_STOP: std::time::Duration = std::time::Duration::from_secs(10);

pub fn run(
    project_dir: &Path,
    listen: Option<SocketAddr>,
    node: Option<String>,
) -> Result<(), CliError> {
    let project = super::load_project(project_dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(project, listen, node))
}

async fn serve(
    project: spec::Project,
    listen: Option<SocketAddr>,
    node: Option<String>,
) -> Result<(), CliError> {
    let project = Arc::new(project);
    let settings = &project.settings;
    let state_dir = project.root.join(".lambda");
    let db = State::open(&settings.state)
        .await
        .with_context(|| format!("opening the state DB {}", redact(&settings.state)))?;
    let lake = Lake::open(&settings.lake, &settings.lake_options)
        .with_context(|| format!("opening the lake {}", redact(&settings.lake)))?;
    let shutdown = CancellationToken::new();

    // Nodes of one project directory (several on one machine) keep their logs apart.
    let log_dir = match &node {
        Some(name) => state_dir.join("nodes").join(name).join("log"),
        None => state_dir.join("log"),
    };
    let mut pipelines = BTreeMap::new();
    for p in &project.pipelines {
        let plan = Plan::compile(p).with_context(|| format!("compiling pipeline `{}`", p.name))?;
        let rt = PipelineRuntime::start_on(
            node.clone(),
            Arc::new(p.clone()),
            Arc::new(plan),
            db.clone(),
            lake.clone(),
            settings.lake_options.clone(),
            &log_dir,
            shutdown.clone(),
        )
        .await
        .with_context(|| format!("starting pipeline `{}`", p.name))?;
        // What its views are, for `as_of` answers after a change of definition.
        crate::serving::travel::record_definitions(&db, &project.root, &rt.plan()).await;
        sources::spawn(rt.clone(), &project.root, &state_dir, shutdown.clone())
            .map_err(|e| CliError::User(format!("{e:#}")))?;
        // Serve the published batch views from the start, then follow new publications.
        let mut pickup =
            Pickup::new(rt.clone(), db.clone(), lake.clone()).with_history(settings.serve.history);
        pickup.poll().await;
        tokio::spawn(pickup.run(shutdown.clone()));
        pipelines.insert(
            p.name.clone(),
            Arc::new(
                Served::new(rt)
                    .with_history(settings.serve.history)
                    .with_root(project.root.clone())
                    .with_token(settings.serve.token.clone()),
            ),
        );
    }
    // Sinks: a destination that cannot take its view stops the start; one that is down is
    // retried in the background.
    let sink_ctx = sink::Context {
        lake: lake.clone(),
        lake_url: settings.lake.clone(),
        lake_options: settings.lake_options.clone(),
    };
    let sinks = match sink::start_all(&pipelines, &sink_ctx, &shutdown).await {
        Ok(s) => s,
        Err(e) => {
            shutdown.cancel();
            return Err(CliError::User(e));
        }
    };

    // Scheduler (one active per state DB) and workers for the workflows.
    // Its batch tasks' jobs go to the batch job worker below (and any `lambda-ctl worker`).
    // Its tasks, and the batch jobs it works, compute the definitions the pipelines run.
    let runtimes: BTreeMap<_, _> = pipelines
        .iter()
        .map(|(name, s)| (name.clone(), s.runtime.clone()))
        .collect();
    let layers = Arc::new(
        Layers::new(project.clone(), db.clone(), lake.clone())
            .helping(Help::No)
            .serving(runtimes.clone()),
    );
    let (orchestrator, running) =
        Orchestrator::start_all(project.clone(), db.clone(), layers, shutdown.clone())
            .await
            .context("starting the scheduler and workers")?;
    // Scaled-out batch runs' jobs, one at a time (serving comes first): a run whose own process
    // died is finished here even where no `lambda-ctl worker` runs.
    let batch_jobs = Groups::open(&db)
        .await
        .context("opening the batch job queue")?
        .serving(runtimes)
        .work(
            project.clone(),
            db.clone(),
            lake.clone(),
            format!("lambda-ctl-serve:{}", std::process::id()),
            1,
            shutdown.clone(),
        );

    let addr: SocketAddr = match listen {
        Some(a) => a,
        None => settings
            .serve
            .listen
            .parse()
            .with_context(|| format!("invalid listen address {}", settings.serve.listen))?,
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        CliError::User(format!(
            "cannot listen on {addr}: {e} (is another `lambda-ctl serve` running? use --listen)"
        ))
    })?;
    let local = listener
        .local_addr()
        .context("reading the listen address")?;
    // The PostgreSQL wire protocol (`serve.sql`), off unless set.
    if let Some(sql) = &settings.serve.sql {
        let engine = Arc::new(crate::serving::sql::Engine::new(
            pipelines.clone(),
            sql.clone(),
            settings.serve.token.clone(),
        ));
        let sql_listener = tokio::net::TcpListener::bind(&sql.listen)
            .await
            .map_err(|e| {
                CliError::User(format!(
                    "cannot listen on {} (serve.sql.listen): {e}",
                    sql.listen
                ))
            })?;
        let sql_local = sql_listener
            .local_addr()
            .context("reading the SQL listen address")?;
        if settings.serve.token.is_none() && !sql_local.ip().is_loopback() {
            tracing::warn!(
                address = %sql_local,
                "SQL listening beyond loopback without `serve.token`: anyone who can reach this address can read every view; set `serve.token` (then it is the password)"
            );
        }
        tracing::info!(address = %sql_local, "serving SQL");
        // Tests and scripts read the SQL address from this line (printed before the HTTP one).
        println!("lambda-ctl SQL on postgres://{sql_local}");
        tokio::spawn(crate::serving::sql::serve(
            sql_listener,
            engine,
            shutdown.clone(),
        ));
    }
    let app = Arc::new(App {
        pipelines,
        token: settings.serve.token.clone(),
        max_body_bytes: settings.serve.max_body_bytes,
        ops: Ops {
            sinks: sinks.statuses.clone(),
            ..ops(&project, &db)
        },
    });
    let router = serving::router(app.clone(), api::routes(orchestrator));
    tracing::info!(
        address = %local,
        pipelines = project.pipelines.len(),
        workflows = project.workflows.len(),
        "serving"
    );
    if app.token.is_none() && !local.ip().is_loopback() {
        tracing::warn!(
            address = %local,
            "listening beyond loopback without `serve.token`: anyone who can reach this address can ingest, query and start runs; set `serve.token` (requests naming this server by a DNS name are refused until then)"
        );
    }
    // A node takes its share of the partitions once it can answer.
    let handover = CancellationToken::new();
    let keeper = node.as_ref().map(|name| {
        let runtimes: Vec<_> = app.pipelines.values().map(|s| s.runtime.clone()).collect();
        // Fresh events of the partitions other nodes run, in this node's answers.
        for rt in &runtimes {
            let mirror = Mirror::new(rt.clone(), db.clone(), app.token.clone());
            tokio::spawn(mirror.run(shutdown.clone()));
        }
        let keeper = Keeper::new(name, &advertised(local), db.clone(), runtimes);
        tokio::spawn(keeper.run(handover.clone()))
    });
    // Tests and scripts read the bound address from this line.
    println!("lambda-ctl serving on http://{local}");

    let stop = shutdown.clone();
    server::serve(listener, router, async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        // A node hands its partitions over (sealed) while it still answers.
        handover.cancel();
        if let Some(keeper) = keeper
            && tokio::time::timeout(HANDOVER, keeper).await.is_err()
        {
            tracing::warn!(
                "handing partitions over took longer than {HANDOVER:?}; stopping anyway"
            );
        }
        stop.cancel();
    })
    .await
    .context("HTTP server failed")?;
    // Running task attempts see the shutdown and stop; the scheduler gives up its lock.
    running.join().await;
    let _ = batch_jobs.await;
    // A sink finishes the delivery under way (bounded by its own timeouts).
    for task in sinks.tasks {
        let _ = tokio::time::timeout(SINK_STOP, task).await;
    }
    db.close().await;
    Ok(())
}

/// Where the other nodes reach this one: the listen address, or — listening on every
/// interface (`0.0.0.0`) — the machine's host name with its port.
fn advertised(local: SocketAddr) -> String {
    if !local.ip().is_unspecified() {
        return format!("http://{local}");
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "127.0.0.1".to_string());
    format!("http://{host}:{}", local.port())
}

/// `/metrics` and dashboard settings, with the workflow figures read from the state DB.
fn ops(project: &spec::Project, db: &State) -> Ops {
    let mut ops = Ops::new(project.settings.serve.protect_metrics);
    let workflows = Arc::new(project.workflows.clone());
    let db = db.clone();
    ops.workflows = Some(Arc::new(move |mut page| {
        let (workflows, db) = (workflows.clone(), db.clone());
        Box::pin(async move {
            let list = overview::workflows(&workflows, &db, chrono::Utc::now()).await?;
            overview::write_metrics(&mut page, &list);
            Ok(page)
        })
    }));
    ops
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// A state, lake or broker URL without its password, for messages and `status`.
pub fn redact(url: &str) -> String {
    crate::state::redact(url)
}
