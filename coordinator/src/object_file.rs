//! One file the CLI reads or writes whole, named by a local path or an object-store URL
//! (`s3://bucket/key`, `gs://…`, `az://…`, `file://…`; credentials from the usual environment
//! variables): manifests, index reports. Local writes go to `NAME.partial` and are renamed into
//! place; an object-store put is atomic by itself. Either way a reader never sees half a file.

use std::path::{Path, PathBuf};

use anyhow::Context;
use arbor_common::manifest::{read_manifest, Manifest};
use arbor_data::store::DatasetStore;
use object_store::PutPayload;
use tracing::warn;

/// Whether `name` is an object-store URL rather than a local path.
pub fn is_object_url(name: &str) -> bool {
    name.contains("://")
}

/// Splits `scheme://bucket/prefix/key` into the store location and the key.
pub fn split_object_url(url: &str) -> anyhow::Result<(&str, &str)> {
    let Some((scheme, rest)) = url.split_once("://") else {
        anyhow::bail!("`{url}` is not an object-store URL");
    };
    match rest.rsplit_once('/') {
        Some((bucket_and_prefix, key)) if !bucket_and_prefix.is_empty() && !key.is_empty() => {
            Ok((&url[..scheme.len() + 3 + bucket_and_prefix.len()], key))
        }
        _ => anyhow::bail!("`{url}` names no object: expected scheme://bucket/key"),
    }
}

/// Runs `work` on a runtime of its own thread (the caller may already be inside one).
fn on_own_runtime<T: Send>(
    work: impl std::future::Future<Output = anyhow::Result<T>> + Send,
) -> anyhow::Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("starting an async runtime")?
                    .block_on(work)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the object-store call panicked"))?
    })
}

/// The whole contents of `name`; `what` names it in errors (for example `manifest`).
pub fn read_all(name: &str, what: &str) -> anyhow::Result<Vec<u8>> {
    if !is_object_url(name) {
        return std::fs::read(name).with_context(|| format!("reading {what} {name}"));
    }
    let (location, key) = split_object_url(name)?;
    let store = DatasetStore::open(location).with_context(|| format!("opening {what} {name}"))?;
    on_own_runtime(async {
        let bytes = store
            .get(key)
            .await
            .with_context(|| format!("fetching {what} {name}"))?;
        Ok(bytes.to_vec())
    })
}

/// Reads the JSON Lines manifest at `name`; each broken line is logged and skipped (and counted
/// in the result).
pub fn read_manifest_at(name: &str) -> anyhow::Result<Manifest> {
    let bytes = read_all(name, "manifest")?;
    let manifest = read_manifest(std::io::Cursor::new(bytes))
        .with_context(|| format!("reading manifest {name}"))?;
    for skipped in &manifest.skipped_lines {
        warn!(manifest = %name, line = skipped.line, reason = %skipped.reason, "manifest line skipped");
    }
    Ok(manifest)
}

/// The folder or object-store prefix holding `name` (what a manifest's keys are relative to).
pub fn parent_location(name: &str) -> String {
    if is_object_url(name) {
        return split_object_url(name)
            .map(|(location, _)| location.to_string())
            .unwrap_or_else(|_| name.to_string());
    }
    Path::new(name)
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .map_or_else(|| ".".to_owned(), |parent| parent.display().to_string())
}

/// Replaces `name` with `bytes`, atomically (see the module docs).
pub fn write_all(name: &str, bytes: Vec<u8>, what: &str) -> anyhow::Result<()> {
    if !is_object_url(name) {
        let path = Path::new(name);
        let temporary = partial_path(path);
        std::fs::write(&temporary, &bytes)
            .and_then(|()| std::fs::File::open(&temporary)?.sync_all())
            .with_context(|| format!("writing {what} {}", temporary.display()))?;
        return std::fs::rename(&temporary, path)
            .with_context(|| format!("renaming {what} into {name}"));
    }
    let (location, key) = split_object_url(name)?;
    let store = DatasetStore::open(location).with_context(|| format!("opening {what} {name}"))?;
    on_own_runtime(async {
        store
            .object_store()
            .put(&store.object_path(key), PutPayload::from(bytes))
            .await
            .with_context(|| format!("uploading {what} {name}"))?;
        Ok(())
    })
}

fn partial_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_urls_split_into_location_and_key() {
        assert_eq!(
            split_object_url("s3://bucket/a/b/manifest.jsonl").unwrap(),
            ("s3://bucket/a/b", "manifest.jsonl")
        );
        assert_eq!(
            split_object_url("gs://bucket/manifest.jsonl").unwrap(),
            ("gs://bucket", "manifest.jsonl")
        );
        assert!(split_object_url("s3://bucket").is_err());
        assert!(split_object_url("s3://bucket/").is_err());
        assert_eq!(parent_location("s3://bucket/a/m.jsonl"), "s3://bucket/a");
        assert_eq!(parent_location("data/m.jsonl"), "data");
        assert_eq!(parent_location("m.jsonl"), ".");
    }

    #[test]
    fn local_files_round_trip_and_leave_no_partial_file() {
        let folder = tempfile::tempdir().unwrap();
        let name = folder.path().join("manifest.jsonl");
        let name = name.to_str().unwrap();
        write_all(name, b"one\n".to_vec(), "manifest").unwrap();
        write_all(name, b"two\n".to_vec(), "manifest").unwrap();
        assert_eq!(read_all(name, "manifest").unwrap(), b"two\n");
        assert!(!folder.path().join("manifest.jsonl.partial").exists());
        let missing = folder.path().join("missing.jsonl");
        let error = read_all(missing.to_str().unwrap(), "manifest")
            .unwrap_err()
            .to_string();
        assert!(error.contains("reading manifest") && error.contains("missing.jsonl"));
    }

    #[test]
    fn file_urls_go_through_the_object_store() {
        let folder = tempfile::tempdir().unwrap();
        let url = format!("file://{}/report.json", folder.path().display());
        write_all(&url, b"{}\n".to_vec(), "report").unwrap();
        assert_eq!(
            std::fs::read(folder.path().join("report.json")).unwrap(),
            b"{}\n"
        );
        assert_eq!(read_all(&url, "report").unwrap(), b"{}\n");
    }
}
