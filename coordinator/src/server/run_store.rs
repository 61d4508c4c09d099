//! The run directory (`job.run_dir`, docs/architecture.md §7) as the coordinator writes it: the few
//! operations it needs as a trait ([`RunStore`]), with a local-folder implementation (atomic
//! renames, fsynced appends) and an object-store one (`s3://`, `gs://`, `az://`).
//!
//! Object stores cannot append: [`ObjectRunStore`] keeps appended objects (the ledgers) in
//! memory and uploads them whole on [`RunStore::flush`], which the coordinator calls before it
//! persists its state and before it marks a checkpoint complete. Ledger lines lost with an
//! unflushed coordinator only describe batches after the last complete checkpoint, which a
//! resumed job rolls back anyway.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, Context};
use arbor_data::store::DatasetStore;
use object_store::PutPayload;

use crate::job_config::local_path;

/// What the coordinator does with its run directory. Keys are relative: `ledger/epoch-0.jsonl`.
pub trait RunStore: Send + Sync + std::fmt::Debug {
    /// The location for messages and for the workers (an absolute path or a URL).
    fn location(&self) -> String;
    /// A whole object; `None` when it does not exist.
    fn read(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>>;
    /// Replaces an object atomically (readers see the old or the new bytes, never a mix).
    fn write(&self, key: &str, bytes: &[u8]) -> anyhow::Result<()>;
    /// Appends to an object, creating it. Durable on return for local folders; after the next
    /// [`RunStore::flush`] for object stores.
    fn append(&self, key: &str, bytes: &[u8]) -> anyhow::Result<()>;
    /// Makes every append durable.
    fn flush(&self) -> anyhow::Result<()>;
}

/// Opens `value` (the config's `job.run_dir`): a path relative to `base`, `file://`, or an
/// object-store URL with credentials from the environment.
pub fn open_run_store(value: &str, base: &Path) -> anyhow::Result<Arc<dyn RunStore>> {
    if value.contains("://") && !value.starts_with("file://") {
        return Ok(Arc::new(ObjectRunStore::open(value)?));
    }
    let root = local_path(value, base, "job.run_dir")?;
    std::fs::create_dir_all(&root)
        .with_context(|| format!("creating run_dir {}", root.display()))?;
    Ok(Arc::new(LocalRunStore { root }))
}

/// A run directory on a local or mounted file system.
#[derive(Debug)]
pub struct LocalRunStore {
    root: PathBuf,
}

impl LocalRunStore {
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }
}

impl RunStore for LocalRunStore {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn read(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.root.join(key);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
        }
    }

    fn write(&self, key: &str, bytes: &[u8]) -> anyhow::Result<()> {
        write_atomically(&self.root.join(key), bytes)
    }

    fn append(&self, key: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let path = self.root.join(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("appending to {}", path.display()))?;
        file.sync_data()
            .with_context(|| format!("syncing {}", path.display()))?;
        Ok(())
    }

    fn flush(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Writes `bytes` to a temporary sibling, syncs it and renames it over `path`.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)
        .with_context(|| format!("creating {}", temporary.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("renaming {} to {}", temporary.display(), path.display()))?;
    Ok(())
}

/// A run directory in an object store.
pub struct ObjectRunStore {
    store: DatasetStore,
    /// Always `Some` until drop, which shuts it down without blocking (the store may be dropped
    /// inside another runtime).
    runtime: Option<tokio::runtime::Runtime>,
    /// Appended objects with bytes not yet uploaded: key → the object's whole content.
    pending: Mutex<BTreeMap<String, AppendedObject>>,
}

#[derive(Default)]
struct AppendedObject {
    content: Vec<u8>,
    dirty: bool,
}

impl std::fmt::Debug for ObjectRunStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ObjectRunStore")
            .field("location", &self.store.location())
            .finish()
    }
}

impl ObjectRunStore {
    pub fn open(location: &str) -> anyhow::Result<Self> {
        let store = DatasetStore::open(location)
            .with_context(|| format!("opening job.run_dir {location}"))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("run-store")
            .enable_all()
            .build()
            .context("starting the run store's runtime")?;
        Ok(Self {
            store,
            runtime: Some(runtime),
            pending: Mutex::new(BTreeMap::new()),
        })
    }

    /// Runs `future` on this store's runtime and waits for it. Safe to call from inside
    /// another runtime's worker (the gRPC handlers): it blocks the thread, it does not nest
    /// `block_on`.
    fn wait<T: Send + 'static>(
        &self,
        future: impl std::future::Future<Output = T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let (sender, receiver) = std::sync::mpsc::channel();
        let Some(runtime) = &self.runtime else {
            anyhow::bail!("the run store is closed");
        };
        runtime.spawn(async move {
            let _ = sender.send(future.await);
        });
        receiver
            .recv()
            .map_err(|_| anyhow!("the run store's runtime stopped"))
    }

    fn put(&self, key: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let store = self.store.object_store().clone();
        let path = self.store.object_path(key);
        self.wait(async move { store.put(&path, PutPayload::from(bytes)).await })?
            .with_context(|| format!("writing {} in {}", key, self.store.location()))?;
        Ok(())
    }
}

impl Drop for ObjectRunStore {
    fn drop(&mut self) {
        if let Err(error) = self.flush() {
            tracing::error!(run_dir = %self.store.location(), %error, "flushing the run directory on shutdown failed");
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl RunStore for ObjectRunStore {
    fn location(&self) -> String {
        self.store.location().to_string()
    }

    fn read(&self, key: &str) -> anyhow::Result<Option<Vec<u8>>> {
        if let Some(object) = self.pending.lock().unwrap().get(key) {
            return Ok(Some(object.content.clone()));
        }
        let store = self.store.clone();
        let owned_key = key.to_string();
        match self.wait(async move { store.get(&owned_key).await })? {
            Ok(bytes) => Ok(Some(bytes.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => {
                Err(error).with_context(|| format!("reading {} in {}", key, self.store.location()))
            }
        }
    }

    fn write(&self, key: &str, bytes: &[u8]) -> anyhow::Result<()> {
        // An object store's put replaces the whole object atomically.
        self.put(key, bytes.to_vec())
    }

    fn append(&self, key: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let loaded = self.pending.lock().unwrap().contains_key(key);
        if !loaded {
            let existing = self.read(key)?.unwrap_or_default();
            self.pending
                .lock()
                .unwrap()
                .entry(key.to_string())
                .or_insert(AppendedObject {
                    content: existing,
                    dirty: false,
                });
        }
        let mut pending = self.pending.lock().unwrap();
        let object = pending.entry(key.to_string()).or_default();
        object.content.extend_from_slice(bytes);
        object.dirty = true;
        Ok(())
    }

    fn flush(&self) -> anyhow::Result<()> {
        let dirty: Vec<(String, Vec<u8>)> = self
            .pending
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, object)| object.dirty)
            .map(|(key, object)| (key.clone(), object.content.clone()))
            .collect();
        for (key, content) in dirty {
            self.put(&key, content)?;
            if let Some(object) = self.pending.lock().unwrap().get_mut(&key) {
                object.dirty = false;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(store: &dyn RunStore) {
        assert_eq!(store.read("state.json").unwrap(), None);
        store.write("state.json", b"{\"a\":1}").unwrap();
        store.write("state.json", b"{\"a\":2}").unwrap();
        assert_eq!(store.read("state.json").unwrap().unwrap(), b"{\"a\":2}");
        store.append("ledger/epoch-0.jsonl", b"one\n").unwrap();
        store.append("ledger/epoch-0.jsonl", b"two\n").unwrap();
        store.flush().unwrap();
        store.append("ledger/epoch-0.jsonl", b"three\n").unwrap();
        store.flush().unwrap();
        assert_eq!(
            store.read("ledger/epoch-0.jsonl").unwrap().unwrap(),
            b"one\ntwo\nthree\n"
        );
    }

    #[test]
    fn a_local_run_directory_writes_replaces_and_appends() {
        let directory = tempfile::tempdir().unwrap();
        let store = open_run_store("run", directory.path()).unwrap();
        exercise(store.as_ref());
        assert_eq!(
            std::fs::read_to_string(directory.path().join("run/ledger/epoch-0.jsonl")).unwrap(),
            "one\ntwo\nthree\n"
        );
    }

    #[test]
    fn an_object_store_run_directory_uploads_appends_on_flush() {
        // `file://` URLs go through the local implementation; exercise the object-store one
        // on object_store's local file system backend.
        let directory = tempfile::tempdir().unwrap();
        let location = format!("{}/run", directory.path().display());
        std::fs::create_dir_all(&location).unwrap();
        let store = ObjectRunStore::open(&location).unwrap();
        exercise(&store);
        let ledger = directory.path().join("run/ledger/epoch-0.jsonl");
        assert_eq!(
            std::fs::read_to_string(&ledger).unwrap(),
            "one\ntwo\nthree\n"
        );
        store.append("ledger/epoch-0.jsonl", b"four\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&ledger).unwrap(),
            "one\ntwo\nthree\n",
            "appends reach the store on flush"
        );
        store.flush().unwrap();
        assert!(std::fs::read_to_string(&ledger)
            .unwrap()
            .ends_with("four\n"));
        // A new store (a restarted coordinator) appends after what is there.
        let reopened = ObjectRunStore::open(&location).unwrap();
        reopened.append("ledger/epoch-0.jsonl", b"five\n").unwrap();
        reopened.flush().unwrap();
        assert!(std::fs::read_to_string(&ledger)
            .unwrap()
            .ends_with("four\nfive\n"));
    }
}
