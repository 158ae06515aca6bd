//! The writes of a `file://` lake: each object through a synced staging file renamed into
//! place, then every directory up to the lake root synced (see the module docs of [`super`]).

use std::io::{self, Write};
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;

use super::{LakeError, parse};

/// The file of a `file://` lake object, as object_store's local store names it.
pub(super) fn local_file(root: &std::path::Path, location: &Path) -> std::path::PathBuf {
    let mut file = root.to_path_buf();
    file.extend(location.parts().map(|p| p.as_ref().to_string()));
    file
}

/// [`Lake::put`] (or, with `create`, [`Lake::put_if_absent`]) on a `file://` lake.
pub(super) async fn put_local(
    root: &Arc<std::path::PathBuf>,
    path: &str,
    bytes: Bytes,
    create: bool,
) -> Result<bool, LakeError> {
    let location = parse(path)?;
    // The local store reads `NAME#DIGITS` as an unfinished upload (and refuses such paths).
    if location.filename().is_some_and(|f| {
        f.split_once('#')
            .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    }) {
        return Err(LakeError::Local {
            op: "put",
            path: path.to_string(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "names ending in #DIGITS are reserved for uploads in progress",
            ),
        });
    }
    let root = root.clone();
    let err = |source| LakeError::Local {
        op: "put",
        path: path.to_string(),
        source,
    };
    tokio::task::spawn_blocking(move || {
        let dest = local_file(&root, &location);
        write_local(&root, &dest, &bytes, create)
    })
    .await
    .map_err(|e| err(io::Error::other(e)))?
    .map_err(err)
}

/// Writes `dest` through a synced staging file, renamed (or, with `create`, linked unless
/// `dest` exists) into place; then syncs the directories up to `root`. `false`: `dest` existed
/// and `create` was asked.
fn write_local(
    root: &std::path::Path,
    dest: &std::path::Path,
    bytes: &[u8],
    create: bool,
) -> io::Result<bool> {
    let parent = dest.parent().unwrap_or(root);
    std::fs::create_dir_all(parent)?;
    let (mut file, staging) = crate::fsync::staging_file(dest)?;
    let written = file
        .write_all(bytes)
        .and_then(|()| crate::fsync::sync_file(&file, &staging));
    drop(file);
    let placed = written.and_then(|()| {
        if create {
            match std::fs::hard_link(&staging, dest) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(e),
            }
        } else {
            std::fs::rename(&staging, dest).map(|()| true)
        }
    });
    if create || placed.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    let placed = placed?;
    sync_dirs_up_to(root, parent)?;
    Ok(placed)
}

/// [`Lake::copy`] on a `file://` lake: a hard link to the same (never rewritten) file, named
/// through a staging link renamed into place, then every directory up to the root synced.
pub(super) async fn copy_local(
    root: &Arc<std::path::PathBuf>,
    from: &str,
    to: &str,
) -> Result<(), LakeError> {
    let (source, dest) = (
        local_file(root, &parse(from)?),
        local_file(root, &parse(to)?),
    );
    let root = root.clone();
    let err = |source| LakeError::Local {
        op: "copy",
        path: to.to_string(),
        source,
    };
    tokio::task::spawn_blocking(move || -> io::Result<()> {
        let parent = dest.parent().unwrap_or(&root);
        std::fs::create_dir_all(parent)?;
        let staging = std::path::PathBuf::from(format!("{}#link", dest.display()));
        let _ = std::fs::remove_file(&staging);
        std::fs::hard_link(&source, &staging)?;
        let placed = std::fs::rename(&staging, &dest);
        if placed.is_err() {
            let _ = std::fs::remove_file(&staging);
        }
        placed?;
        sync_dirs_up_to(&root, parent)
    })
    .await
    .map_err(|e| err(io::Error::other(e)))?
    .map_err(err)
}

/// Syncs `dir` and each directory above it up to `root` (the directories a write may have
/// created, and the entries naming them).
pub(super) fn sync_dirs_up_to(root: &std::path::Path, dir: &std::path::Path) -> io::Result<()> {
    let mut cur = Some(dir);
    while let Some(d) = cur {
        crate::fsync::sync_dir(d)?;
        if d == root || !d.starts_with(root) {
            break;
        }
        cur = d.parent();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use bytes::Bytes;

    use super::super::*;

    /// A `file://` lake in a temporary directory (kept while the guard lives), and its root.
    fn file_lake() -> (tempfile::TempDir, std::path::PathBuf, Lake) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap().join("lake");
        let lake =
            Lake::open_with_env(&format!("file://{}", root.display()), &BTreeMap::new(), &[])
                .unwrap();
        (dir, root, lake)
    }

    #[tokio::test]
    async fn file_lake_objects_are_synced_with_every_directory_up_to_the_root() {
        let (_dir, root, lake) = file_lake();
        let staged = |f: &std::path::Path| std::path::PathBuf::from(format!("{}#1", f.display()));
        let big = vec![7u8; MULTIPART_THRESHOLD + 1];
        let seg = archive_path("clicks", 0, 0, 5);
        let dl = dead_letter_path("clicks", 1, "1-1");
        for (path, bytes) in [(&seg, b"12345".to_vec()), (&dl, big.clone())] {
            lake.put(path, bytes.clone()).await.unwrap();
            let file = root.join(path);
            assert_eq!(std::fs::read(&file).unwrap(), bytes);
            let synced = crate::fsync::synced_under(&root);
            let last = |p: &std::path::Path| {
                synced
                    .iter()
                    .rposition(|s| s == p)
                    .unwrap_or_else(|| panic!("{} not synced: {synced:?}", p.display()))
            };
            // The data before the entry naming it; then each directory up to the root.
            let data = last(&staged(&file));
            for d in file
                .parent()
                .unwrap()
                .ancestors()
                .take_while(|d| d.starts_with(&root))
            {
                assert!(data < last(d), "{} not synced after the data", d.display());
            }
        }
        // Only the objects are listed: no staging file is left behind.
        let listed: Vec<String> = lake
            .list("")
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.path)
            .collect();
        assert_eq!(listed, vec![seg.clone(), dl]);

        let once = "runs/orders/run=1/finish.json";
        assert!(lake.put_if_absent(once, b"a".to_vec()).await.unwrap());
        assert!(!lake.put_if_absent(once, b"b".to_vec()).await.unwrap());
        assert_eq!(lake.get(once).await.unwrap(), Bytes::from_static(b"a"));
        let file = root.join(once);
        let synced = crate::fsync::synced_under(&root);
        assert!(synced.contains(&staged(&file)) && synced.contains(&root.join("runs")));
        assert!(!staged(&file).exists());

        // A streamed upload is synced once it finishes.
        let view = "views/clicks/v/run=1/part-0.parquet";
        let mut upload = lake.put_multipart(view).await.unwrap();
        upload.write(b"xyz").await.unwrap();
        upload.finish().await.unwrap();
        let synced = crate::fsync::synced_under(&root);
        assert!(synced.contains(&root.join(view)) && synced.contains(&root.join("views")));

        let err = lake.put("archive/x#12", b"x".to_vec()).await.unwrap_err();
        assert!(matches!(err, LakeError::Local { .. }), "{err}");
    }

    #[tokio::test]
    async fn local_files_name_the_objects_of_a_file_lake_only() {
        let (_dir, root, lake) = file_lake();
        let seg = archive_path("clicks", 0, 0, 5);
        lake.put(&seg, b"12345".to_vec()).await.unwrap();
        let files = lake.local_files([seg.as_str()]).unwrap().unwrap();
        assert_eq!(files, vec![root.join(&seg)]);
        assert_eq!(std::fs::read(&files[0]).unwrap(), b"12345");
        assert!(lake.local_files(["a//b"]).is_err());

        let memory = Lake::open_with_env("memory://", &BTreeMap::new(), &[]).unwrap();
        assert_eq!(memory.local_files([seg.as_str()]).unwrap(), None);
    }

    #[tokio::test]
    async fn a_copy_is_a_synced_second_name_that_outlives_the_first() {
        let (_dir, root, file) = file_lake();
        let memory = Lake::open_with_env("memory://", &BTreeMap::new(), &[]).unwrap();
        let (from, to) = (
            "views/clicks/v/run=1/partials.parquet",
            "views/clicks/v/run=2/partials.parquet",
        );
        for lake in [&file, &memory] {
            lake.put(from, b"partials".to_vec()).await.unwrap();
            lake.put(to, b"older".to_vec()).await.unwrap();
            lake.copy(from, to).await.unwrap();
            // Garbage collection of the first run leaves the second one's name.
            lake.delete(from).await.unwrap();
            assert_eq!(lake.get(to).await.unwrap().as_ref(), b"partials");
            let listed: Vec<String> = lake
                .list("views")
                .await
                .unwrap()
                .into_iter()
                .map(|o| o.path)
                .collect();
            assert_eq!(listed, vec![to.to_string()]);
            assert!(lake.copy("views/none", "views/x").await.is_err());
        }
        let synced = crate::fsync::synced_under(&root);
        assert!(
            synced.contains(&root.join("views/clicks/v/run=2")),
            "{synced:?}"
        );
    }
}
