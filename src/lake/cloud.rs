//! Cloud lakes (S3, Azure, GCS): each store configured from the environment, the URL and
//! `lake_options`; refused without explicit credentials unless the instance's identity is asked
//! for; requests retried as lambda-ctl's own options say (see the module docs of [`super`]).

use std::collections::BTreeMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::prefix::PrefixStore;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};
use url::Url;

use super::{Lake, LakeError, parse};

/// Retries of a failed cloud request, unless `lake_options` sets `max_retries`.
pub const DEFAULT_MAX_RETRIES: usize = 6;
/// How long a cloud request is retried at most, unless `lake_options` sets `retry_timeout`.
const DEFAULT_RETRY_TIMEOUT: Duration = Duration::from_secs(60);
/// The lake options lambda-ctl reads itself instead of passing them to object_store.
const OWN_OPTIONS: [&str; 3] = ["max_retries", "retry_timeout", "instance_credentials"];

/// Builds a cloud store from the environment (`prefix*` variables, as object_store's own
/// `from_env` reads them), then the URL's bucket or container, then `options`.
pub(super) fn cloud(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lake::archive_path;

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
}
