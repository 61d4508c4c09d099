//! Dataset roots as `object_store` locations: a plain path or `file://` URL (the local file
//! system), `s3://bucket/prefix`, `gs://bucket/prefix` or `az://container/prefix`. Remote
//! credentials and endpoints come from the usual environment variables (`AWS_*`, `GOOGLE_*`,
//! `AZURE_*`, read by `object_store`'s `from_env` builders); keys are relative to the root.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::{BackoffConfig, GetOptions, GetRange, ObjectStore, RetryConfig};

use crate::error::DataError;

/// Retries of remote requests inside `object_store` (connection errors, 5xx, throttling): a
/// few quick ones, so that a dead endpoint surfaces within seconds as a reported failure and
/// the loader's own per-item attempts decide the rest.
fn remote_retry_config() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: 4,
        retry_timeout: std::time::Duration::from_secs(60),
    }
}

/// An opened dataset root: the store, the key prefix inside it and the location as given.
#[derive(Debug, Clone)]
pub struct DatasetStore {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    location: String,
}

impl DatasetStore {
    /// Opens `location` with credentials from the environment.
    pub fn open(location: &str) -> Result<Self, DataError> {
        Self::open_with_options(location, std::iter::empty::<(String, String)>())
    }

    /// Opens `location` with extra store options (`object_store` config keys such as
    /// `aws_endpoint` or `aws_allow_http`) applied over the environment.
    pub fn open_with_options(
        location: &str,
        options: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, DataError> {
        let invalid = |reason: String| DataError::InvalidLocation {
            location: location.to_owned(),
            reason,
        };
        let store_error = |source| DataError::Store {
            location: location.to_owned(),
            source,
        };
        if !location.contains("://") {
            return Self::open_local(location, std::path::Path::new(location));
        }
        let url = url::Url::parse(location).map_err(|error| invalid(error.to_string()))?;
        let prefix = Path::from_url_path(url.path())
            .map_err(|error| invalid(error.to_string()))?
            .to_string();
        let options: Vec<(String, String)> = options.into_iter().collect();
        let retry = remote_retry_config();
        let store: Arc<dyn ObjectStore> = match url.scheme() {
            "file" => {
                let path = url
                    .to_file_path()
                    .map_err(|()| invalid("not a local file URL".to_owned()))?;
                return Self::open_local(location, &path);
            }
            "s3" | "s3a" => {
                let mut builder = AmazonS3Builder::from_env()
                    .with_url(location)
                    .with_retry(retry.clone());
                for (key, value) in &options {
                    let key = key.parse().map_err(store_error)?;
                    builder = builder.with_config(key, value);
                }
                Arc::new(builder.build().map_err(store_error)?)
            }
            "gs" => {
                let mut builder = GoogleCloudStorageBuilder::from_env()
                    .with_url(location)
                    .with_retry(retry.clone());
                for (key, value) in &options {
                    let key = key.parse().map_err(store_error)?;
                    builder = builder.with_config(key, value);
                }
                Arc::new(builder.build().map_err(store_error)?)
            }
            "az" | "azure" | "abfs" | "abfss" => {
                let mut builder = MicrosoftAzureBuilder::from_env()
                    .with_url(location)
                    .with_retry(retry.clone());
                for (key, value) in &options {
                    let key = key.parse().map_err(store_error)?;
                    builder = builder.with_config(key, value);
                }
                Arc::new(builder.build().map_err(store_error)?)
            }
            other => {
                return Err(invalid(format!(
                    "unsupported scheme `{other}` (use a path, file://, s3://, gs:// or az://)"
                )))
            }
        };
        Ok(Self {
            store,
            prefix,
            location: location.to_owned(),
        })
    }

    fn open_local(location: &str, path: &std::path::Path) -> Result<Self, DataError> {
        let canonical = path
            .canonicalize()
            .map_err(|error| DataError::InvalidLocation {
                location: location.to_owned(),
                reason: format!("cannot open local folder: {error}"),
            })?;
        if !canonical.is_dir() {
            return Err(DataError::InvalidLocation {
                location: location.to_owned(),
                reason: "not a folder".to_owned(),
            });
        }
        let store =
            LocalFileSystem::new_with_prefix(&canonical).map_err(|source| DataError::Store {
                location: location.to_owned(),
                source,
            })?;
        Ok(Self {
            store: Arc::new(store),
            prefix: String::new(),
            location: location.to_owned(),
        })
    }

    /// The location as given to [`DatasetStore::open`].
    pub fn location(&self) -> &str {
        &self.location
    }

    /// The store path of a key relative to the root.
    pub fn object_path(&self, key: &str) -> Path {
        let full = if self.prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{}/{key}", self.prefix)
        };
        Path::parse(&full).unwrap_or_else(|_| Path::from(full.as_str()))
    }

    /// The key of a store path relative to the root, or `None` outside the root.
    pub fn relative_key(&self, path: &Path) -> Option<String> {
        let full = path.as_ref();
        if self.prefix.is_empty() {
            return Some(full.to_owned());
        }
        full.strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .map(str::to_owned)
    }

    /// Every key under the root with its size, sorted by key.
    pub async fn list_keys(&self) -> Result<Vec<(String, u64)>, DataError> {
        let prefix = if self.prefix.is_empty() {
            None
        } else {
            Some(
                Path::parse(&self.prefix).map_err(|source| DataError::Store {
                    location: self.location.clone(),
                    source: source.into(),
                })?,
            )
        };
        let objects: Vec<_> = self
            .store
            .list(prefix.as_ref())
            .try_collect()
            .await
            .map_err(|source| DataError::Store {
                location: self.location.clone(),
                source,
            })?;
        let mut keys: Vec<(String, u64)> = objects
            .into_iter()
            .filter_map(|meta| Some((self.relative_key(&meta.location)?, meta.size)))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// The whole object.
    pub async fn get(&self, key: &str) -> Result<Bytes, object_store::Error> {
        self.store.get(&self.object_path(key)).await?.bytes().await
    }

    /// The first bytes of an object (all of it when shorter).
    pub async fn get_head(&self, key: &str, length: u64) -> Result<Bytes, object_store::Error> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(Range {
                start: 0,
                end: length,
            })),
            ..GetOptions::default()
        };
        self.store
            .get_opts(&self.object_path(key), options)
            .await?
            .bytes()
            .await
    }

    /// Whether an object exists (a `head` request). Errors other than "not found" are returned.
    pub async fn exists(&self, key: &str) -> Result<bool, object_store::Error> {
        match self.store.head(&self.object_path(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The underlying store, for callers that need more than whole-object reads.
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }
}
