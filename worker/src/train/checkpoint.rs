//! Checkpoints (docs/architecture.md §7 "Checkpoints"): everything a run needs to continue
//! exactly where it stopped, written through the run directory's object store.
//!
//! ```text
//! checkpoints/step-<N>/
//!   weights.safetensors     the trainable tensors (rank 0)
//!   optimizer.safetensors   the optimizer state; its step count in the safetensors metadata
//!   ema.safetensors         the EMA shadow weights, when EMA is on; its update count likewise
//!   position.json           step, epoch, segment, batch, generation, world size, mode, a digest
//!                           of the trainable keys, and the byte length of every tensor file
//!                           (rank 0, written after the tensor files)
//!   rank-<r>.json           every rank's own position, written by that rank last
//!   coordinator.json        the coordinator's record of the checkpoint
//!   COMPLETE                written by the coordinator once every rank reported CheckpointDone
//! ```
//!
//! Rank 0 writes the tensors because after an all-reduce every rank holds the same weights,
//! optimizer state and EMA. Every rank writes its `rank-<r>.json` and then reports
//! CheckpointDone; the coordinator (coordinator/src/server/membership/checkpoints.rs, `complete_checkpoint`)
//! writes `COMPLETE` after the last report. A worker never writes `COMPLETE` in a job: a folder
//! without it may be missing any file, and [`read_checkpoint`] refuses it, naming the path. Only a
//! single process without a coordinator (tests, a local run) marks its own checkpoints, with
//! [`mark_complete_without_coordinator`].
//!
//! Reading checks what can be checked before any tensor reaches the model: the marker, the byte
//! length of every tensor file against `position.json` (a truncated upload), the safetensors
//! structure, and the digest of the trainable keys, shapes and dtypes.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, WorkerError};
use crate::train::run_dir::RunDir;

/// The folder of all checkpoints in the run directory.
pub const CHECKPOINTS_PREFIX: &str = "checkpoints";
/// The marker the coordinator writes last.
pub const COMPLETE_MARKER: &str = "COMPLETE";
pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
pub const POSITION_FILE: &str = "position.json";
/// The version of the layout above, in `position.json`.
pub const CHECKPOINT_FORMAT_VERSION: u32 = 1;

const STEP_COUNT_METADATA: &str = "arbor.step_count";

/// Where the run stood when the checkpoint was taken: the sampler position (epoch, batches done,
/// generation, world size; docs/architecture.md §2) and the optimizer step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointPosition {
    /// Optimizer steps done (the `N` of `step-<N>`).
    pub step: u64,
    pub epoch: u64,
    /// The coordinator's plan segment within the epoch (a regroup to another world size starts
    /// a new segment); 0 without regroups.
    #[serde(default)]
    pub segment: u64,
    /// Batches (per rank) done in this epoch segment.
    pub batch: u64,
    pub generation: u64,
    pub world_size: u32,
    /// The rank that wrote this position.
    pub rank: u32,
    /// `finetune` or `hypernetwork`.
    pub mode: String,
}

/// Everything a checkpoint holds. Tensor lists are sorted by name when read back.
#[derive(Debug)]
pub struct CheckpointContents {
    pub position: CheckpointPosition,
    /// The trainable tensors by name (the model's own names).
    pub trainable: Vec<(String, Tensor)>,
    /// The optimizer state by name (as the optimizer's `state_tensors` gives it).
    pub optimizer: Vec<(String, Tensor)>,
    pub optimizer_steps: u64,
    /// The EMA shadow tensors, when EMA is on.
    pub ema: Option<Vec<(String, Tensor)>>,
    pub ema_updates: u64,
}

/// `position.json`: the position plus what a reader checks the tensor files against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PositionRecord {
    format_version: u32,
    #[serde(flatten)]
    position: CheckpointPosition,
    trainable_keys_digest: String,
    optimizer_steps: u64,
    ema_updates: u64,
    /// File name → byte length, for every tensor file of the checkpoint.
    files: BTreeMap<String, u64>,
}

/// `checkpoints/step-<N>`.
pub fn checkpoint_key(step: u64) -> String {
    format!("{CHECKPOINTS_PREFIX}/step-{step}")
}

/// The step of a `checkpoints/step-<N>` key (with or without a trailing slash).
pub fn checkpoint_step(checkpoint_key: &str) -> Option<u64> {
    checkpoint_key
        .trim_end_matches('/')
        .strip_prefix(CHECKPOINTS_PREFIX)?
        .strip_prefix("/step-")?
        .parse()
        .ok()
}

/// `rank-<r>.json`.
pub fn rank_file_name(rank: u32) -> String {
    format!("rank-{rank}.json")
}

/// A digest of the trainable tensors' names, shapes and dtypes (not their values): a resume
/// into a model with other trainable tensors is refused by comparing it.
pub fn trainable_keys_digest(trainable: &[(String, Tensor)]) -> String {
    let mut entries: Vec<String> = trainable
        .iter()
        .map(|(name, tensor)| format!("{name}:{:?}:{:?}\n", tensor.size(), tensor.kind()))
        .collect();
    entries.sort();
    let mut hasher = Sha256::new();
    for entry in &entries {
        hasher.update(entry.as_bytes());
    }
    hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

fn checkpoint_error(run_dir: &RunDir, key: &str, message: impl Into<String>) -> WorkerError {
    WorkerError::RunDir {
        location: run_dir.location().to_string(),
        key: key.to_string(),
        message: message.into(),
    }
}

/// Writes this rank's part of the checkpoint at `checkpoint_key(position.step)`: on rank 0 the
/// tensor files, then `position.json`, then `rank-0.json`; on every other rank only
/// `rank-<r>.json`. Call it on every rank, then report CheckpointDone to the coordinator.
pub fn write_checkpoint_part(run_dir: &RunDir, contents: &CheckpointContents) -> Result<()> {
    let position = &contents.position;
    if position.rank >= position.world_size.max(1) {
        return Err(WorkerError::Input {
            name: "checkpoint position".to_string(),
            message: format!(
                "rank {} is outside world size {}",
                position.rank, position.world_size
            ),
        });
    }
    let folder = checkpoint_key(position.step);
    if position.rank == 0 {
        let mut files = BTreeMap::new();
        let mut put_tensors = |file: &str, tensors: &[(String, Tensor)], count: Option<u64>| {
            let key = format!("{folder}/{file}");
            let bytes = safetensors_bytes(tensors, count)
                .map_err(|message| checkpoint_error(run_dir, &key, message))?;
            files.insert(file.to_string(), bytes.len() as u64);
            run_dir.put(&key, bytes)
        };
        put_tensors(WEIGHTS_FILE, &contents.trainable, None)?;
        put_tensors(
            OPTIMIZER_FILE,
            &contents.optimizer,
            Some(contents.optimizer_steps),
        )?;
        if let Some(ema) = &contents.ema {
            put_tensors(EMA_FILE, ema, Some(contents.ema_updates))?;
        }
        let record = PositionRecord {
            format_version: CHECKPOINT_FORMAT_VERSION,
            position: position.clone(),
            trainable_keys_digest: trainable_keys_digest(&contents.trainable),
            optimizer_steps: contents.optimizer_steps,
            ema_updates: contents.ema_updates,
            files,
        };
        put_json(run_dir, &format!("{folder}/{POSITION_FILE}"), &record)?;
    }
    put_json(
        run_dir,
        &format!("{folder}/{}", rank_file_name(position.rank)),
        position,
    )?;
    tracing::info!(
        step = position.step,
        rank = position.rank,
        epoch = position.epoch,
        batch = position.batch,
        "checkpoint part written"
    );
    Ok(())
}

fn put_json<T: Serialize>(run_dir: &RunDir, key: &str, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|error| checkpoint_error(run_dir, key, format!("cannot encode: {error}")))?;
    run_dir.put(key, text.into_bytes())
}

/// Writes `COMPLETE` into a checkpoint folder. In a job the coordinator does this once every rank
/// reported CheckpointDone; a worker never calls it there. This is for a single process that runs
/// without a coordinator (a local run, the tests).
pub fn mark_complete_without_coordinator(run_dir: &RunDir, checkpoint_key: &str) -> Result<()> {
    let folder = checkpoint_key.trim_end_matches('/');
    let position_key = format!("{folder}/{POSITION_FILE}");
    if !run_dir.exists(&position_key)? {
        return Err(checkpoint_error(
            run_dir,
            &position_key,
            "cannot mark the checkpoint complete: rank 0's position.json is missing",
        ));
    }
    run_dir.put(&format!("{folder}/{COMPLETE_MARKER}"), Vec::new())
}

/// The complete checkpoint with the highest step (`checkpoints/step-<N>`), skipping folders
/// without `COMPLETE`; `None` when there is none.
pub fn latest_complete_checkpoint(run_dir: &RunDir) -> Result<Option<String>> {
    let keys = run_dir.list(CHECKPOINTS_PREFIX)?;
    let latest = keys
        .iter()
        .filter_map(|key| key.strip_suffix(&format!("/{COMPLETE_MARKER}")))
        .filter_map(|folder| checkpoint_step(folder).map(|step| (step, folder)))
        .max_by_key(|(step, _)| *step)
        .map(|(_, folder)| folder.to_string());
    Ok(latest)
}

/// Reads a complete checkpoint (`checkpoints/step-<N>`). Refused, with the key named: a folder
/// without `COMPLETE`, a missing file, a tensor file whose length differs from the one recorded
/// (truncated), one that is not valid safetensors, and weights whose keys do not match the
/// recorded digest. Tensors come back on the CPU, sorted by name.
pub fn read_checkpoint(run_dir: &RunDir, checkpoint_key: &str) -> Result<CheckpointContents> {
    let folder = checkpoint_key.trim_end_matches('/');
    let complete_key = format!("{folder}/{COMPLETE_MARKER}");
    if !run_dir.exists(&complete_key)? {
        return Err(checkpoint_error(
            run_dir,
            &complete_key,
            "the checkpoint is not complete (no COMPLETE marker) and is never resumed from",
        ));
    }
    let position_key = format!("{folder}/{POSITION_FILE}");
    let position_bytes = get_required(run_dir, &position_key)?;
    let record: PositionRecord = serde_json::from_slice(&position_bytes)
        .map_err(|error| checkpoint_error(run_dir, &position_key, format!("invalid: {error}")))?;
    if record.format_version != CHECKPOINT_FORMAT_VERSION {
        return Err(checkpoint_error(
            run_dir,
            &position_key,
            format!(
                "field `format_version`: {} is not the supported {CHECKPOINT_FORMAT_VERSION}",
                record.format_version
            ),
        ));
    }
    if let Some(step) = checkpoint_step(folder) {
        if step != record.position.step {
            return Err(checkpoint_error(
                run_dir,
                &position_key,
                format!(
                    "field `step`: {} differs from the folder's step {step}",
                    record.position.step
                ),
            ));
        }
    }
    let read_tensors = |file: &str| -> Result<CountedTensors> {
        let key = format!("{folder}/{file}");
        let Some(&expected_length) = record.files.get(file) else {
            return Err(checkpoint_error(
                run_dir,
                &position_key,
                format!("field `files` does not list {file}"),
            ));
        };
        let bytes = get_required(run_dir, &key)?;
        if bytes.len() as u64 != expected_length {
            return Err(checkpoint_error(
                run_dir,
                &key,
                format!(
                    "is {} bytes but position.json records {expected_length} (truncated or \
                     overwritten)",
                    bytes.len()
                ),
            ));
        }
        tensors_from_safetensors(&bytes).map_err(|message| checkpoint_error(run_dir, &key, message))
    };
    let (trainable, _) = read_tensors(WEIGHTS_FILE)?;
    let digest = trainable_keys_digest(&trainable);
    if digest != record.trainable_keys_digest {
        return Err(checkpoint_error(
            run_dir,
            &format!("{folder}/{WEIGHTS_FILE}"),
            format!(
                "its keys, shapes and dtypes have digest {digest}, position.json records {}",
                record.trainable_keys_digest
            ),
        ));
    }
    let (optimizer, optimizer_steps) = read_tensors(OPTIMIZER_FILE)?;
    let check_count = |file: &str, stored: Option<u64>, recorded: u64| -> Result<()> {
        if stored == Some(recorded) {
            return Ok(());
        }
        Err(checkpoint_error(
            run_dir,
            &format!("{folder}/{file}"),
            format!(
                "metadata `{STEP_COUNT_METADATA}` is {stored:?}, position.json records {recorded}"
            ),
        ))
    };
    check_count(OPTIMIZER_FILE, optimizer_steps, record.optimizer_steps)?;
    let ema = if record.files.contains_key(EMA_FILE) {
        let (ema, ema_updates) = read_tensors(EMA_FILE)?;
        check_count(EMA_FILE, ema_updates, record.ema_updates)?;
        Some(ema)
    } else {
        None
    };
    Ok(CheckpointContents {
        position: record.position,
        trainable,
        optimizer,
        optimizer_steps: record.optimizer_steps,
        ema,
        ema_updates: record.ema_updates,
    })
}

/// The positions the ranks wrote (`rank-<r>.json`), by rank.
pub fn read_rank_positions(
    run_dir: &RunDir,
    checkpoint_key: &str,
) -> Result<BTreeMap<u32, CheckpointPosition>> {
    let folder = checkpoint_key.trim_end_matches('/');
    let mut positions = BTreeMap::new();
    for key in run_dir.list(folder)? {
        let Some(name) = key.rsplit('/').next() else {
            continue;
        };
        let Some(rank) = name
            .strip_prefix("rank-")
            .and_then(|rest| rest.strip_suffix(".json"))
            .and_then(|rank| rank.parse::<u32>().ok())
        else {
            continue;
        };
        let bytes = get_required(run_dir, &key)?;
        let position: CheckpointPosition = serde_json::from_slice(&bytes)
            .map_err(|error| checkpoint_error(run_dir, &key, format!("invalid: {error}")))?;
        positions.insert(rank, position);
    }
    Ok(positions)
}

fn get_required(run_dir: &RunDir, key: &str) -> Result<bytes::Bytes> {
    run_dir
        .get(key)?
        .ok_or_else(|| checkpoint_error(run_dir, key, "is missing from the checkpoint"))
}

/// Copies checkpoint tensors into live ones by name (`destination` is usually the model's
/// trainable parameters), without recording autograd history. Every destination name must be
/// in `source` with the same shape, and `source` must hold nothing else; `item` names the
/// source in errors (for example the checkpoint key).
pub fn copy_tensors_by_name(
    source: &[(String, Tensor)],
    destination: &[(String, Tensor)],
    item: &str,
) -> Result<()> {
    let by_name: HashMap<&str, &Tensor> = source
        .iter()
        .map(|(name, tensor)| (name.as_str(), tensor))
        .collect();
    for (name, target) in destination {
        let Some(value) = by_name.get(name.as_str()) else {
            return Err(WorkerError::MissingTensor {
                key: name.clone(),
                source_name: item.to_string(),
                expected: target.size(),
            });
        };
        if value.size() != target.size() {
            return Err(WorkerError::TensorShape {
                key: name.clone(),
                source_name: item.to_string(),
                expected: target.size(),
                actual: value.size(),
            });
        }
        let mut target = target.shallow_clone();
        tch::no_grad(|| target.f_copy_(value))
            .map_err(WorkerError::torch(format!("copying `{name}` from {item}")))?;
    }
    if source.len() != destination.len() {
        let wanted: std::collections::HashSet<&str> =
            destination.iter().map(|(name, _)| name.as_str()).collect();
        let extra: Vec<&str> = source
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| !wanted.contains(name))
            .take(5)
            .collect();
        return Err(WorkerError::Input {
            name: item.to_string(),
            message: format!(
                "holds {} tensors where the model has {} trainable ones, for example {extra:?}",
                source.len(),
                destination.len()
            ),
        });
    }
    Ok(())
}

/// A CPU, contiguous copy of one tensor for the safetensors writer.
struct TensorBytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &TensorBytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        _ => return None,
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        _ => return None,
    })
}

/// Serialises named tensors (any device, any layout) to safetensors bytes; `count` goes into the
/// metadata as the step or update count. The values round-trip bit for bit.
pub fn safetensors_bytes(
    tensors: &[(String, Tensor)],
    count: Option<u64>,
) -> std::result::Result<Vec<u8>, String> {
    let metadata =
        count.map(|count| HashMap::from([(STEP_COUNT_METADATA.to_string(), count.to_string())]));
    safetensors_bytes_with_metadata(tensors, metadata)
}

/// Serialises named tensors (any device, any layout) to safetensors bytes with the given
/// `__metadata__` strings. The values round-trip bit for bit.
pub fn safetensors_bytes_with_metadata(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> std::result::Result<Vec<u8>, String> {
    let mut seen = std::collections::HashSet::new();
    let mut prepared = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        if !seen.insert(name.as_str()) {
            return Err(format!("tensor `{name}` appears twice"));
        }
        let kind = tensor.kind();
        let dtype = dtype_of(kind)
            .ok_or_else(|| format!("tensor `{name}` has unsupported dtype {kind:?}"))?;
        let cpu = tensor.detach().to_device(Device::Cpu).contiguous();
        let numel = cpu.numel();
        let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
        cpu.f_copy_data_u8(&mut data, numel)
            .map_err(|error| format!("tensor `{name}` cannot be copied: {error}"))?;
        let shape = cpu.size().iter().map(|&dim| dim as usize).collect();
        prepared.push((name.clone(), TensorBytes { dtype, shape, data }));
    }
    safetensors::tensor::serialize(
        prepared.iter().map(|(name, bytes)| (name.as_str(), bytes)),
        &metadata,
    )
    .map_err(|error| format!("cannot be serialised as safetensors: {error:?}"))
}

/// Named tensors with the step count a safetensors file's metadata records (if any).
pub type CountedTensors = (Vec<(String, Tensor)>, Option<u64>);

/// Parses safetensors bytes into CPU tensors sorted by name, with the count from the metadata.
pub fn tensors_from_safetensors(bytes: &[u8]) -> std::result::Result<CountedTensors, String> {
    let (_, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|error| format!("is not a valid safetensors file: {error:?}"))?;
    let count =
        match metadata
            .metadata()
            .as_ref()
            .and_then(|map| map.get(STEP_COUNT_METADATA))
        {
            Some(text) => Some(text.parse::<u64>().map_err(|_| {
                format!("metadata `{STEP_COUNT_METADATA}` is {text:?}, not a count")
            })?),
            None => None,
        };
    let parsed = SafeTensors::deserialize(bytes)
        .map_err(|error| format!("is not a valid safetensors file: {error:?}"))?;
    let mut tensors = Vec::with_capacity(parsed.len());
    for (name, view) in parsed.tensors() {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&dim| dim as i64).collect();
        let tensor = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|error| format!("tensor `{name}` cannot be built: {error}"))?;
        tensors.push((name, tensor));
    }
    tensors.sort_by(|left, right| left.0.cmp(&right.0));
    Ok((tensors, count))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_keys_and_steps_round_trip() {
        assert_eq!(checkpoint_key(100), "checkpoints/step-100");
        assert_eq!(checkpoint_step("checkpoints/step-100"), Some(100));
        assert_eq!(checkpoint_step("checkpoints/step-7/"), Some(7));
        assert_eq!(checkpoint_step("checkpoints/step-x"), None);
        assert_eq!(checkpoint_step("samples/step-7"), None);
    }

    #[test]
    fn the_keys_digest_ignores_values_and_order_but_not_shapes() {
        let first = vec![
            (
                "a".to_string(),
                Tensor::zeros([2, 3], (Kind::Float, Device::Cpu)),
            ),
            (
                "b".to_string(),
                Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            ),
        ];
        let reordered = vec![
            (
                "b".to_string(),
                Tensor::ones([4], (Kind::Float, Device::Cpu)),
            ),
            (
                "a".to_string(),
                Tensor::ones([2, 3], (Kind::Float, Device::Cpu)),
            ),
        ];
        let reshaped = vec![
            (
                "a".to_string(),
                Tensor::zeros([3, 2], (Kind::Float, Device::Cpu)),
            ),
            (
                "b".to_string(),
                Tensor::zeros([4], (Kind::Float, Device::Cpu)),
            ),
        ];
        assert_eq!(
            trainable_keys_digest(&first),
            trainable_keys_digest(&reordered)
        );
        assert_ne!(
            trainable_keys_digest(&first),
            trainable_keys_digest(&reshaped)
        );
    }
}
