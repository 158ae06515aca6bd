//! The lake: immutable objects (archive segments, dead letters, batch views) in an object store.
//! Everything that speaks `object_store` lives here.
//!
//! A [`Lake`] is one `Arc<dyn ObjectStore>` rooted at the lake URL of `lambda.yaml`, so every
//! path below is relative to that root:
//!
//! - `file:///abs/dir` — a local directory (created if missing);
//! - `memory://` — in-process, for tests;
//! - `s3://bucket/prefix` — AWS S3 or a compatible server, configured from `AWS_*` and
//!   `lake_options` (`endpoint`, `region`, `allow_http`, `access_key_id`, …);
//! - `az://container/prefix` (also `azure://`, `abfs[s]://`) — from `AZURE_*` and
//!   `lake_options` (`account_name`, `use_emulator`, …);
//! - `gs://bucket/prefix` — from `GOOGLE_*` and `lake_options`. Credentials must be configured
//!   explicitly (`service_account`, `service_account_key` or `application_credentials`):
//!   without them the GCS client would ask the cloud metadata address 169.254.169.254, which a
//!   developer machine or CI must never do, so opening fails instead.
//!
//! S3 and Azure refuse to open without credentials too (keys, a token, a web identity, the
//! emulator or `skip_signature`), unless `lake_options` says `instance_credentials: "true"`:
//! only then may their clients ask the instance metadata service, as on a cloud VM.
//!
//! Cloud requests that fail transiently (connection errors, 5xx, throttling) are retried with
//! exponential back-off — at most `max_retries` times (default [`DEFAULT_MAX_RETRIES`]) within
//! `retry_timeout` (default 60s) — then the operation fails, and with it the run: a batch run
//! publishes nothing unless every write succeeded. These three options are lambda-ctl's own;
//! every other lake option is an object_store setting of the store kind.
//!
//! A `file://` lake writes its objects itself rather than through object_store's local store,
//! which never syncs: each object is written to a staging file beside it, synced, renamed into
//! place, and its directory (and every directory up to the lake root, some of which the write
//! may have created) synced — a segment must be on disk before its manifest row lets the
//! write-ahead log below it go. Reads, listings and deletes go through object_store.
//!
//! The layout (DESIGN.md §1, §4) is a set of plain functions: [`archive_path`],
//! [`dead_letter_path`], [`view_run_prefix`] and their prefixes (`layout`).
//!
//! This module is the API; the cloud stores' configuration and credentials are `cloud`'s,
//! the synced writes of a `file://` lake `local`'s.

mod cloud;
mod layout;
mod local;

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use tracing::{debug, warn};
use url::Url;

pub use cloud::DEFAULT_MAX_RETRIES;
pub use layout::*;

use cloud::cloud;
use local::{copy_local, local_file, put_local, sync_dirs_up_to};

/// Parts of a streamed upload in flight at once; bounds its memory to this many 5 MiB parts.
const UPLOAD_PARTS_IN_FLIGHT: usize = 8;
/// [`Lake::put`] sends objects larger than this (segments, views) as a multipart upload, so
/// one failed request resends one part, not the whole object.
pub const MULTIPART_THRESHOLD: usize = 10 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum LakeError {
    #[error(
        "unsupported lake URL `{url}`: {reason} (use file:///ABSOLUTE/DIR, s3://BUCKET/PREFIX, az://CONTAINER/PREFIX, gs://BUCKET/PREFIX or memory://)"
    )]
    UnsupportedUrl { url: String, reason: String },
    #[error(
        "lake option `{key}` is not a {store} setting (see the object_store crate's {store} config keys)"
    )]
    UnknownOption { store: &'static str, key: String },
    #[error(
        "lake {url}: no Google Cloud credentials configured; set GOOGLE_SERVICE_ACCOUNT (a key file), GOOGLE_SERVICE_ACCOUNT_KEY (the key JSON) or GOOGLE_APPLICATION_CREDENTIALS, or the same keys in lake_options (refusing to fall back to the cloud metadata server)"
    )]
    GcsWithoutCredentials { url: String },
    #[error(
        "lake {url}: no {store} credentials configured; {hint} in lake_options or the environment, or set lake option `instance_credentials: \"true\"` to use the cloud instance's identity (refusing to ask the metadata server 169.254.169.254 otherwise)"
    )]
    CloudWithoutCredentials {
        store: &'static str,
        url: String,
        hint: &'static str,
    },
    #[error("lake option `{key}`: {reason}")]
    BadOption { key: String, reason: String },
    #[error("cannot create the lake directory {dir}: {source}")]
    CreateDir { dir: String, source: std::io::Error },
    #[error("cannot open the lake {url}: {source}")]
    Open {
        url: String,
        source: object_store::Error,
    },
    #[error("invalid lake path `{path}`: {source}")]
    InvalidPath {
        path: String,
        source: object_store::path::Error,
    },
    #[error("lake object {path} does not exist")]
    NotFound { path: String },
    #[error("lake {op} {path}: {source}")]
    Store {
        op: &'static str,
        path: String,
        source: object_store::Error,
    },
    /// Writing (or syncing) an object of a `file://` lake failed.
    #[error("lake {op} {path}: {source}")]
    Local {
        op: &'static str,
        path: String,
        source: io::Error,
    },
}

/// An object under a listed prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Relative to the lake root, like every path of this module.
    pub path: String,
    pub size: u64,
}

/// The object store holding the lake; cheap to clone.
#[derive(Clone)]
pub struct Lake {
    /// Rooted at the lake URL: paths given to it are relative to the root.
    store: Arc<dyn ObjectStore>,
    /// The lake URL ending in `/`; [`Lake::url`] appends a path to it.
    base: String,
    /// The directory of a `file://` lake, whose objects [`Lake::put`] writes and syncs itself.
    local: Option<Arc<std::path::PathBuf>>,
}

impl fmt::Debug for Lake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lake").field("url", &self.base).finish()
    }
}

impl Lake {
    /// Opens the lake at `url` (the `lake` of `lambda.yaml`, already made absolute) with the
    /// store settings from the environment and `options` (`lake_options`). Opening contacts no
    /// server.
    pub fn open(url: &str, options: &BTreeMap<String, String>) -> Result<Lake, LakeError> {
        // Like object_store's `from_env`, non-UTF-8 variables are not settings.
        let env: Vec<(String, String)> = std::env::vars_os()
            .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
            .collect();
        Lake::open_with_env(url, options, &env)
    }

    /// [`Lake::open`] with an explicit environment, so tests do not depend on (or change) the
    /// process environment.
    fn open_with_env(
        url: &str,
        options: &BTreeMap<String, String>,
        env: &[(String, String)],
    ) -> Result<Lake, LakeError> {
        let unsupported = |reason: &str| LakeError::UnsupportedUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let parsed = Url::parse(url).map_err(|e| unsupported(&e.to_string()))?;
        let scheme = parsed.scheme();
        if matches!(scheme, "file" | "memory") && !options.is_empty() {
            warn!(
                url,
                "lake_options are ignored by file:// and memory:// lakes"
            );
        }
        let lake = match scheme {
            "memory" => Lake {
                store: Arc::new(InMemory::new()),
                base: "memory:///".into(),
                local: None,
            },
            "file" => {
                let dir = parsed
                    .to_file_path()
                    .ok()
                    .filter(|p| p.is_absolute())
                    .ok_or_else(|| unsupported("a file:// lake needs an absolute path"))?;
                crate::fsync::create_dir_all(&dir).map_err(|source| LakeError::CreateDir {
                    dir: dir.display().to_string(),
                    source,
                })?;
                let open = |source| LakeError::Open {
                    url: url.to_string(),
                    source,
                };
                // Removing a lake's last object also removes the directories it leaves empty.
                let store = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(open)?
                    .with_automatic_cleanup(true);
                Lake {
                    store: Arc::new(store),
                    base: Url::from_directory_path(&dir)
                        .map_err(|()| unsupported("a file:// lake needs an absolute path"))?
                        .to_string(),
                    local: Some(Arc::new(dir)),
                }
            }
            "s3" | "s3a" | "az" | "azure" | "abfs" | "abfss" | "gs" => {
                cloud(url, &parsed, options, env)?
            }
            other => return Err(unsupported(&format!("unknown scheme `{other}`"))),
        };
        debug!(url = %lake.base, "opened lake");
        Ok(lake)
    }

    /// The underlying store, rooted at the lake URL.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::clone(&self.store)
    }

    /// The lake URL, ending in `/`.
    pub fn root_url(&self) -> &str {
        &self.base
    }

    /// The files holding `paths` when this is a `file://` lake, for readers that scan local
    /// files themselves (polars' Parquet reader); `None` for any other store, whose objects are
    /// read with [`Lake::get`]. Whether each file exists is the reader's to check.
    pub fn local_files<'a>(
        &self,
        paths: impl IntoIterator<Item = &'a str>,
    ) -> Result<Option<Vec<std::path::PathBuf>>, LakeError> {
        let Some(root) = &self.local else {
            return Ok(None);
        };
        let files = paths
            .into_iter()
            .map(|p| Ok(local_file(root, &parse(p)?)))
            .collect::<Result<_, LakeError>>()?;
        Ok(Some(files))
    }

    /// The full URL of a lake path (e.g. for polars `scan_parquet`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path.trim_start_matches('/'))
    }

    /// Writes a whole object, replacing any object at `path`. Atomic: readers see the old
    /// object or the new one, never a part. Durable when it returns (on a `file://` lake:
    /// synced, with its directory). Above [`MULTIPART_THRESHOLD`] bytes it is sent to a cloud
    /// store as a multipart upload (aborted again if a part fails).
    pub async fn put(&self, path: &str, bytes: impl Into<Bytes>) -> Result<(), LakeError> {
        let bytes: Bytes = bytes.into();
        if let Some(root) = &self.local {
            return put_local(root, path, bytes, false).await.map(|_| ());
        }
        if bytes.len() > MULTIPART_THRESHOLD {
            let mut upload = self.put_multipart(path).await?;
            let sent = async {
                for chunk in bytes.chunks(MULTIPART_THRESHOLD / 2) {
                    upload.write(chunk).await?;
                }
                Ok::<(), LakeError>(())
            }
            .await;
            if let Err(e) = sent {
                if let Err(abort) = upload.abort().await {
                    warn!(path, error = %abort, "cannot abort a failed upload");
                }
                return Err(e);
            }
            return upload.finish().await;
        }
        let location = parse(path)?;
        self.store
            .put(&location, PutPayload::from(bytes))
            .await
            .map_err(store_err("put", path))?;
        Ok(())
    }

    /// Writes a whole object only if `path` holds none; `false` (writing nothing) if it does.
    pub async fn put_if_absent(
        &self,
        path: &str,
        bytes: impl Into<Bytes>,
    ) -> Result<bool, LakeError> {
        if let Some(root) = &self.local {
            return put_local(root, path, bytes.into(), true).await;
        }
        let location = parse(path)?;
        let opts = PutOptions::from(PutMode::Create);
        match self
            .store
            .put_opts(&location, PutPayload::from(bytes.into()), opts)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            Err(e) => Err(store_err("put", path)(e)),
        }
    }

    /// Gives the object at `from` a second name `to` (replacing any object there), for objects
    /// that are never rewritten in place: on a `file://` lake a hard link (no bytes copied; the
    /// new entry synced with its directories, as by [`Lake::put`]), on other stores the
    /// store's own copy (the bytes stay on the server). Durable when it returns.
    pub async fn copy(&self, from: &str, to: &str) -> Result<(), LakeError> {
        if let Some(root) = &self.local {
            return copy_local(root, from, to).await;
        }
        let (source, dest) = (parse(from)?, parse(to)?);
        self.store
            .copy(&source, &dest)
            .await
            .map_err(store_err("copy", to))
    }

    /// Reads a whole object.
    pub async fn get(&self, path: &str) -> Result<Bytes, LakeError> {
        let location = parse(path)?;
        let result = self
            .store
            .get(&location)
            .await
            .map_err(store_err("get", path))?;
        result.bytes().await.map_err(store_err("get", path))
    }

    pub async fn exists(&self, path: &str) -> Result<bool, LakeError> {
        let location = parse(path)?;
        match self.store.head(&location).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(store_err("head", path)(e)),
        }
    }

    /// Every object under the directory-like `prefix` (`""` for the whole lake), sorted by
    /// path. `archive/a` lists `archive/a/…`, not `archive/ab/…`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>, LakeError> {
        let location = parse(prefix)?;
        let root = (!prefix.trim_matches('/').is_empty()).then_some(&location);
        let mut objects: Vec<ObjectInfo> = self
            .store
            .list(root)
            .map_ok(|meta| ObjectInfo {
                path: meta.location.to_string(),
                size: meta.size,
            })
            .try_collect()
            .await
            .map_err(store_err("list", prefix))?;
        objects.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(objects)
    }

    /// Deletes an object. Deleting a missing object succeeds, on every store, so retries and
    /// garbage collection can run twice.
    pub async fn delete(&self, path: &str) -> Result<(), LakeError> {
        let location = parse(path)?;
        match self.store.delete(&location).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err("delete", path)(e)),
        }
    }

    /// Starts a streamed upload of a large object: parts are sent while more is written, and
    /// the object appears at `path` only when [`Upload::finish`] succeeds.
    pub async fn put_multipart(&self, path: &str) -> Result<Upload, LakeError> {
        let location = parse(path)?;
        let upload = self
            .store
            .put_multipart(&location)
            .await
            .map_err(store_err("start upload", path))?;
        Ok(Upload {
            path: path.to_string(),
            inner: WriteMultipart::new(upload),
            local: self
                .local
                .as_ref()
                .map(|root| (root.clone(), local_file(root, &location))),
        })
    }
}

/// A streamed upload from [`Lake::put_multipart`]. Dropping it without [`Upload::finish`] or
/// [`Upload::abort`] leaves no object, but may leave uploaded parts on a cloud store until its
/// lifecycle rules remove them.
pub struct Upload {
    path: String,
    inner: WriteMultipart,
    /// On a `file://` lake: the root and the object's file, synced once the upload finishes.
    local: Option<(Arc<std::path::PathBuf>, std::path::PathBuf)>,
}

impl Upload {
    /// Appends `data`; waits while too many parts are in flight.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), LakeError> {
        self.inner
            .wait_for_capacity(UPLOAD_PARTS_IN_FLIGHT)
            .await
            .map_err(store_err("upload", &self.path))?;
        self.inner.write(data);
        Ok(())
    }

    /// Sends the rest and completes the object (durably, on a `file://` lake).
    pub async fn finish(self) -> Result<(), LakeError> {
        self.inner
            .finish()
            .await
            .map_err(store_err("finish upload", &self.path))?;
        if let Some((root, file)) = self.local {
            let err = |source| LakeError::Local {
                op: "finish upload",
                path: self.path.clone(),
                source,
            };
            tokio::task::spawn_blocking(move || {
                crate::fsync::sync_file(&std::fs::File::open(&file)?, &file)?;
                sync_dirs_up_to(&root, file.parent().unwrap_or(&root))
            })
            .await
            .map_err(|e| err(io::Error::other(e)))?
            .map_err(err)?;
        }
        Ok(())
    }

    /// Cancels the upload and discards the parts sent so far.
    pub async fn abort(self) -> Result<(), LakeError> {
        self.inner
            .abort()
            .await
            .map_err(store_err("abort upload", &self.path))
    }
}

fn parse(path: &str) -> Result<Path, LakeError> {
    Path::parse(path).map_err(|source| LakeError::InvalidPath {
        path: path.to_string(),
        source,
    })
}

fn store_err(op: &'static str, path: &str) -> impl FnOnce(object_store::Error) -> LakeError {
    let path = path.to_string();
    move |source| match source {
        object_store::Error::NotFound { .. } => LakeError::NotFound { path },
        source => LakeError::Store { op, path, source },
    }
}
