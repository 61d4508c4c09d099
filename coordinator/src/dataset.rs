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
        })
    }
}
