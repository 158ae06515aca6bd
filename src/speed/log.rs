//! The write-ahead log of a pipeline partition: positions for sources that have none of their
//! own (HTTP, MQTT, AMQP, file, generator).
//!
//! An append returns only after its records are on disk (`fdatasync`). Appends from concurrent
//! callers are group-committed by one writer thread: it drains every request waiting in its
//! queue, writes them all, syncs once and answers each — so N concurrent HTTP requests cost one
//! fsync, not N.
//!
//! Each append may carry an attachment (the decoded events); after the sync the writer hands
//! `(offsets, stamp, attachment)` to the log's consumer *in offset order*, so the aggregator
//! sees a gap-free position stream no matter how callers race.
//!
//! With a [`Stamper`], the writer stamps each request with its arrival time as it writes it,
//! from the pipeline's [`Stamps`] clock — into its records, as durable as the events — so
//! arrival times never decrease along positions (time travel reads them from the archive).
//!
//! Bounded under load: at most [`QUEUE`] appends wait for the writer and as many are written
//! in one group commit, and the consumer's channel is bounded too (its capacity is the
//! caller's). A slow consumer blocks the writer, which stops taking appends, which makes
//! callers wait — the door slows down instead of memory growing.
//!
//! On disk: files `{first_offset:020}.wal` holding records `len: u32 LE | crc32: u32 LE | payload`;
//! a record's offset is implicit (the file's first offset + its index). A crash can leave a torn
//! record at the tail of the last file; it was never acknowledged, so opening the log cuts it off.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;

use tokio::sync::{mpsc, oneshot};

use crate::clock::Stamps;

/// Start a new file beyond this size, so truncation can drop whole files.
const FILE_BYTES: u64 = 64 * 1024 * 1024;
const HEADER: usize = 8;
/// A record longer than this is corruption, not data.
const MAX_RECORD: u32 = 64 * 1024 * 1024;
/// Appends waiting for the writer thread at most; more wait in `append` for room.
pub const QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("write-ahead log {dir}: {source}")]
    Io { dir: PathBuf, source: io::Error },
    #[error("write-ahead log {0} is closed")]
    Closed(PathBuf),
}

struct Request<T> {
    records: Vec<Vec<u8>>,
    attachment: T,
    reply: oneshot::Sender<Result<Range<u64>, LogError>>,
}

/// Records with their positions, in position order.
pub type Records = Vec<(u64, Vec<u8>)>;

/// What the writer thread takes: appends, and (between two of them) a reset.
enum Command<T> {
    Append(Request<T>),
    /// See [`Log::reset`].
    Reset {
        from: u64,
        to: u64,
        reply: oneshot::Sender<Result<Records, LogError>>,
    },
}

/// Durable records handed to the consumer, in offset order: their offsets, their arrival time
/// (epoch ms; 0 without a [`Stamper`]) and the append's attachment.
pub type Durable<T> = (Range<u64>, i64, T);

/// How the writer stamps requests: the clock, and how an arrival time goes into a record.
#[derive(Clone)]
pub struct Stamper {
    pub stamps: Arc<Stamps>,
    /// Which of the clock's logs this is (a partition's index).
    pub log: usize,
    pub write: fn(&mut [u8], i64),
}

/// Handle to the log's writer thread; cheap to clone.
pub struct Log<T = ()> {
    dir: PathBuf,
    tx: mpsc::Sender<Command<T>>,
    /// End (exclusive) of the synced records; set before they are handed to the consumer.
    durable_end: Arc<AtomicU64>,
}

impl<T> Clone for Log<T> {
    fn clone(&self) -> Self {
        Log {
            dir: self.dir.clone(),
            tx: self.tx.clone(),
            durable_end: self.durable_end.clone(),
        }
    }
}

impl<T: Send + 'static> Log<T> {
    /// Opens (or creates) the log in `dir`, cutting off a torn tail. Returns the log and the
    /// next offset it will assign. Durable appends are forwarded to `consumer` when given.
    pub fn open(
        dir: &Path,
        consumer: Option<mpsc::Sender<Durable<T>>>,
    ) -> Result<(Log<T>, u64), LogError> {
        Self::open_stamped(dir, consumer, None)
    }

    /// [`Log::open`], stamping every request with `stamper` as it is written.
    pub fn open_stamped(
        dir: &Path,
        consumer: Option<mpsc::Sender<Durable<T>>>,
        stamper: Option<Stamper>,
    ) -> Result<(Log<T>, u64), LogError> {
        let err = |source| LogError::Io {
            dir: dir.to_path_buf(),
            source,
        };
        crate::fsync::create_dir_all(dir).map_err(err)?;
        let files = files(dir).map_err(err)?;
        let (file, next) = match files.last() {
            Some(&(first, ref path)) => {
                let (count, good_len) = scan(path).map_err(err)?;
                let f = OpenOptions::new().write(true).open(path).map_err(err)?;
                f.set_len(good_len).map_err(err)?;
                f.sync_all().map_err(err)?;
                let f = OpenOptions::new().append(true).open(path).map_err(err)?;
                (Some((f, good_len)), first + count)
            }
            None => (None, 0),
        };
        let (tx, rx) = mpsc::channel::<Command<T>>(QUEUE);
        let durable_end = Arc::new(AtomicU64::new(next));
        let mut writer = Writer {
            dir: dir.to_path_buf(),
            file,
            next,
            durable_end: durable_end.clone(),
            consumer,
            stamper,
        };
        thread::Builder::new()
            .name(format!("wal:{}", dir.display()))
            .spawn(move || writer.run(rx))
            .map_err(err)?;
        Ok((
            Log {
                dir: dir.to_path_buf(),
                tx,
                durable_end,
            },
            next,
        ))
    }

    /// Appends records; resolves with their offsets once they are durable (and, with a
    /// consumer, handed to it with `attachment`). Waits while the writer's queue is full.
    pub async fn append(
        &self,
        records: Vec<Vec<u8>>,
        attachment: T,
    ) -> Result<Range<u64>, LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Append(Request {
                records,
                attachment,
                reply,
            }))
            .await
            .map_err(|_| LogError::Closed(self.dir.clone()))?;
        rx.await.map_err(|_| LogError::Closed(self.dir.clone()))?
    }

    /// Empties the log and makes it continue at position `to`, between two appends; returns
    /// the records it held at or after `from` (what is given up). For a partition that moves
    /// between nodes: its records are not archived here, the broker has them (module docs of
    /// `speed::nodes`). Durable: the start marker is synced with its directory.
    pub async fn reset(&self, from: u64, to: u64) -> Result<Records, LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Command::Reset { from, to, reply })
            .await
            .map_err(|_| LogError::Closed(self.dir.clone()))?;
        rx.await.map_err(|_| LogError::Closed(self.dir.clone()))?
    }

    /// Deletes files whose records all lie below `offset` (they are sealed into segments).
    pub fn truncate_below(&self, offset: u64) -> Result<(), LogError> {
        let err = |source| LogError::Io {
            dir: self.dir.clone(),
            source,
        };
        let files = files(&self.dir).map_err(err)?;
        // A file may go when the next file starts at or below `offset`; the last never goes.
        for pair in files.windows(2) {
            if pair[1].0 <= offset {
                fs::remove_file(&pair[0].1).map_err(err)?;
            }
        }
        Ok(())
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// End (exclusive) of the synced records. Every record below it is on disk and has been
    /// (or is being) handed to the consumer; records at or above it reach the consumer later.
    pub fn durable_end(&self) -> u64 {
        self.durable_end.load(Ordering::Acquire)
    }
}

/// End (exclusive) of the intact records of the log in `dir` — the offset its next append
/// would take — read without opening the log for writing and without keeping any record.
pub fn end(dir: &Path) -> Result<u64, LogError> {
    let err = |source| LogError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    match files(dir).map_err(err)?.last() {
        Some((first, path)) => Ok(first + scan(path).map_err(err)?.0),
        None => Ok(0),
    }
}

/// Reads every durable record at or after `from`, in offset order.
pub fn read_from(dir: &Path, from: u64) -> Result<Vec<(u64, Vec<u8>)>, LogError> {
    let err = |source| LogError::Io {
        dir: dir.to_path_buf(),
        source,
    };
    let files = files(dir).map_err(err)?;
    let mut out = Vec::new();
    for (i, (first, path)) in files.iter().enumerate() {
        if let Some((next_first, _)) = files.get(i + 1)
            && *next_first <= from
        {
            continue;
        }
        let mut r = BufReader::new(File::open(path).map_err(err)?);
        let mut offset = *first;
        while let Some(payload) = read_record(&mut r).map_err(err)? {
            if offset >= from {
                out.push((offset, payload));
            }
            offset += 1;
        }
    }
    Ok(out)
}

struct Writer<T> {
    dir: PathBuf,
    /// The open file and its length; `None` until the first append of an empty log.
    file: Option<(File, u64)>,
    next: u64,
    durable_end: Arc<AtomicU64>,
    consumer: Option<mpsc::Sender<Durable<T>>>,
    stamper: Option<Stamper>,
}

impl<T> Writer<T> {
    fn run(&mut self, mut rx: mpsc::Receiver<Command<T>>) {
        let mut next_command = None;
        loop {
            let first = match next_command.take() {
                Some(c) => c,
                None => match rx.blocking_recv() {
                    Some(c) => c,
                    None => break,
                },
            };
            let first = match first {
                Command::Append(req) => req,
                Command::Reset { from, to, reply } => {
                    let _ = reply.send(self.reset(from, to));
                    continue;
                }
            };
            // Group commit of what is waiting — at most a queue's worth, so callers racing to
            // refill the queue cannot grow one batch without bound; a reset waits for it.
            let mut batch = vec![first];
            while batch.len() < QUEUE
                && let Ok(more) = rx.try_recv()
            {
                match more {
                    Command::Append(req) => batch.push(req),
                    reset => {
                        next_command = Some(reset);
                        break;
                    }
                }
            }
            match self.write(&mut batch) {
                Ok(ranges) => {
                    self.durable_end.store(self.next, Ordering::Release);
                    for (req, (range, stamp)) in batch.into_iter().zip(ranges) {
                        if let Some(c) = &self.consumer {
                            // Forward before replying: once acknowledged, the events are on
                            // their way to the aggregator. A full channel blocks here (the
                            // consumer is behind), and so the appends queued behind this one.
                            let _ = c.blocking_send((range.clone(), stamp, req.attachment));
                        }
                        let _ = req.reply.send(Ok(range));
                    }
                }
                Err(e) => {
                    tracing::error!(dir = %self.dir.display(), error = %e, "write-ahead log append failed");
                    // Nothing of this batch is acknowledged; reopen so a partial write is cut off.
                    if let Some(s) = &self.stamper {
                        s.stamps.unstamp_to(s.log, self.next);
                    }
                    for req in batch {
                        let _ = req.reply.send(Err(LogError::Io {
                            dir: self.dir.clone(),
                            source: io::Error::new(e.kind(), e.to_string()),
                        }));
                    }
                    self.recover();
                }
            }
        }
    }

    /// [`Log::reset`]: the records at or after `from`, then every file gone and an empty one
    /// starting at `to`.
    fn reset(&mut self, from: u64, to: u64) -> Result<Records, LogError> {
        let err = |source| LogError::Io {
            dir: self.dir.clone(),
            source,
        };
        let given_up = read_from(&self.dir, from)?;
        self.file = None;
        for (_, path) in files(&self.dir).map_err(err)? {
            fs::remove_file(path).map_err(err)?;
        }
        crate::fsync::create_file(&self.dir.join(format!("{to:020}.wal"))).map_err(err)?;
        self.next = to;
        self.durable_end.store(to, Ordering::Release);
        if let Some(s) = &self.stamper {
            s.stamps.unstamp_to(s.log, to);
        }
        Ok(given_up)
    }

    /// Writes and syncs the requests; their offsets and stamps.
    fn write(&mut self, batch: &mut [Request<T>]) -> io::Result<Vec<(Range<u64>, i64)>> {
        if self.file.as_ref().is_none_or(|(_, len)| *len >= FILE_BYTES) {
            let path = self.dir.join(format!("{:020}.wal", self.next));
            let f = OpenOptions::new().create(true).append(true).open(&path)?;
            crate::fsync::sync_dir(&self.dir)?;
            self.file = Some((f, 0));
        }
        let (file, len) = self.file.as_mut().expect("opened above");
        let mut w = BufWriter::with_capacity(1 << 20, &mut *file);
        let mut ranges = Vec::with_capacity(batch.len());
        let mut next = self.next;
        let mut written = 0u64;
        for req in batch.iter_mut() {
            let start = next;
            let stamp = match &self.stamper {
                Some(s) => {
                    let stamp = s.stamps.stamp(s.log, req.records.len() as u64);
                    req.records.iter_mut().for_each(|r| (s.write)(r, stamp));
                    stamp
                }
                None => 0,
            };
            for rec in &req.records {
                let n = u32::try_from(rec.len())
                    .ok()
                    .filter(|n| *n <= MAX_RECORD)
                    .ok_or_else(|| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("record of {} bytes is too large", rec.len()),
                        )
                    })?;
                w.write_all(&n.to_le_bytes())?;
                w.write_all(&crc32fast::hash(rec).to_le_bytes())?;
                w.write_all(rec)?;
                written += (HEADER + rec.len()) as u64;
                next += 1;
            }
            ranges.push((start..next, stamp));
        }
        w.flush()?;
        drop(w);
        file.sync_data()?;
        *len += written;
        self.next = next;
        Ok(ranges)
    }

    fn recover(&mut self) {
        if let Some((_, good)) = &self.file {
            let good = *good;
            if let Ok(files) = files(&self.dir)
                && let Some((_, path)) = files.last()
                && let Ok(f) = OpenOptions::new().write(true).open(path)
                && f.set_len(good).is_ok()
            {
                let _ = f.sync_all();
            }
        }
        self.file = None;
    }
}

fn files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".wal"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            out.push((first, path));
        }
    }
    out.sort();
    Ok(out)
}

/// Counts the intact records of a file and the byte length they span.
fn scan(path: &Path) -> io::Result<(u64, u64)> {
    let mut r = BufReader::new(File::open(path)?);
    let (mut count, mut len) = (0u64, 0u64);
    while let Some(payload) = read_record(&mut r)? {
        count += 1;
        len += (HEADER + payload.len()) as u64;
    }
    Ok((count, len))
}

/// The next intact record, or `None` at the end or at a torn/corrupt tail.
fn read_record(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut header = [0u8; HEADER];
    match r.read_exact(&mut header) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if len > MAX_RECORD {
        return Ok(None);
    }
    let mut payload = vec![0u8; len as usize];
    match r.read_exact(&mut payload) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    Ok((crc32fast::hash(&payload) == crc).then_some(payload))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(xs: &[&str]) -> Vec<Vec<u8>> {
        xs.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    #[tokio::test]
    async fn appends_get_consecutive_offsets_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (log, next) = Log::<()>::open(dir.path(), None).unwrap();
        assert_eq!(next, 0);
        assert_eq!(log.append(recs(&["a", "b"]), ()).await.unwrap(), 0..2);
        assert_eq!(log.append(recs(&["c"]), ()).await.unwrap(), 2..3);
        drop(log);
        let (log, next) = Log::<()>::open(dir.path(), None).unwrap();
        assert_eq!(next, 3);
        assert_eq!(log.append(recs(&["d"]), ()).await.unwrap(), 3..4);
        let all = read_from(dir.path(), 1).unwrap();
        assert_eq!(
            all,
            vec![(1, b"b".to_vec()), (2, b"c".to_vec()), (3, b"d".to_vec())]
        );
    }

    #[tokio::test]
    async fn a_reset_gives_up_the_records_and_continues_at_its_position() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::<()>::open(dir.path(), None).unwrap();
        log.append(recs(&["a", "b", "c"]), ()).await.unwrap();
        let given_up = log.reset(1, 40).await.unwrap();
        assert_eq!(given_up, vec![(1, b"b".to_vec()), (2, b"c".to_vec())]);
        assert_eq!(log.durable_end(), 40);
        assert!(read_from(dir.path(), 0).unwrap().is_empty());
        assert_eq!(log.append(recs(&["d"]), ()).await.unwrap(), 40..41);
        drop(log);
        // Durable: reopened, the log goes on after the reset's records.
        let (log, next) = Log::<()>::open(dir.path(), None).unwrap();
        assert_eq!(next, 41);
        assert_eq!(read_from(dir.path(), 0).unwrap(), vec![(40, b"d".to_vec())]);
        assert_eq!(log.reset(41, 41).await.unwrap(), vec![]);
        assert_eq!(end(dir.path()).unwrap(), 41);
    }

    #[tokio::test]
    async fn concurrent_appends_share_commits_and_never_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::<()>::open(dir.path(), None).unwrap();
        let tasks: Vec<_> = (0..64)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move {
                    log.append(vec![format!("{i}").into_bytes(); 10], ())
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut ranges = Vec::new();
        for t in tasks {
            ranges.push(t.await.unwrap());
        }
        ranges.sort_by_key(|r| r.start);
        for w in ranges.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        assert_eq!(read_from(dir.path(), 0).unwrap().len(), 640);
    }

    #[tokio::test]
    async fn the_consumer_sees_appends_in_offset_order_with_increasing_stamps() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(64);
        let stamper = Stamper {
            stamps: Arc::new(Stamps::default()),
            log: 0,
            write: |rec, stamp| rec[..8].copy_from_slice(&stamp.to_le_bytes()),
        };
        let (log, _) = Log::<usize>::open_stamped(dir.path(), Some(tx), Some(stamper)).unwrap();
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(
                    async move { log.append(vec![vec![0u8; 8]; i % 4 + 1], i).await.unwrap() },
                )
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let (mut next, mut last) = (0, 0);
        let logged = read_from(dir.path(), 0).unwrap();
        for _ in 0..32 {
            let (range, stamp, i) = rx.recv().await.unwrap();
            assert_eq!(range.start, next);
            assert_eq!(range.end - range.start, (i % 4 + 1) as u64);
            assert!(stamp >= last, "{last} then {stamp}");
            // Every record of the request carries its stamp on disk.
            for (_, rec) in &logged[range.start as usize..range.end as usize] {
                assert_eq!(rec[..8], stamp.to_le_bytes());
            }
            (next, last) = (range.end, stamp);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_consumer_makes_appends_wait_instead_of_piling_up() {
        let dir = tempfile::tempdir().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let (log, _) = Log::<usize>::open(dir.path(), Some(tx)).unwrap();
        let n = 4 * QUEUE;
        let tasks: Vec<_> = (0..n)
            .map(|i| {
                let log = log.clone();
                tokio::spawn(async move { log.append(recs(&["x"]), i).await })
            })
            .collect();
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        // Nobody consumes: one append is in the channel, the writer waits to hand over the
        // next, and the rest wait in (or for room in) the bounded queue — unacknowledged.
        let done = tasks.iter().filter(|t| t.is_finished()).count();
        assert!(
            done <= 1,
            "{done} of {n} appends acknowledged past a stalled consumer"
        );
        // At most the append handed to the consumer's channel plus one group commit (a queue's
        // worth) waiting to be handed over after it.
        let written = read_from(dir.path(), 0).unwrap().len();
        assert!(
            written <= QUEUE + 1,
            "the writer took {written} of {n} appends past a stalled consumer"
        );
        assert_eq!(log.durable_end(), written as u64);
        // The consumer catches up: everything goes through, in order.
        for next in 0..n as u64 {
            let (range, _, _) = rx.recv().await.unwrap();
            assert_eq!(range, next..next + 1);
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        assert_eq!(log.durable_end(), n as u64);
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::<()>::open(dir.path(), None).unwrap();
        log.append(recs(&["one", "two"]), ()).await.unwrap();
        drop(log);
        let path = files(dir.path()).unwrap()[0].1.clone();
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&[200, 0, 0, 0, 1, 2]).unwrap(); // a header promising more than is there
        drop(f);
        let (log, next) = Log::<()>::open(dir.path(), None).unwrap();
        assert_eq!(next, 2);
        assert_eq!(log.append(recs(&["three"]), ()).await.unwrap(), 2..3);
        let all: Vec<u64> = read_from(dir.path(), 0)
            .unwrap()
            .into_iter()
            .map(|(o, _)| o)
            .collect();
        assert_eq!(all, vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn truncation_keeps_unsealed_records() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = Log::<()>::open(dir.path(), None).unwrap();
        log.append(recs(&["a", "b"]), ()).await.unwrap();
        // Force a second file by reopening with a new file started on the next write.
        drop(log);
        fs::write(dir.path().join(format!("{:020}.wal", 2)), b"").unwrap();
        let (log, next) = Log::<()>::open(dir.path(), None).unwrap();
        assert_eq!(next, 2);
        log.append(recs(&["c"]), ()).await.unwrap();
        log.truncate_below(1).unwrap();
        assert_eq!(read_from(dir.path(), 0).unwrap().len(), 3);
        log.truncate_below(2).unwrap();
        assert_eq!(read_from(dir.path(), 0).unwrap(), vec![(2, b"c".to_vec())]);
    }
}
