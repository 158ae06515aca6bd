//! Local files that survive a crash (power loss, kernel panic), not only a killed process.
//!
//! Writing a file is not enough: its data must be synced (`fsync`) before anything that relies
//! on it is committed, and so must the directory that names it — a new or renamed entry lives in
//! the directory's data — and every directory created on the way. The write-ahead log, the
//! `file://` lake, the log's start marker and the file source's progress go through here.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Syncs a directory, making the entries created, renamed or removed in it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()?;
    record(dir);
    Ok(())
}

/// Syncs a file's data and metadata.
pub fn sync_file(file: &File, path: &Path) -> io::Result<()> {
    file.sync_all()?;
    record(path);
    Ok(())
}

/// `create_dir_all` whose result survives a crash: every directory it creates is synced, and so
/// is the existing directory it was created in.
pub fn create_dir_all(dir: &Path) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    // The missing directories, deepest first, and the first existing ancestor.
    let mut missing: Vec<&Path> = Vec::new();
    let mut cur = Some(dir);
    while let Some(d) = cur {
        if d.as_os_str().is_empty() || d.is_dir() {
            break;
        }
        missing.push(d);
        cur = d.parent();
    }
    fs::create_dir_all(dir)?;
    // A relative path's first existing ancestor may be the working directory.
    match cur {
        Some(d) if !d.as_os_str().is_empty() => sync_dir(d)?,
        _ => sync_dir(Path::new("."))?,
    }
    for d in missing.iter().rev() {
        sync_dir(d)?;
    }
    Ok(())
}

/// Creates an empty file (truncating one that exists) and makes it durable, entry included.
pub fn create_file(path: &Path) -> io::Result<File> {
    if let Some(parent) = path.parent() {
        create_dir_all(parent)?;
    }
    let f = File::create(path)?;
    sync_file(&f, path)?;
    if let Some(parent) = path.parent() {
        sync_dir(parent)?;
    }
    Ok(f)
}

/// Replaces `path` with `bytes` atomically and durably: a temporary file beside it is written
/// and synced, renamed over `path`, and the directory synced. A crash leaves the old content or
/// the new, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    create_dir_all(parent)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    sync_file(&f, &tmp)?;
    drop(f);
    fs::rename(&tmp, path)?;
    sync_dir(parent)
}

/// Opens a new file next to `dest` for staging its content: `{dest}#{n}`, created exclusively.
/// (The `file://` lake's object store treats such names as unfinished uploads and never lists
/// them.)
pub fn staging_file(dest: &Path) -> io::Result<(File, PathBuf)> {
    for n in 1u32.. {
        let mut p = dest.as_os_str().to_owned();
        p.push(format!("#{n}"));
        let p = PathBuf::from(p);
        match OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(f) => return Ok((f, p)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("no free staging name"))
}

#[cfg(test)]
static SYNCED: parking_lot::Mutex<Vec<PathBuf>> = parking_lot::Mutex::new(Vec::new());

/// Test hook: every path synced so far (files and directories) under `root`.
#[cfg(test)]
pub(crate) fn synced_under(root: &Path) -> Vec<PathBuf> {
    SYNCED
        .lock()
        .iter()
        .filter(|p| p.starts_with(root))
        .cloned()
        .collect()
}

#[cfg(test)]
fn record(path: &Path) {
    SYNCED.lock().push(path.to_path_buf());
}

#[cfg(not(test))]
fn record(_: &Path) {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_directories_and_their_parent_are_synced() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let deep = root.join("a/b/c");
        create_dir_all(&deep).unwrap();
        assert!(deep.is_dir());
        let synced = synced_under(&root);
        for d in [root.clone(), root.join("a"), root.join("a/b"), deep.clone()] {
            assert!(
                synced.contains(&d),
                "{} not synced: {synced:?}",
                d.display()
            );
        }
    }

    #[test]
    fn atomic_writes_sync_the_file_then_its_directory() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let path = root.join("state/progress.json");
        write_atomic(&path, b"{}").unwrap();
        write_atomic(&path, b"{\"a\": 1}").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"{\"a\": 1}");
        assert!(!root.join("state/progress.json.tmp").exists());
        let synced = synced_under(&root);
        let tmp = root.join("state/progress.json.tmp");
        let (file_at, dir_at) = (
            synced.iter().rposition(|p| *p == tmp).expect("file synced"),
            synced
                .iter()
                .rposition(|p| *p == root.join("state"))
                .expect("directory synced"),
        );
        assert!(file_at < dir_at, "the rename is synced after the data");
    }

    #[test]
    fn created_files_are_synced_with_their_entry() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let path = root.join("log/p=0/00000000000000000042.wal");
        create_file(&path).unwrap();
        let synced = synced_under(&root);
        for p in [&path, &root.join("log/p=0"), &root.join("log"), &root] {
            assert!(synced.contains(p), "{} not synced: {synced:?}", p.display());
        }
    }
}
