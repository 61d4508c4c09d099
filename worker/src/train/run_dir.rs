//! The run directory (`job.run_dir`, docs/architecture.md §7) as an `object_store` location: a
//! plain path, `file://`, `s3://`, `gs://` or `az://`. Blocking calls for the training thread; each
//! runs on this handle's own small tokio runtime, so callers need no async context.

use std::path::PathBuf;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::{ObjectStore, PutPayload};

use arbor_data::store::DatasetStore;

use crate::error::{Result, WorkerError};

/// An opened run directory. Keys are relative to it: `checkpoints/step-100/COMPLETE`.
pub struct RunDir {
    store: DatasetStore,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for RunDir {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RunDir")
            .field("location", &self.store.location())
            .finish()
    }
}

impl RunDir {
    /// Opens `location`, with object-store credentials from the environment.
    pub fn open(location: &str) -> Result<Self> {
        if location.trim().is_empty() {
            return Err(WorkerError::RunDir {
                location: location.to_string(),
                key: String::new(),
                message: "job.run_dir is empty".to_string(),
            });
        }
        if !location.contains("://") {
            std::fs::create_dir_all(location).map_err(WorkerError::io(location))?;
        }
        let store = DatasetStore::open(location)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(WorkerError::io(location))?;
        Ok(Self { store, runtime })
    }

    /// The location as given.
    pub fn location(&self) -> &str {
        self.store.location()
    }

    /// The local folder of a plain-path or `file://` run directory.
    pub fn local_path(&self) -> Option<PathBuf> {
        let location = self.store.location();
        if let Some(path) = location.strip_prefix("file://") {
            return Some(PathBuf::from(path));
        }
        (!location.contains("://")).then(|| PathBuf::from(location))
    }

    fn error(&self, key: &str, message: impl std::fmt::Display) -> WorkerError {
        WorkerError::RunDir {
            location: self.store.location().to_string(),
            key: key.to_string(),
            message: message.to_string(),
        }
    }

    /// Writes a whole object (atomically on the local file system: a temporary file renamed).
    pub fn put(&self, key: &str, bytes: impl Into<Bytes>) -> Result<()> {
        let path = self.store.object_path(key);
        let payload = PutPayload::from_bytes(bytes.into());
        self.runtime
            .block_on(self.store.object_store().put(&path, payload))
            .map_err(|error| self.error(key, error))?;
        Ok(())
    }

    /// Reads a whole object; `None` when it does not exist.
    pub fn get(&self, key: &str) -> Result<Option<Bytes>> {
        match self.runtime.block_on(self.store.get(key)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(self.error(key, error)),
        }
    }

    pub fn exists(&self, key: &str) -> Result<bool> {
        self.runtime
            .block_on(self.store.exists(key))
            .map_err(|error| self.error(key, error))
    }

    /// Every key under `prefix` (relative to the run directory), sorted.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let path = self.store.object_path(prefix.trim_end_matches('/'));
        let objects: Vec<_> = self
            .runtime
            .block_on(self.store.object_store().list(Some(&path)).try_collect())
            .map_err(|error| self.error(prefix, error))?;
        let mut keys: Vec<String> = objects
            .into_iter()
            .filter_map(|meta| self.store.relative_key(&meta.location))
            .collect();
        keys.sort();
        Ok(keys)
    }

    /// Deletes an object; a missing one is not an error.
    pub fn delete(&self, key: &str) -> Result<()> {
        let path = self.store.object_path(key);
        match self
            .runtime
            .block_on(self.store.object_store().delete(&path))
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(self.error(key, error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_and_delete_on_a_local_run_directory() {
        let folder = tempfile::tempdir().unwrap();
        let location = folder.path().join("run");
        let run_dir = RunDir::open(location.to_str().unwrap()).unwrap();
        assert_eq!(run_dir.get("checkpoints/step-1/COMPLETE").unwrap(), None);
        run_dir
            .put("checkpoints/step-1/weights.safetensors", vec![1u8, 2, 3])
            .unwrap();
        run_dir
            .put("checkpoints/step-1/COMPLETE", Vec::new())
            .unwrap();
        run_dir
            .put("checkpoints/step-2/weights.safetensors", vec![4u8])
            .unwrap();
        assert_eq!(
            run_dir
                .get("checkpoints/step-1/weights.safetensors")
                .unwrap()
                .unwrap(),
            Bytes::from(vec![1u8, 2, 3])
        );
        assert!(location.join("checkpoints/step-1/COMPLETE").is_file());
        assert_eq!(
            run_dir.list("checkpoints").unwrap(),
            vec![
                "checkpoints/step-1/COMPLETE".to_string(),
                "checkpoints/step-1/weights.safetensors".to_string(),
                "checkpoints/step-2/weights.safetensors".to_string(),
            ]
        );
        run_dir
            .delete("checkpoints/step-2/weights.safetensors")
            .unwrap();
        run_dir
            .delete("checkpoints/step-2/weights.safetensors")
            .unwrap();
        assert!(!run_dir
            .exists("checkpoints/step-2/weights.safetensors")
            .unwrap());
        assert_eq!(run_dir.local_path(), Some(location));
    }

    #[test]
    fn an_empty_location_is_refused_by_name() {
        let error = RunDir::open(" ").unwrap_err().to_string();
        assert!(error.contains("job.run_dir is empty"), "{error}");
    }
}
