//! Sources: where events come from, one file per kind. Position-less sources (HTTP, generator,
//! file) feed the pipeline's door, which logs every event durably before acknowledging it;
//! HTTP is served by `serving::http`, the others run as tasks started here.

pub mod file;
pub mod generator;

use std::path::Path;
use std::sync::Arc;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::spec::Source;
use crate::speed::runtime::PipelineRuntime;

/// Starts the task feeding `rt` from its source, if the source is one that runs in-process.
pub fn spawn(
    rt: Arc<PipelineRuntime>,
    project_root: &Path,
    state_dir: &Path,
    shutdown: CancellationToken,
) -> anyhow::Result<Option<JoinHandle<()>>> {
    Ok(match rt.pipeline.source.clone() {
        Source::Http => None,
        Source::Generator { rate } => Some(tokio::spawn(generator::run(rt, rate, shutdown))),
        Source::File { path, follow } => {
            let reader = file::FileSource::new(rt, project_root, &path, follow, state_dir)?;
            Some(tokio::spawn(reader.run(shutdown)))
        }
        other => anyhow::bail!(
            "pipeline `{}`: the `{}` source is not available in this build of lambda-ctl (available: http, generator, file)",
            rt.pipeline.name,
            other.kind()
        ),
    })
}
