//! The `file` source: NDJSON/CSV files matching a glob, read once or followed (`follow: true`:
//! new files and lines appended to existing ones are picked up as they appear).
//!
//! Progress (bytes consumed per file) is saved in the project's state directory after each
//! acknowledged chunk. A crash between the acknowledgement and the save re-reads that chunk
//! on restart; with `event_id` those events are dropped as duplicates at the door.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::spec::Format;
use crate::speed::runtime::PipelineRuntime;

/// Largest chunk sent through the door at once (cut at a line boundary).
const CHUNK: usize = 4 * 1024 * 1024;
const POLL: Duration = Duration::from_millis(500);

pub struct FileSource {
    rt: Arc<PipelineRuntime>,
    pattern: String,
    follow: bool,
    progress_file: PathBuf,
    /// file → bytes consumed (always at a line boundary).
    progress: BTreeMap<PathBuf, u64>,
}

impl FileSource {
    pub fn new(
        rt: Arc<PipelineRuntime>,
        root: &Path,
        path: &str,
        follow: bool,
        state_dir: &Path,
    ) -> anyhow::Result<Self> {
        let pattern = if Path::new(path).is_absolute() {
            path.to_string()
        } else {
            root.join(path).to_string_lossy().into_owned()
        };
        glob::Pattern::new(&pattern).with_context(|| format!("invalid file pattern `{path}`"))?;
        let progress_file = state_dir
            .join("sources")
            .join(format!("{}.json", rt.pipeline.name));
        let progress = match std::fs::read(&progress_file) {
            Ok(b) => serde_json::from_slice(&b)
                .with_context(|| format!("reading {}", progress_file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", progress_file.display()));
            }
        };
        Ok(FileSource {
            rt,
            pattern,
            follow,
            progress_file,
            progress,
        })
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.pass(&shutdown).await {
                tracing::warn!(pipeline = %self.rt.pipeline.name, error = %format!("{e:#}"), "file source pass failed; retrying");
            }
            if !self.follow {
                tracing::info!(pipeline = %self.rt.pipeline.name, files = self.progress.len(), "file source read every file");
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Reads what is new in every matching file.
    async fn pass(&mut self, shutdown: &CancellationToken) -> anyhow::Result<()> {
        let mut files: Vec<PathBuf> = glob::glob(&self.pattern)?
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        for file in files {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            let done = self.progress.get(&file).copied().unwrap_or(0);
            let data = tokio::fs::read(&file)
                .await
                .with_context(|| format!("reading {}", file.display()))?;
            if (data.len() as u64) < done {
                tracing::warn!(file = %file.display(), "file shrank; reading it again from the start");
                self.progress.insert(file.clone(), 0);
                continue;
            }
            let csv = self.rt.pipeline.format == Format::Csv;
            let header: Vec<u8> = if csv {
                data.split(|b| *b == b'\n')
                    .next()
                    .unwrap_or_default()
                    .to_vec()
            } else {
                Vec::new()
            };
            let mut pos = done as usize;
            if csv && pos == 0 {
                pos = (header.len() + 1).min(data.len());
            }
            // Only whole lines: a line still being written waits for its newline.
            let end = data.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            while pos < end {
                let mut cut = (pos + CHUNK).min(end);
                if cut < end {
                    cut = data[pos..cut]
                        .iter()
                        .rposition(|b| *b == b'\n')
                        .map_or(end, |i| pos + i + 1);
                }
                let mut body = Vec::with_capacity(header.len() + 1 + cut - pos);
                if csv {
                    body.extend_from_slice(&header);
                    body.push(b'\n');
                }
                body.extend_from_slice(&data[pos..cut]);
                let report = self.rt.ingest(Bytes::from(body)).await?;
                if report.rejected > 0 {
                    tracing::warn!(file = %file.display(), rejected = report.rejected, "lines rejected into the dead-letter area");
                }
                pos = cut;
                self.progress.insert(file.clone(), pos as u64);
                self.save()?;
            }
        }
        Ok(())
    }

    fn save(&self) -> anyhow::Result<()> {
        if let Some(dir) = self.progress_file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = self.progress_file.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec(&self.progress)?)?;
        std::fs::rename(&tmp, &self.progress_file)?;
        Ok(())
    }
}
