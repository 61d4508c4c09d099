//! The coordinator's persisted job state, `run_dir/state.json` (docs/architecture.md §6, §7).
//!
//! Written atomically (a temporary file renamed over the old one, or an object-store put)
//! whenever it changes, so a restarted coordinator picks the job up where the last complete
//! checkpoint left it.

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::run_store::RunStore;

/// One plan of the current epoch: the first (segment 0) or an elastic re-shard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentRecord {
    /// 0 for the epoch's first plan, else the generation that re-sharded.
    pub segment: u64,
    pub world_size: u32,
    /// Batches every rank had completed at this plan's last complete checkpoint.
    pub checkpoint_batch: u64,
    /// The generations that trained on this plan (same-size regroups keep the plan).
    pub generations: Vec<u64>,
}

/// The last checkpoint every rank completed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub epoch: u64,
    pub segment: u64,
    pub batch: u64,
    pub step: u64,
    pub world_size: u32,
    pub generation: u64,
    /// Relative to the run directory, e.g. `checkpoints/step-200`.
    pub path: String,
}

/// How many earlier complete checkpoints `state.json` remembers.
pub const EARLIER_CHECKPOINTS_KEPT: usize = 4;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobState {
    pub job: String,
    pub manifest_digest: String,
    pub config_digest: String,
    pub generation: u64,
    pub epoch: u64,
    /// The plans of the current epoch, oldest first; the last one is current. Empty before the
    /// epoch's first group forms.
    pub segments: Vec<SegmentRecord>,
    /// Optimizer steps completed at the last complete checkpoint.
    pub step: u64,
    pub last_checkpoint: Option<CheckpointRecord>,
    /// The complete checkpoints before `last_checkpoint`, newest first (at most
    /// [`EARLIER_CHECKPOINTS_KEPT`]): where a restart falls back to when the last one is
    /// unusable.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub earlier_checkpoints: Vec<CheckpointRecord>,
    pub regroups: u64,
    pub finished: bool,
    pub failure: Option<String>,
}

impl JobState {
    pub fn new(job: &str, manifest_digest: &str, config_digest: &str) -> Self {
        Self {
            job: job.to_string(),
            manifest_digest: manifest_digest.to_string(),
            config_digest: config_digest.to_string(),
            generation: 0,
            epoch: 0,
            segments: Vec::new(),
            step: 0,
            last_checkpoint: None,
            earlier_checkpoints: Vec::new(),
            regroups: 0,
            finished: false,
            failure: None,
        }
    }

    pub const KEY: &'static str = "state.json";

    /// Records a newly complete checkpoint; the one it replaces joins the earlier ones.
    pub fn checkpoint_completed(&mut self, record: CheckpointRecord) {
        if let Some(previous) = self.last_checkpoint.replace(record) {
            self.earlier_checkpoints.insert(0, previous);
            self.earlier_checkpoints.truncate(EARLIER_CHECKPOINTS_KEPT);
        }
    }

    /// The persisted state, if the run directory has one.
    pub fn load(run_store: &dyn RunStore) -> anyhow::Result<Option<Self>> {
        let Some(bytes) = run_store.read(Self::KEY)? else {
            return Ok(None);
        };
        let state = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing {}/{}", run_store.location(), Self::KEY))?;
        Ok(Some(state))
    }

    /// Makes the ledger's appends durable, then replaces the state atomically.
    pub fn save(&self, run_store: &dyn RunStore) -> anyhow::Result<()> {
        run_store.flush()?;
        let text = serde_json::to_string_pretty(self)?;
        run_store.write(Self::KEY, text.as_bytes())
    }
}
