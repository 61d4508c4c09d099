//! The dataset a job trains on: the manifest's kept records by position, bucketed.

use std::path::Path;

use anyhow::Context;
use arbor_common::assign::{Assigner, BucketedItems};
use arbor_common::buckets::BucketTable;
use arbor_common::config::{DigestReader, JobConfig};
use arbor_common::manifest::{read_manifest, ManifestRecord};
use arbor_data::store::DatasetStore;
use tracing::{info, warn};

/// Kept records by position (the positions plans use), plus the bucketed view.
pub struct Dataset {
    pub items: BucketedItems,
    pub table: BucketTable,
    /// Kept records, indexed by position.
    pub records: Vec<ManifestRecord>,
    pub digest: String,
}

impl Dataset {
    /// Reads and buckets the manifest at `path` with the job's bucket parameters.
    pub fn load(path: &Path, config: &JobConfig) -> anyhow::Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("opening manifest {}", path.display()))?;
        Self::read(file, &path.display().to_string(), config)
    }

    /// Reads and buckets a manifest from an object store (`s3://bucket/prefix/manifest.jsonl`,
    /// credentials from the environment). The object is fetched whole before parsing.
    pub fn load_url(url: &str, config: &JobConfig) -> anyhow::Result<Self> {
        let (location, key) = split_object_url(url)?;
        let store =
            DatasetStore::open(location).with_context(|| format!("opening data.manifest {url}"))?;
        // On a thread of its own: the caller may be inside an async runtime.
        let bytes = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .context("starting a runtime to fetch the manifest")?;
                    runtime
                        .block_on(store.get(key))
                        .with_context(|| format!("fetching data.manifest {url}"))
                })
                .join()
                .map_err(|_| anyhow::anyhow!("fetching the manifest panicked"))
        })??;
        Self::read(std::io::Cursor::new(bytes), url, config)
    }

    /// Reads and buckets a manifest; `name` is for messages.
    pub fn read(
        source: impl std::io::Read,
        name: &str,
        config: &JobConfig,
    ) -> anyhow::Result<Self> {
        let path = name;
        let mut reader = std::io::BufReader::with_capacity(1 << 20, DigestReader::new(source));
        let manifest =
            read_manifest(&mut reader).with_context(|| format!("reading manifest {path}"))?;
        let digest = reader.get_ref().digest();
        for skipped in &manifest.skipped_lines {
            warn!(manifest = %path, line = skipped.line, reason = %skipped.reason, "manifest line skipped");
        }
        let assigner = Assigner::new(
            BucketTable::new(config.buckets.bucket_params())?,
            config.buckets.assign_params(),
        )?;
        let mut items =
            BucketedItems::with_capacity(assigner.table().len(), manifest.records.len());
        let mut records = Vec::with_capacity(manifest.records.len());
        for record in manifest.records {
            let assignment = assigner.assign(record.id, record.width, record.height)?;
            items.push(record.id, &assignment)?;
            if assignment.kept {
                records.push(record);
            }
        }
        info!(
            manifest = %path,
            kept = items.len(),
            pruned = items.pruned_ids().len(),
            skipped_lines = manifest.skipped_lines.len(),
            mean_aspect_error = items.mean_aspect_error(),
            "manifest loaded"
        );
        Ok(Self {
            items,
            table: assigner.table().clone(),
            records,
            digest,
        })
    }
}

/// `s3://bucket/prefix/manifest.jsonl` → (`s3://bucket/prefix`, `manifest.jsonl`).
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

#[cfg(test)]
mod tests {
    use super::split_object_url;

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
    }
}
