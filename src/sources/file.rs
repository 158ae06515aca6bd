//! The `file` source: NDJSON/CSV files matching a glob, read once or followed (`follow: true`:
//! new files and lines appended to existing ones are picked up as they appear).
//!
//! Progress (bytes consumed per file) is saved durably in the project's state directory after
//! each acknowledged chunk. A crash between the acknowledgement and the save re-reads that chunk
//! on restart, and the door drops those events as duplicates by `event_id` — for JSON by default
//! each record's position (`meta.position`: file, generation, byte offset; see
//! `spec::FILE_META`), so every record counts once without an id in the events. A file found
//! shorter than its saved offset (truncated, or replaced by a shorter one) starts a new
//! generation, read from its start.
//!
//! Each pass reads only what is new: from the saved offset to the end of the last whole record
//! (a line; for CSV a record, whose quoted fields may span lines), never the part already
//! consumed. A pass that fails (a file unreadable, the door refusing) is retried from the saved
//! progress — also when the files are read once — so nothing is skipped.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::broker::{self, Body};

use crate::spec::Format;
use crate::speed::runtime::PipelineRuntime;

/// Largest chunk sent through the door at once (cut at a record boundary; a single record
/// longer than this is sent whole).
const CHUNK: usize = 4 * 1024 * 1024;
const POLL: Duration = Duration::from_millis(500);
/// Longest wait between retries of a failed pass of files read once.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// A CSV header longer than this is not one.
const MAX_HEADER: usize = 1024 * 1024;
/// Passes a followed CSV file may end in an open quoted field without growing before that
/// record is taken as it is (the decoder rejects it, and reads on after it).
const STALLED_PASSES: u32 = 10;

pub struct FileSource {
    rt: Arc<PipelineRuntime>,
    /// The project directory: `meta.file` is relative to it.
    root: PathBuf,
    pattern: String,
    follow: bool,
    /// The `meta.*` keys the schema reads (JSON only), in a fixed order.
    meta: Vec<String>,
    progress_file: PathBuf,
    /// file → what of it is consumed.
    progress: BTreeMap<PathBuf, Progress>,
    /// file → (its length, passes it has not grown while ending in an unfinished record).
    stalled: BTreeMap<PathBuf, (u64, u32)>,
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
        let meta = if rt.pipeline.format == Format::Json {
            broker::meta_keys(&rt)
        } else {
            Vec::new()
        };
        Ok(FileSource {
            rt,
            root: root.to_path_buf(),
            pattern,
            follow,
            meta,
            progress_file,
            progress,
            stalled: BTreeMap::new(),
        })
    }

    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let wait = match self.pass(&shutdown).await {
                Ok(()) if !self.follow => {
                    tracing::info!(pipeline = %self.rt.pipeline.name, files = self.progress.len(), "file source read every file");
                    return;
                }
                Ok(()) => {
                    failures = 0;
                    POLL
                }
                Err(e) => {
                    // Fail closed: the next pass starts again from the saved progress.
                    failures = failures.saturating_add(1);
                    let wait = (POLL * 2u32.saturating_pow(failures - 1)).min(MAX_RETRY);
                    tracing::warn!(pipeline = %self.rt.pipeline.name, error = %format!("{e:#}"), retry_in_ms = wait.as_millis() as u64, "file source pass failed; retrying");
                    wait
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
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
        // A file that fails does not hold up the others; the pass fails after them.
        let mut failed = None;
        for file in files {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if let Err(e) = self.read_new(&file).await {
                failed.get_or_insert(e);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// Sends the whole records of `file` after its saved progress through the door, chunk by
    /// chunk, saving the progress after each.
    async fn read_new(&mut self, file: &Path) -> anyhow::Result<()> {
        let csv = self.rt.pipeline.format == Format::Csv;
        let len = tokio::fs::metadata(file)
            .await
            .with_context(|| format!("reading {}", file.display()))?
            .len();
        let saved = self.progress.get(file).copied().unwrap_or_default();
        if len < saved.offset {
            tracing::warn!(file = %file.display(), "file shrank; reading it again from the start, as a new generation");
            let generation = saved.generation + 1;
            self.progress.insert(
                file.to_path_buf(),
                Progress {
                    offset: 0,
                    generation,
                },
            );
            self.stalled.remove(file);
            return self.save().await;
        }
        let done = saved.offset;
        if len == done {
            return Ok(());
        }
        // A record still being written waits for the rest — unless the file is read once, or
        // has stopped growing for a while: then the decoder judges it as it is.
        let stalled = match self.stalled.get(file) {
            Some(&(at, passes)) if at == len => passes + 1,
            _ => 0,
        };
        let tail = if !self.follow {
            Tail::All
        } else if stalled >= STALLED_PASSES {
            Tail::Lines
        } else {
            Tail::Wait
        };
        let path = file.to_path_buf();
        let mut pos = done;
        loop {
            let p = path.clone();
            let chunk = tokio::task::spawn_blocking(move || next_chunk(&p, pos, len, csv, tail))
                .await?
                .with_context(|| format!("reading {}", path.display()))?;
            let Some(Chunk { body, end }) = chunk else {
                break;
            };
            let body = if self.meta.is_empty() {
                Bytes::from(body)
            } else {
                let file = path.strip_prefix(&self.root).unwrap_or(&path);
                with_meta(
                    &body,
                    pos,
                    &self.meta,
                    &file.to_string_lossy(),
                    saved.generation,
                )
            };
            let report = self.rt.ingest(body).await?;
            if report.rejected > 0 {
                tracing::warn!(file = %path.display(), rejected = report.rejected, "records rejected into the dead-letter area");
            }
            pos = end;
            self.progress.insert(
                path.clone(),
                Progress {
                    offset: pos,
                    ..saved
                },
            );
            self.save().await?;
        }
        if pos < len {
            self.stalled.insert(path, (len, stalled));
        } else {
            self.stalled.remove(&path);
        }
        Ok(())
    }

    async fn save(&self) -> anyhow::Result<()> {
        let bytes = serde_json::to_vec(&self.progress)?;
        let path = self.progress_file.clone();
        tokio::task::spawn_blocking(move || crate::fsync::write_atomic(&path, &bytes))
            .await?
            .with_context(|| format!("saving {}", self.progress_file.display()))
    }
}

/// What of a file is consumed. Saved as JSON; a bare number (an earlier version's offset)
/// reads as generation 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Saved")]
struct Progress {
    /// Bytes consumed, always at a record boundary.
    offset: u64,
    /// Times the file was found truncated: part of each record's position.
    generation: u32,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Saved {
    Offset(u64),
    Progress { offset: u64, generation: u32 },
}

impl From<Saved> for Progress {
    fn from(s: Saved) -> Progress {
        match s {
            Saved::Offset(offset) => Progress {
                offset,
                generation: 0,
            },
            Saved::Progress { offset, generation } => Progress { offset, generation },
        }
    }
}

/// `body` — JSON records read from byte `start` of `file` — with each record's `$meta`:
/// `file`, `offset` and `position` (`FILE#GENERATION:OFFSET`) as `keys` ask.
fn with_meta(body: &[u8], start: u64, keys: &[String], file: &str, generation: u32) -> Bytes {
    let mut out = Body::new(Format::Json);
    let mut at = start;
    for line in body.split_inclusive(|c| *c == b'\n') {
        let offset = at;
        at += line.len() as u64;
        out.push_meta(line, keys, |k| match k {
            "file" => file.into(),
            "offset" => offset.into(),
            "position" => format!("{file}#{generation}:{offset}").into(),
            _ => serde_json::Value::Null,
        });
    }
    out.into_bytes()
}

/// A body for the door and the file offset it ends at.
struct Chunk {
    body: Vec<u8>,
    end: u64,
}

/// What to do with the end of a file that is not a whole record (a line without its line
/// break; for CSV also a record in a quoted field that is still open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tail {
    /// It may still be written: wait.
    Wait,
    /// The file has stopped growing: send its lines (the decoder rejects an open record by
    /// its line, and reads on after it); a last line without its line break waits.
    Lines,
    /// The file is read once: send everything.
    All,
}

/// The next chunk of `path` from `pos` (below `len`): whole records only, at most [`CHUNK`]
/// bytes unless one record is longer; for CSV prefixed with the file's header (and starting
/// after it). `None`: nothing to send yet. Only the header and the bytes from `pos` are read.
fn next_chunk(
    path: &Path,
    pos: u64,
    len: u64,
    csv: bool,
    tail: Tail,
) -> std::io::Result<Option<Chunk>> {
    let mut f = std::fs::File::open(path)?;
    let header = if csv {
        match read_header(&mut f)? {
            Some(h) => Some(h),
            None => return Ok(None),
        }
    } else {
        None
    };
    let mut pos = pos;
    if let Some(h) = &header
        && pos == 0
    {
        pos = (h.len() as u64 + 1).min(len);
    }
    if pos >= len {
        return Ok(None);
    }
    // Read a window from `pos`, growing it until it holds a whole record (or the file ends).
    f.seek(SeekFrom::Start(pos))?;
    let mut data = Vec::new();
    let mut window = CHUNK as u64;
    let cut = loop {
        let want = (len - pos).min(window) as usize;
        let have = data.len();
        (&mut f).take((want - have) as u64).read_to_end(&mut data)?;
        let at_end = data.len() < want || pos + data.len() as u64 >= len;
        let whole = if csv {
            crate::plan::csv_whole_records(&data)
        } else {
            last_line_end(&data)
        };
        if whole > 0 {
            break whole;
        }
        if at_end {
            let rest = match tail {
                Tail::Wait => 0,
                Tail::Lines => last_line_end(&data),
                Tail::All => data.len(),
            };
            if rest == 0 {
                return Ok(None);
            }
            break rest;
        }
        window = window.saturating_mul(2);
    };
    data.truncate(cut);
    let mut body = Vec::with_capacity(header.as_ref().map_or(0, |h| h.len() + 1) + cut);
    if let Some(h) = &header {
        body.extend_from_slice(h);
        body.push(b'\n');
    }
    body.extend_from_slice(&data);
    Ok(Some(Chunk {
        body,
        end: pos + cut as u64,
    }))
}

/// The end of the last line break of `data` (0 if none).
fn last_line_end(data: &[u8]) -> usize {
    memchr::memrchr(b'\n', data).map_or(0, |i| i + 1)
}

/// The first line of a CSV file (its header), without its line break; `None` while that line
/// break is not written yet.
fn read_header(f: &mut std::fs::File) -> std::io::Result<Option<Vec<u8>>> {
    let mut head = Vec::new();
    let mut piece = [0u8; 8192];
    loop {
        let n = f.read(&mut piece)?;
        if n == 0 {
            return Ok(None);
        }
        if let Some(i) = memchr::memchr(b'\n', &piece[..n]) {
            head.extend_from_slice(&piece[..i]);
            return Ok(Some(head));
        }
        head.extend_from_slice(&piece[..n]);
        if head.len() > MAX_HEADER {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the first line is over 1 MiB: not a CSV header",
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(text: &[u8], csv: bool, tail: Tail) -> Vec<(String, u64)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, text).unwrap();
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(c) = next_chunk(&path, pos, text.len() as u64, csv, tail).unwrap() {
            assert!(c.end > pos);
            pos = c.end;
            out.push((String::from_utf8(c.body).unwrap(), c.end));
        }
        out
    }

    #[test]
    fn chunks_hold_whole_lines_and_start_where_the_last_ended() {
        let text = b"{\"a\": 1}\n{\"a\": 2}\n{\"a\": 3";
        let whole = [("{\"a\": 1}\n{\"a\": 2}\n".to_string(), 18)];
        assert_eq!(chunks(text, false, Tail::Wait), whole);
        assert_eq!(chunks(text, false, Tail::Lines), whole);
        // Read once: the last line counts without its line break.
        assert_eq!(
            chunks(text, false, Tail::All),
            [whole[0].clone(), ("{\"a\": 3".to_string(), 25)]
        );
        // From a saved offset: only what follows is read.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in");
        std::fs::write(&path, b"garbage that was consumed\n{\"a\": 4}\n").unwrap();
        let c = next_chunk(&path, 26, 35, false, Tail::Wait)
            .unwrap()
            .unwrap();
        assert_eq!((c.body.as_slice(), c.end), (&b"{\"a\": 4}\n"[..], 35));
    }

    #[test]
    fn csv_chunks_keep_quoted_newlines_together_and_carry_the_header() {
        let text = b"ts,page\n1,\"multi\nline\"\n2,\"open quote\nstill open";
        // The open record may still be completed: it waits.
        let first = ("ts,page\n1,\"multi\nline\"\n".to_string(), 23);
        assert_eq!(chunks(text, true, Tail::Wait), std::slice::from_ref(&first));
        // The file stopped growing: the open record goes to the door by its line (rejected
        // there); its last line waits for its line break.
        assert_eq!(
            chunks(text, true, Tail::Lines),
            [first.clone(), ("ts,page\n2,\"open quote\n".to_string(), 37)]
        );
        assert_eq!(
            chunks(text, true, Tail::All),
            [
                first,
                ("ts,page\n2,\"open quote\nstill open".to_string(), 47)
            ]
        );
        // A header without its line break yet: nothing to send.
        assert!(chunks(b"ts,pa", true, Tail::All).is_empty());
    }

    #[test]
    fn records_carry_their_position_and_progress_reads_old_offsets() {
        let keys = vec!["offset".to_string(), "position".to_string()];
        let body = with_meta(b"{\"a\": 1}\n{}\n", 26, &keys, "data/a.ndjson", 2);
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            "{\"a\": 1,\"$meta\":{\"offset\":26,\"position\":\"data/a.ndjson#2:26\"}}\n\
             {\"$meta\":{\"offset\":35,\"position\":\"data/a.ndjson#2:35\"}}\n"
        );
        let saved: BTreeMap<PathBuf, Progress> =
            serde_json::from_str(r#"{"/d/a": 7, "/d/b": {"offset": 9, "generation": 1}}"#).unwrap();
        assert_eq!(
            saved.values().copied().collect::<Vec<_>>(),
            [
                Progress {
                    offset: 7,
                    generation: 0
                },
                Progress {
                    offset: 9,
                    generation: 1
                }
            ]
        );
    }

    #[test]
    fn a_record_longer_than_a_chunk_is_sent_whole() {
        let long = format!("{{\"a\": \"{}\"}}\n", "x".repeat(CHUNK + 10));
        let text = format!("{long}{{\"a\": 1}}\n");
        let got = chunks(text.as_bytes(), false, Tail::Wait);
        assert!(got[0].0.starts_with(&long), "the long line whole");
        assert!(got.iter().all(|(body, _)| body.ends_with('\n')));
        assert_eq!(
            got.iter().map(|(b, _)| b.as_str()).collect::<String>(),
            text
        );
        assert_eq!(got.last().unwrap().1, text.len() as u64);
    }
}
