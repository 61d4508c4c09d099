//! The dataset a job trains on: the manifest's kept records by position, bucketed.

use anyhow::Context;
use arbor_common::assign::{Assigner, BucketedItems};
use arbor_common::buckets::BucketTable;
use arbor_common::config::{DigestReader, JobConfig};
use arbor_common::manifest::{read_manifest, ManifestRecord};
use tracing::{info, warn};

use crate::object_file::read_all;

/// Kept records by position (the positions plans use), plus the bucketed view.
pub struct Dataset {
    pub items: BucketedItems,
    pub table: BucketTable,
    /// Kept records, indexed by position.
    pub records: Vec<ManifestRecord>,
    pub digest: String,
    /// Where the manifest's header says the images are (`arbor index` writes it when the
    /// manifest lives outside the image folder).
    pub image_root: Option<String>,
}

impl Dataset {
    /// Reads and buckets the manifest at `name` (a local path or an object-store URL such as
    /// `s3://bucket/prefix/manifest.jsonl`, credentials from the environment; fetched whole
    /// before parsing) with the job's bucket parameters.
    pub fn load(name: &str, config: &JobConfig) -> anyhow::Result<Self> {
        let bytes = read_all(name, "data.manifest")?;
        Self::read(std::io::Cursor::new(bytes), name, config)
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
            image_root: manifest.image_root,
        })
    }
}

/// Records sampled by [`check_local_items_exist`].
const EXISTENCE_SAMPLE: usize = 16;

/// For a dataset on a local or mounted folder: checks that a sample of the manifest's keys
/// (spread over the whole manifest) exist under `root` (when `root` is a folder here). None existing means every item would
/// fail to load (a manifest written outside its image folder, or a wrong `data.root`), so the
/// job is refused before it starts; some missing are only reported.
pub fn check_local_items_exist(
    records: &[ManifestRecord],
    root: &std::path::Path,
) -> anyhow::Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    if !root.is_dir() {
        // Workers may mount the images where the coordinator does not.
        warn!(root = %root.display(), "data.root is not a folder on the coordinator; not checking that the manifest's keys exist");
        return Ok(());
    }
    let step = (records.len() / EXISTENCE_SAMPLE).max(1);
    let sampled: Vec<&ManifestRecord> = records
        .iter()
        .step_by(step)
        .take(EXISTENCE_SAMPLE)
        .collect();
    let missing: Vec<&ManifestRecord> = sampled
        .iter()
        .copied()
        .filter(|record| !root.join(&record.key).exists())
        .collect();
    if missing.len() == sampled.len() {
        anyhow::bail!(
            "data.root {}: none of {} sampled manifest keys exist there (e.g. {}); \
             set data.root to the folder the manifest's keys are relative to \
             (a manifest written with `arbor index --out` outside its image folder needs it)",
            root.display(),
            sampled.len(),
            root.join(&missing[0].key).display()
        );
    }
    if !missing.is_empty() {
        warn!(
            root = %root.display(),
            missing = missing.len(),
            sampled = sampled.len(),
            example = %root.join(&missing[0].key).display(),
            "some sampled manifest keys do not exist under data.root; those items will fail to load"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str) -> ManifestRecord {
        ManifestRecord {
            id: 1,
            key: key.into(),
            width: 512,
            height: 512,
            caption: String::new(),
        }
    }

    #[test]
    fn a_root_that_holds_none_of_the_keys_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("images")).unwrap();
        std::fs::write(dir.path().join("images/a.png"), b"x").unwrap();
        let records = [record("images/a.png"), record("images/b.png")];
        check_local_items_exist(&records, dir.path()).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let error = check_local_items_exist(&records, &elsewhere)
            .unwrap_err()
            .to_string();
        assert!(
            error.starts_with(&format!("data.root {}", elsewhere.display())),
            "{error}"
        );
        assert!(error.contains("images/a.png"), "{error}");
    }
}
