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
//! [`dead_letter_path`], [`view_run_prefix`] and their prefixes.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    BackoffConfig, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
    WriteMultipart,
};
use tracing::{debug, warn};
use url::Url;

/// Parts of a streamed upload in flight at once; bounds its memory to this many 5 MiB parts.
const UPLOAD_PARTS_IN_FLIGHT: usize = 8;
/// [`Lake::put`] sends objects larger than this (segments, views) as a multipart upload, so
/// one failed request resends one part, not the whole object.
pub const MULTIPART_THRESHOLD: usize = 10 * 1024 * 1024;
/// Retries of a failed cloud request, unless `lake_options` sets `max_retries`.
pub const DEFAULT_MAX_RETRIES: usize = 6;
/// How long a cloud request is retried at most, unless `lake_options` sets `retry_timeout`.
const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(60);
/// The lake options lambda-ctl reads itself instead of passing them to object_store.
const OWN_OPTIONS: [&str; 3] = ["max_retries", "retry_timeout", "instance_credentials"];

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

/// The file of a `file://` lake object, as object_store's local store names it.
fn local_file(root: &std::path::Path, location: &Path) -> std::path::PathBuf {
    let mut file = root.to_path_buf();
    file.extend(location.parts().map(|p| p.as_ref().to_string()));
    file
}

/// [`Lake::put`] (or, with `create`, [`Lake::put_if_absent`]) on a `file://` lake.
async fn put_local(
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

/// Syncs `dir` and each directory above it up to `root` (the directories a write may have
/// created, and the entries naming them).
fn sync_dirs_up_to(root: &std::path::Path, dir: &std::path::Path) -> io::Result<()> {
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

/// Builds a cloud store from the environment (`prefix*` variables, as object_store's own
/// `from_env` reads them), then the URL's bucket or container, then `options`.
fn cloud(
    url: &str,
    parsed: &Url,
    options: &BTreeMap<String, String>,
    env: &[(String, String)],
) -> Result<Lake, LakeError> {
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(LakeError::UnsupportedUrl {
            url: url.to_string(),
            reason: "the bucket or container name is missing".into(),
        });
    }
    // The builders parse `scheme://bucket` (and `abfss://container@account…`) themselves; the
    // path is the lake's prefix inside the bucket, applied with a PrefixStore below.
    let bucket_url = format!(
        "{}://{}",
        parsed.scheme(),
        &parsed[url::Position::BeforeUsername..url::Position::AfterPort]
    );
    let prefix = parsed.path().trim_matches('/');
    let open = |source| LakeError::Open {
        url: url.to_string(),
        source,
    };
    let own = OwnOptions::from(options)?;
    let options: BTreeMap<String, String> = options
        .iter()
        .filter(|(k, _)| !OWN_OPTIONS.contains(&k.to_ascii_lowercase().as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let options = &options;
    let refuse = |store, hint| LakeError::CloudWithoutCredentials {
        store,
        url: url.to_string(),
        hint,
    };
    let store: Arc<dyn ObjectStore> = match parsed.scheme() {
        "s3" | "s3a" => {
            let mut b = AmazonS3Builder::new().with_retry(own.retry.clone());
            for (key, value) in settings::<AmazonS3ConfigKey>(env, "AWS_", options, "S3")? {
                b = b.with_config(key, value);
            }
            let set = |key| b.get_config_value(&key).is_some_and(|v| !v.is_empty());
            let configured = set(AmazonS3ConfigKey::AccessKeyId)
                || set(AmazonS3ConfigKey::SecretAccessKey)
                || set(AmazonS3ConfigKey::WebIdentityTokenFile)
                || set(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
                || set(AmazonS3ConfigKey::ContainerCredentialsFullUri)
                || b.get_config_value(&AmazonS3ConfigKey::SkipSignature)
                    .is_some_and(|v| v == "true");
            if !configured && !own.instance_credentials {
                return Err(refuse(
                    "S3",
                    "set access_key_id and secret_access_key (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), web_identity_token_file with role_arn, or skip_signature",
                ));
            }
            let b = b.with_url(&bucket_url);
            rooted(b.build().map_err(open)?, prefix)?
        }
        "gs" => {
            let mut b = GoogleCloudStorageBuilder::new().with_retry(own.retry.clone());
            if let Some((_, path)) = env.iter().find(|(k, _)| k == "SERVICE_ACCOUNT") {
                b = b.with_service_account_path(path);
            }
            for (key, value) in settings::<GoogleConfigKey>(env, "GOOGLE_", options, "GCS")? {
                b = b.with_config(key, value);
            }
            let configured = [
                GoogleConfigKey::ServiceAccount,
                GoogleConfigKey::ServiceAccountKey,
                GoogleConfigKey::ApplicationCredentials,
            ]
            .iter()
            .any(|key| b.get_config_value(key).is_some_and(|v| !v.is_empty()));
            // `instance_credentials` does not apply: GCS never uses the metadata server.
            if !configured {
                return Err(LakeError::GcsWithoutCredentials {
                    url: url.to_string(),
                });
            }
            let b = b.with_url(&bucket_url);
            rooted(b.build().map_err(open)?, prefix)?
        }
        _ => {
            let mut b = MicrosoftAzureBuilder::new().with_retry(own.retry.clone());
            for (key, value) in settings::<AzureConfigKey>(env, "AZURE_", options, "Azure")? {
                b = b.with_config(key, value);
            }
            if let Some((_, endpoint)) = env.iter().find(|(k, _)| k == "MSI_ENDPOINT") {
                b = b.with_msi_endpoint(endpoint);
            }
            let set = |key| b.get_config_value(&key).is_some_and(|v| !v.is_empty());
            let on = |key| b.get_config_value(&key).is_some_and(|v| v == "true");
            let configured = set(AzureConfigKey::AccessKey)
                || set(AzureConfigKey::SasKey)
                || set(AzureConfigKey::Token)
                || set(AzureConfigKey::ClientSecret)
                || set(AzureConfigKey::FederatedTokenFile)
                || on(AzureConfigKey::UseEmulator)
                || on(AzureConfigKey::UseAzureCli)
                || on(AzureConfigKey::SkipSignature)
                // A SAS token in the URL's query.
                || parsed.query().is_some_and(|q| q.contains("sig="));
            if !configured && !own.instance_credentials {
                return Err(refuse(
                    "Azure",
                    "set access_key (AZURE_STORAGE_ACCOUNT_KEY), sas_key, bearer_token, client_id with client_secret and tenant_id, federated_token_file, use_azure_cli or use_emulator",
                ));
            }
            let b = b.with_url(&bucket_url);
            rooted(b.build().map_err(open)?, prefix)?
        }
    };
    Ok(Lake {
        store,
        base: if prefix.is_empty() {
            format!("{bucket_url}/")
        } else {
            format!("{bucket_url}/{prefix}/")
        },
        local: None,
    })
}

/// The lake options lambda-ctl reads itself (see the module docs).
struct OwnOptions {
    retry: RetryConfig,
    /// Whether the client may ask the instance metadata service for credentials.
    instance_credentials: bool,
}

impl OwnOptions {
    fn from(options: &BTreeMap<String, String>) -> Result<OwnOptions, LakeError> {
        let mut out = OwnOptions {
            retry: RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: DEFAULT_MAX_RETRIES,
                retry_timeout: DEFAULT_RETRY_TIMEOUT,
            },
            instance_credentials: false,
        };
        for (key, value) in options {
            let bad = |reason: &str| LakeError::BadOption {
                key: key.clone(),
                reason: format!("{reason}, found `{value}`"),
            };
            match key.to_ascii_lowercase().as_str() {
                "max_retries" => {
                    out.retry.max_retries = value
                        .trim()
                        .parse()
                        .map_err(|_| bad("expected a number of retries (0 disables them)"))?;
                }
                "retry_timeout" => {
                    out.retry.retry_timeout = crate::spec::duration::parse(value)
                        .map_err(|e| bad(&format!("expected a duration like 30s or 2m ({e})")))?;
                }
                "instance_credentials" => {
                    out.instance_credentials = match value.trim() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(bad("expected \"true\" or \"false\"")),
                    };
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

/// The settings for one store kind: recognised `PREFIX*` environment variables (others are
/// ignored, as object_store does), then every lake option, each of which must be recognised.
fn settings<K: FromStr>(
    env: &[(String, String)],
    env_prefix: &str,
    options: &BTreeMap<String, String>,
    store: &'static str,
) -> Result<Vec<(K, String)>, LakeError> {
    let mut out: Vec<(K, String)> = env
        .iter()
        .filter(|(k, _)| k.starts_with(env_prefix))
        .filter_map(|(k, v)| Some((k.to_ascii_lowercase().parse().ok()?, v.clone())))
        .collect();
    for (key, value) in options {
        let parsed = key
            .to_ascii_lowercase()
            .parse()
            .map_err(|_| LakeError::UnknownOption {
                store,
                key: key.clone(),
            })?;
        out.push((parsed, value.clone()));
    }
    Ok(out)
}

fn rooted<S: ObjectStore>(store: S, prefix: &str) -> Result<Arc<dyn ObjectStore>, LakeError> {
    if prefix.is_empty() {
        return Ok(Arc::new(store));
    }
    Ok(Arc::new(PrefixStore::new(store, parse(prefix)?)))
}

/// `archive/{pipeline}/`: every segment of a pipeline.
pub fn archive_prefix(pipeline: &str) -> String {
    format!("archive/{pipeline}/")
}

/// `archive/{pipeline}/p={partition}/{lo:020}-{hi:020}.parquet`: the segment `[lo, hi)`.
/// Zero-padded, so listing order is position order.
pub fn archive_path(pipeline: &str, partition: u32, lo: u64, hi: u64) -> String {
    format!("archive/{pipeline}/p={partition}/{lo:020}-{hi:020}.parquet")
}

/// `dead_letters/{pipeline}/`: every rejected event of a pipeline.
pub fn dead_letters_prefix(pipeline: &str) -> String {
    format!("dead_letters/{pipeline}/")
}

/// `dead_letters/{pipeline}/{arrival_ms:020}-{unique}.ndjson`: one batch of rejected events
/// (one JSON object per line, with the reason). Rejected events have no position, so the file is
/// named by arrival time (zero-padded: listing order is arrival order) and a suffix the writer
/// makes unique.
pub fn dead_letter_path(pipeline: &str, arrival_ms: i64, unique: &str) -> String {
    format!("dead_letters/{pipeline}/{arrival_ms:020}-{unique}.ndjson")
}

/// `views/{pipeline}/{view}/`: every published version of a batch view.
pub fn view_prefix(pipeline: &str, view: &str) -> String {
    format!("views/{pipeline}/{view}/")
}

/// `views/{pipeline}/{view}/run={run_id}/`: the batch view written by one run.
pub fn view_run_prefix(pipeline: &str, view: &str, run_id: i64) -> String {
    format!("views/{pipeline}/{view}/run={run_id}/")
}

/// `runs/{pipeline}/run={run_id}/`: scratch files of one batch run (the partials of its groups
/// when it is scaled out), deleted when the run publishes.
pub fn run_scratch_prefix(pipeline: &str, run_id: i64) -> String {
    format!("runs/{pipeline}/run={run_id}/")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_options() -> BTreeMap<String, String> {
        BTreeMap::new()
    }

    fn options(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A GCS key that needs no token exchange, pointed at a closed loopback port: building a
    /// store from it touches no network.
    const OFFLINE_GCS_KEY: &str = r#"{"private_key": "", "private_key_id": "", "client_email": "", "disable_oauth": true, "gcs_base_url": "http://127.0.0.1:9"}"#;

    // The behaviour of every backend (put, compare-and-swap, list, delete, multipart) is
    // tested in tests/it/lakes.rs, on memory, file, S3 and Azure alike.

    #[test]
    fn url_errors_say_what_is_wrong() {
        let cases = [
            ("ftp://host/lake", "unknown scheme `ftp`"),
            ("just a path", "relative URL without a base"),
            ("file://relative/dir", "needs an absolute path"),
            ("s3:///prefix", "bucket or container name is missing"),
            ("gs://", "bucket or container name is missing"),
        ];
        for (url, expected) in cases {
            let err = Lake::open_with_env(url, &no_options(), &[]).expect_err(url);
            let text = err.to_string();
            assert!(
                matches!(err, LakeError::UnsupportedUrl { .. }),
                "{url}: {text}"
            );
            assert!(text.contains(expected), "{url}: {text}");
            assert!(text.contains("s3://BUCKET/PREFIX"), "{url}: {text}");
        }
    }

    #[test]
    fn unknown_options_are_rejected_without_printing_values() {
        let err = Lake::open_with_env(
            "s3://bucket/prefix",
            &options(&[("region", "eu-west-1"), ("secret_sauce", "hunter2")]),
            &[],
        )
        .expect_err("unknown key");
        let text = err.to_string();
        assert!(
            matches!(err, LakeError::UnknownOption { store: "S3", .. }),
            "{text}"
        );
        assert!(text.contains("`secret_sauce`"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn s3_lake_is_configured_from_options_and_rooted_at_its_prefix() {
        let lake = Lake::open_with_env(
            "s3://lake-bucket/team/prod/",
            &options(&[
                ("endpoint", "http://127.0.0.1:5000"),
                ("region", "us-east-1"),
                ("allow_http", "true"),
                ("access_key_id", "test"),
                ("secret_access_key", "test"),
            ]),
            &env(&[("AWS_REGION", "eu-central-1"), ("UNRELATED", "x")]),
        )
        .expect("builds without contacting the server");
        assert_eq!(lake.root_url(), "s3://lake-bucket/team/prod/");
        assert_eq!(
            lake.url(&archive_path("clicks", 0, 5, 9)),
            "s3://lake-bucket/team/prod/archive/clicks/p=0/00000000000000000005-00000000000000000009.parquet"
        );
        let bare = Lake::open_with_env(
            "s3a://lake-bucket",
            &no_options(),
            &env(&[("AWS_ACCESS_KEY_ID", "k"), ("AWS_SECRET_ACCESS_KEY", "s")]),
        )
        .expect("builds");
        assert_eq!(bare.root_url(), "s3a://lake-bucket/");
    }

    #[test]
    fn azure_lake_accepts_the_emulator_and_account_urls() {
        let lake = Lake::open_with_env(
            "az://lake/prefix",
            &options(&[("use_emulator", "true")]),
            &[],
        )
        .expect("emulator config");
        assert_eq!(lake.root_url(), "az://lake/prefix/");
        let lake = Lake::open_with_env(
            "abfss://lake@myaccount.dfs.core.windows.net/data",
            &no_options(),
            &env(&[("AZURE_STORAGE_ACCOUNT_KEY", "a2V5")]),
        )
        .expect("account from the URL");
        assert_eq!(
            lake.url("x"),
            "abfss://lake@myaccount.dfs.core.windows.net/data/x"
        );
    }

    #[test]
    fn gcs_without_credentials_is_refused_before_building_a_client() {
        // Settings that are not credentials do not count.
        let err = Lake::open_with_env(
            "gs://bucket/prefix",
            &options(&[("base_url", "http://127.0.0.1:9")]),
            &env(&[("GOOGLE_BUCKET", "other"), ("SERVICE_ACCOUNT_X", "nope")]),
        )
        .expect_err("no credentials");
        assert!(
            matches!(err, LakeError::GcsWithoutCredentials { .. }),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains("GOOGLE_SERVICE_ACCOUNT"), "{text}");
        assert!(text.contains("metadata"), "{text}");
        // An empty value is no credential either.
        let err = Lake::open_with_env(
            "gs://bucket",
            &no_options(),
            &env(&[("GOOGLE_SERVICE_ACCOUNT_KEY", "")]),
        )
        .expect_err("empty key");
        assert!(
            matches!(err, LakeError::GcsWithoutCredentials { .. }),
            "{err}"
        );
    }

    #[test]
    fn gcs_with_explicit_credentials_builds_offline() {
        let from_env = Lake::open_with_env(
            "gs://bucket/prefix",
            &no_options(),
            &env(&[("GOOGLE_SERVICE_ACCOUNT_KEY", OFFLINE_GCS_KEY)]),
        )
        .expect("key from the environment");
        assert_eq!(from_env.root_url(), "gs://bucket/prefix/");
        Lake::open_with_env(
            "gs://bucket",
            &options(&[("service_account_key", OFFLINE_GCS_KEY)]),
            &[],
        )
        .expect("key from lake_options");
        // A configured credentials file is used (and must exist), never the metadata server.
        let err = Lake::open_with_env(
            "gs://bucket",
            &no_options(),
            &env(&[("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/adc.json")]),
        )
        .expect_err("missing file");
        assert!(matches!(err, LakeError::Open { .. }), "{err}");
    }

    #[test]
    fn s3_and_azure_without_credentials_are_refused_unless_instance_identity_is_asked_for() {
        let cases = [
            (
                "s3://bucket/lake",
                "S3",
                "access_key_id",
                options(&[("instance_credentials", "true")]),
            ),
            (
                "az://container/lake",
                "Azure",
                "access_key",
                options(&[("instance_credentials", "true"), ("account_name", "acct")]),
            ),
        ];
        for (url, store, hint, instance) in cases {
            // Settings that are not credentials do not count; neither does an empty key.
            let err = Lake::open_with_env(
                url,
                &options(&[("endpoint", "http://127.0.0.1:9"), ("allow_http", "true")]),
                &env(&[
                    ("AWS_ACCESS_KEY_ID", ""),
                    ("AZURE_STORAGE_ACCOUNT_NAME", "acct"),
                ]),
            )
            .expect_err(url);
            let text = err.to_string();
            assert!(
                matches!(err, LakeError::CloudWithoutCredentials { store: s, .. } if s == store),
                "{url}: {text}"
            );
            assert!(text.contains(hint), "{text}");
            assert!(text.contains("instance_credentials"), "{text}");
            assert!(text.contains("169.254.169.254"), "{text}");
            // Explicitly asked for: the instance identity may be used (nothing is contacted
            // until the first request).
            Lake::open_with_env(url, &instance, &[]).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
        // Any real credential is enough.
        let ok: [(&str, BTreeMap<String, String>); 5] = [
            (
                "s3://b",
                options(&[("access_key_id", "k"), ("secret_access_key", "s")]),
            ),
            ("s3://b", options(&[("skip_signature", "true")])),
            ("az://c", options(&[("use_emulator", "true")])),
            (
                "az://c",
                options(&[("account_name", "a"), ("sas_key", "sv=1&sig=x")]),
            ),
            (
                "az://c",
                options(&[("account_name", "a"), ("bearer_token", "t")]),
            ),
        ];
        for (url, opts) in ok {
            Lake::open_with_env(url, &opts, &[]).unwrap_or_else(|e| panic!("{url}: {e}"));
        }
    }

    #[test]
    fn retry_options_are_lambda_ctl_settings_checked_on_open() {
        let creds = [("access_key_id", "k"), ("secret_access_key", "s")];
        let with = |extra: &[(&str, &str)]| {
            let mut o = options(&creds);
            o.extend(options(extra));
            Lake::open_with_env("s3://b/p", &o, &[])
        };
        with(&[("max_retries", "0"), ("retry_timeout", "30s")]).expect("valid retry settings");
        with(&[("MAX_RETRIES", "3"), ("connect_timeout", "2s")]).expect("any case; client keys");
        for (key, value, expected) in [
            ("max_retries", "many", "number of retries"),
            ("retry_timeout", "soon", "duration"),
            ("instance_credentials", "yes", "\"true\" or \"false\""),
        ] {
            let err = with(&[(key, value)]).expect_err(key);
            let text = err.to_string();
            assert!(matches!(err, LakeError::BadOption { .. }), "{text}");
            assert!(text.contains(key) && text.contains(expected), "{text}");
        }
        let own = OwnOptions::from(&no_options()).unwrap();
        assert_eq!(own.retry.max_retries, DEFAULT_MAX_RETRIES);
        assert_eq!(own.retry.retry_timeout, DEFAULT_RETRY_TIMEOUT);
        assert!(!own.instance_credentials);
    }

    #[test]
    fn gcs_never_falls_back_to_the_metadata_server() {
        // Not even when instance credentials are allowed for S3 and Azure.
        let err = Lake::open_with_env(
            "gs://bucket",
            &options(&[("instance_credentials", "true")]),
            &[],
        )
        .expect_err("refused");
        assert!(
            matches!(err, LakeError::GcsWithoutCredentials { .. }),
            "{err}"
        );
        // The only GCS client a default config can build is none at all: the default lake is
        // a directory, and no GOOGLE_* variable of the process environment makes one either.
        let env_only = Lake::open_with_env(
            "gs://bucket",
            &no_options(),
            &env(&[("GOOGLE_BUCKET", "x")]),
        );
        assert!(matches!(
            env_only,
            Err(LakeError::GcsWithoutCredentials { .. })
        ));
    }

    #[tokio::test]
    async fn file_lake_objects_are_synced_with_every_directory_up_to_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap().join("lake");
        let lake =
            Lake::open_with_env(&format!("file://{}", root.display()), &no_options(), &[]).unwrap();
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

    #[test]
    fn layout_paths() {
        assert_eq!(archive_prefix("clicks"), "archive/clicks/");
        assert_eq!(
            archive_path("clicks", 3, 0, 500_000),
            "archive/clicks/p=3/00000000000000000000-00000000000000500000.parquet"
        );
        assert_eq!(
            dead_letter_path("clicks", 1_700_000_000_000, "42-7"),
            "dead_letters/clicks/00000001700000000000-42-7.ndjson"
        );
        assert_eq!(dead_letters_prefix("clicks"), "dead_letters/clicks/");
        assert_eq!(
            view_prefix("clicks", "page_views"),
            "views/clicks/page_views/"
        );
        assert_eq!(
            view_run_prefix("clicks", "page_views", 42),
            "views/clicks/page_views/run=42/"
        );
        // Zero padding keeps lexicographic order = position order.
        assert!(archive_path("a", 0, 9, 10) < archive_path("a", 0, 10, 11));
    }
}
