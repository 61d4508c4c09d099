//! The dataset a job trains on: the manifest's kept records by position, bucketed.

use anyhow::Context;
use arbor_common::assign::{Assigner, BucketedItems};
use arbor_common::buckets::BucketTable;
use arbor_common::config::{DigestReader, JobConfig};
use std::collections::HashSet;

use arbor_common::manifest::{read_manifest, ManifestRecord};
use arbor_common::validation::{evaluated_positions, is_held_out};
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
    /// The validation items evaluated (worker/src/train/validation.rs), with their buckets:
    /// held out of `items` by `data.validation_fraction`, or read from
    /// `data.validation_manifest`; at most `data.validation_max_items`.
    pub validation: Vec<ValidationItem>,
}

/// An item of the validation set and the bucket it is evaluated at.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationItem {
    pub record: ManifestRecord,
    pub bucket: u16,
}

impl Dataset {
    /// Reads and buckets the manifest at `name` (a local path or an object-store URL such as
    /// `s3://bucket/prefix/manifest.jsonl`, credentials from the environment; fetched whole
    /// before parsing) with the job's bucket parameters.
    pub fn load(name: &str, config: &JobConfig) -> anyhow::Result<Self> {
        let validation_manifest = match &config.data.validation_manifest {
            Some(validation_name) => {
                let bytes = read_all(validation_name, "data.validation_manifest")?;
                let manifest = read_manifest(std::io::Cursor::new(bytes))
                    .with_context(|| format!("reading validation manifest {validation_name}"))?;
                for skipped in &manifest.skipped_lines {
                    warn!(manifest = %validation_name, line = skipped.line, reason = %skipped.reason, "validation manifest line skipped");
                }
                manifest.records
            }
            None => Vec::new(),
        };
        let bytes = read_all(name, "data.manifest")?;
        Self::read_with_validation(
            std::io::Cursor::new(bytes),
            name,
            config,
            validation_manifest,
        )
    }

    /// Reads and buckets a manifest; `name` is for messages.
    pub fn read(
        source: impl std::io::Read,
        name: &str,
        config: &JobConfig,
    ) -> anyhow::Result<Self> {
        Self::read_with_validation(source, name, config, Vec::new())
    }

    /// [`Dataset::read`], with the records of a validation manifest: they and the items that
    /// `data.validation_fraction` holds out are left out of training.
    pub fn read_with_validation(
        source: impl std::io::Read,
        name: &str,
        config: &JobConfig,
        validation_records: Vec<ManifestRecord>,
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
        let validation_ids: HashSet<u64> = validation_records.iter().map(|r| r.id).collect();
        let fraction = config.data.validation_fraction;
        let mut validation_candidates = Vec::new();
        for record in validation_records {
            let assignment = assigner.assign(record.id, record.width, record.height)?;
            if assignment.kept {
                validation_candidates.push(ValidationItem {
                    record,
                    bucket: assignment.bucket_id,
                });
            }
        }
        let mut items =
            BucketedItems::with_capacity(assigner.table().len(), manifest.records.len());
        let mut records = Vec::with_capacity(manifest.records.len());
        let mut held_out = 0usize;
        for record in manifest.records {
            let assignment = assigner.assign(record.id, record.width, record.height)?;
            if validation_ids.contains(&record.id) {
                held_out += 1;
                continue;
            }
            if is_held_out(record.id, fraction) {
                held_out += 1;
                if assignment.kept {
                    validation_candidates.push(ValidationItem {
                        record,
                        bucket: assignment.bucket_id,
                    });
                }
                continue;
            }
            items.push(record.id, &assignment)?;
            if assignment.kept {
                records.push(record);
            }
        }
        let candidate_ids: Vec<u64> = validation_candidates.iter().map(|v| v.record.id).collect();
        let validation: Vec<ValidationItem> =
            evaluated_positions(&candidate_ids, config.data.validation_max_items as usize)
                .into_iter()
                .map(|position| validation_candidates[position].clone())
                .collect();
        if config.data.has_validation() {
            info!(
                held_out,
                evaluated = validation.len(),
                "validation items held out of training"
            );
            if validation.is_empty() {
                warn!("validation is configured but no validation item is left to evaluate");
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
            validation,
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

    fn job_config(extra: &str) -> JobConfig {
        let text = format!(
            "[job]\nrun_dir = \"r\"\n[data]\nmanifest = \"m.jsonl\"\n{extra}\n[model]\npath = \"p\"\n"
        );
        JobConfig::load(&text, &[]).unwrap()
    }

    fn manifest(ids: std::ops::Range<u64>) -> String {
        ids.map(|id| format!("{{\"id\":{id},\"key\":\"{id}.png\",\"width\":512,\"height\":512}}\n"))
            .collect()
    }

    #[test]
    fn held_out_items_leave_training_and_the_split_survives_growth() {
        let config = job_config("validation_fraction = 0.1\nvalidation_max_items = 1000");
        let small = Dataset::read(manifest(0..2000).as_bytes(), "m", &config).unwrap();
        let held: HashSet<u64> = small.validation.iter().map(|v| v.record.id).collect();
        assert!((150..250).contains(&held.len()), "{}", held.len());
        assert_eq!(small.items.len() + held.len(), 2000);
        assert!(small
            .records
            .iter()
            .all(|record| !held.contains(&record.id)));
        // A grown dataset keeps every old validation item out, and adds new ones.
        let grown = Dataset::read(manifest(0..4000).as_bytes(), "m", &config).unwrap();
        let grown_held: HashSet<u64> = grown.validation.iter().map(|v| v.record.id).collect();
        assert!(held.is_subset(&grown_held));
        assert!(grown_held.len() > held.len());
        // Capped: the evaluated items are the first of the hash order.
        let capped = job_config("validation_fraction = 0.1\nvalidation_max_items = 16");
        let capped = Dataset::read(manifest(0..2000).as_bytes(), "m", &capped).unwrap();
        assert_eq!(capped.validation.len(), 16);
        assert_eq!(
            capped.items.len(),
            small.items.len(),
            "capping evaluates fewer, holds out the same"
        );
        // Off: everything trains.
        let off = Dataset::read(manifest(0..2000).as_bytes(), "m", &job_config("")).unwrap();
        assert_eq!((off.items.len(), off.validation.len()), (2000, 0));
    }

    #[test]
    fn a_validation_manifest_s_items_are_left_out_of_training() {
        let dir = tempfile::tempdir().unwrap();
        let validation = dir.path().join("validation.jsonl");
        std::fs::write(&validation, manifest(90..110)).unwrap();
        let train = dir.path().join("train.jsonl");
        std::fs::write(&train, manifest(0..100)).unwrap();
        let config = job_config(&format!(
            "validation_manifest = \"{}\"",
            validation.display()
        ));
        let dataset = Dataset::load(train.to_str().unwrap(), &config).unwrap();
        assert_eq!(dataset.items.len(), 90);
        assert_eq!(dataset.validation.len(), 20);
        assert!(dataset.records.iter().all(|record| record.id < 90));
    }
}
