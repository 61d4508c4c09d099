//! Checkpoints in the run directory (docs/architecture.md §7): tensors of every dtype round-trip
//! bit for bit; a folder without COMPLETE, a truncated or missing tensor file, and weights that do
//! not match their recorded keys are refused with errors naming the key; the latest complete
//! checkpoint skips partial folders; other ranks write only their position.

use anyhow::Result;
use arbor_worker::train::checkpoint::{
    checkpoint_key, latest_complete_checkpoint, mark_complete_without_coordinator, read_checkpoint,
    read_rank_positions, safetensors_bytes, tensors_from_safetensors, write_checkpoint_part,
    CheckpointContents, CheckpointPosition, COMPLETE_MARKER, EMA_FILE, OPTIMIZER_FILE,
    WEIGHTS_FILE,
};
use arbor_worker::train::run_dir::RunDir;
use tch::{Kind, Tensor};

fn position(step: u64, rank: u32, world_size: u32) -> CheckpointPosition {
    CheckpointPosition {
        step,
        epoch: 2,
        segment: 1,
        batch: 17,
        generation: 3,
        world_size,
        rank,
        mode: "hypernetwork".to_string(),
    }
}

/// Tensors of every supported float and integer dtype, including a non-contiguous one and a
/// scalar, with values that are not round in any of them.
fn mixed_tensors() -> Vec<(String, Tensor)> {
    let base = Tensor::from_slice(&[0.1f64, -2.5e-3, 3.3e4, 1.0 / 3.0, -7.77, 6.02e-8]);
    vec![
        (
            "a.f32".to_string(),
            base.to_kind(Kind::Float).reshape([2, 3]),
        ),
        ("b.f64".to_string(), base.reshape([3, 2])),
        ("c.bf16".to_string(), base.to_kind(Kind::BFloat16)),
        (
            "d.f16".to_string(),
            base.to_kind(Kind::Half).reshape([1, 6]),
        ),
        (
            "e.i64".to_string(),
            Tensor::from_slice(&[i64::MIN, -1, 0, 7, i64::MAX]),
        ),
        (
            "f.transposed".to_string(),
            base.to_kind(Kind::Float).reshape([2, 3]).transpose(0, 1),
        ),
        ("g.scalar".to_string(), Tensor::from(42i64)),
        ("h.u8".to_string(), Tensor::from_slice(&[0u8, 255, 9])),
    ]
}

fn assert_same_tensors(actual: &[(String, Tensor)], expected: &[(String, Tensor)]) {
    let mut expected: Vec<&(String, Tensor)> = expected.iter().collect();
    expected.sort_by(|left, right| left.0.cmp(&right.0));
    assert_eq!(actual.len(), expected.len());
    for ((actual_name, actual), (expected_name, expected)) in actual.iter().zip(expected) {
        assert_eq!(actual_name, expected_name);
        assert_eq!(actual.kind(), expected.kind(), "{actual_name}");
        assert_eq!(actual.size(), expected.size(), "{actual_name}");
        assert!(
            actual.equal(expected),
            "{actual_name}: {actual} vs {expected}"
        );
    }
}

fn contents(step: u64, with_ema: bool) -> CheckpointContents {
    CheckpointContents {
        position: position(step, 0, 2),
        trainable: mixed_tensors(),
        optimizer: vec![
            (
                "a.f32.exp_avg".to_string(),
                Tensor::from_slice(&[1.5f32, -0.25]),
            ),
            (
                "a.f32.exp_avg_sq".to_string(),
                Tensor::from_slice(&[2.25f32, 1e-9]),
            ),
            ("a.f32.step".to_string(), Tensor::from(3i64)),
        ],
        optimizer_steps: step,
        ema: with_ema.then(|| {
            vec![(
                "a.f32".to_string(),
                Tensor::from_slice(&[0.5f32; 6]).reshape([2, 3]),
            )]
        }),
        ema_updates: if with_ema { step - 1 } else { 0 },
    }
}

fn open_run_dir(folder: &tempfile::TempDir) -> RunDir {
    RunDir::open(folder.path().join("run").to_str().unwrap()).unwrap()
}

#[test]
fn safetensors_bytes_round_trip_every_dtype_bit_for_bit() -> Result<()> {
    let tensors = mixed_tensors();
    let bytes = safetensors_bytes(&tensors, Some(12)).map_err(anyhow::Error::msg)?;
    let (read, count) = tensors_from_safetensors(&bytes).map_err(anyhow::Error::msg)?;
    assert_eq!(count, Some(12));
    assert_same_tensors(&read, &tensors);
    // The files are ordinary safetensors: tch's own reader agrees.
    let folder = tempfile::tempdir()?;
    let path = folder.path().join("mixed.safetensors");
    std::fs::write(&path, &bytes)?;
    let mut by_tch = Tensor::read_safetensors(&path)?;
    by_tch.sort_by(|left, right| left.0.cmp(&right.0));
    assert_same_tensors(&by_tch, &tensors);
    Ok(())
}

#[test]
fn a_written_and_completed_checkpoint_reads_back_exactly() -> Result<()> {
    let folder = tempfile::tempdir()?;
    let run_dir = open_run_dir(&folder);
    let written = contents(40, true);
    write_checkpoint_part(&run_dir, &written)?;
    let key = checkpoint_key(40);
    mark_complete_without_coordinator(&run_dir, &key)?;
    let read = read_checkpoint(&run_dir, &key)?;
    assert_eq!(read.position, written.position);
    assert_same_tensors(&read.trainable, &written.trainable);
    assert_same_tensors(&read.optimizer, &written.optimizer);
    assert_eq!(read.optimizer_steps, 40);
    assert_same_tensors(
        read.ema.as_deref().unwrap(),
        written.ema.as_deref().unwrap(),
    );
    assert_eq!(read.ema_updates, 39);

    // Without EMA there is no ema file and none comes back.
    write_checkpoint_part(&run_dir, &contents(41, false))?;
    mark_complete_without_coordinator(&run_dir, &checkpoint_key(41))?;
    assert!(!run_dir.exists(&format!("{}/{EMA_FILE}", checkpoint_key(41)))?);
    assert!(read_checkpoint(&run_dir, &checkpoint_key(41))?
        .ema
        .is_none());
    Ok(())
}

#[test]
fn a_checkpoint_without_complete_is_refused_by_path() -> Result<()> {
    let folder = tempfile::tempdir()?;
    let run_dir = open_run_dir(&folder);
    write_checkpoint_part(&run_dir, &contents(10, true))?;
    let error = read_checkpoint(&run_dir, &checkpoint_key(10))
        .expect_err("a checkpoint without COMPLETE")
        .to_string();
    assert!(error.contains("checkpoints/step-10/COMPLETE"), "{error}");
    assert!(error.contains("not complete"), "{error}");
    Ok(())
}

#[test]
fn a_truncated_weights_file_is_refused_with_its_key() -> Result<()> {
    let folder = tempfile::tempdir()?;
    let run_dir = open_run_dir(&folder);
    write_checkpoint_part(&run_dir, &contents(20, true))?;
    let key = checkpoint_key(20);
    mark_complete_without_coordinator(&run_dir, &key)?;
    let weights_key = format!("{key}/{WEIGHTS_FILE}");
    let bytes = run_dir.get(&weights_key)?.unwrap();
    run_dir.put(&weights_key, bytes.slice(..bytes.len() - 5))?;
    let error = read_checkpoint(&run_dir, &key)
        .expect_err("a truncated weights file")
        .to_string();
    assert!(error.contains(&weights_key), "{error}");
    assert!(error.contains("truncated"), "{error}");
    Ok(())
}

#[test]
fn a_corrupt_or_missing_tensor_file_is_refused_with_its_key() -> Result<()> {
    let folder = tempfile::tempdir()?;
    let run_dir = open_run_dir(&folder);
    write_checkpoint_part(&run_dir, &contents(30, true))?;
    let key = checkpoint_key(30);
    mark_complete_without_coordinator(&run_dir, &key)?;

    // Same length, but the safetensors header is garbage.
    let optimizer_key = format!("{key}/{OPTIMIZER_FILE}");
    let original = run_dir.get(&optimizer_key)?.unwrap();
    let mut corrupt = original.to_vec();
    corrupt[8] = b'#';
    run_dir.put(&optimizer_key, corrupt)?;
    let error = read_checkpoint(&run_dir, &key)
        .expect_err("corrupt")
        .to_string();
    assert!(error.contains(&optimizer_key), "{error}");
    assert!(error.contains("safetensors"), "{error}");
    run_dir.put(&optimizer_key, original)?;
    read_checkpoint(&run_dir, &key)?;

    // Weights replaced by other tensors of the same byte length: the keys digest differs.
    let weights_key = format!("{key}/{WEIGHTS_FILE}");
    let original = run_dir.get(&weights_key)?.unwrap();
    let mut renamed = original.to_vec();
    let header_end = 8 + u64::from_le_bytes(renamed[..8].try_into()?) as usize;
    let header = String::from_utf8(renamed[8..header_end].to_vec())?;
    let position = header
        .find("\"a.f32\"")
        .expect("the tensor name in the header");
    renamed[8 + position + 1] = b'z';
    run_dir.put(&weights_key, renamed)?;
    let error = read_checkpoint(&run_dir, &key)
        .expect_err("renamed")
        .to_string();
    assert!(error.contains(&weights_key), "{error}");
    assert!(error.contains("digest"), "{error}");
    run_dir.put(&weights_key, original)?;

    run_dir.delete(&format!("{key}/{EMA_FILE}"))?;
    let error = read_checkpoint(&run_dir, &key)
        .expect_err("missing ema")
        .to_string();
    assert!(error.contains(&format!("{key}/{EMA_FILE}")), "{error}");
    assert!(error.contains("missing"), "{error}");
    Ok(())
}

#[test]
fn the_latest_complete_checkpoint_skips_partial_folders() -> Result<()> {
    let folder = tempfile::tempdir()?;
    let run_dir = open_run_dir(&folder);
    assert_eq!(latest_complete_checkpoint(&run_dir)?, None);
    for step in [5u64, 100, 20] {
        write_checkpoint_part(&run_dir, &contents(step, false))?;
        mark_complete_without_coordinator(&run_dir, &checkpoint_key(step))?;
    }
    // Step 300 was interrupted before COMPLETE; step 200 has only a stray rank file.
    write_checkpoint_part(&run_dir, &contents(300, false))?;
    let mut other_rank = contents(200, false);
    other_rank.position = position(200, 1, 2);
    write_checkpoint_part(&run_dir, &other_rank)?;
    // Numeric, not lexicographic: 100 beats 20 and 5.
    assert_eq!(
        latest_complete_checkpoint(&run_dir)?.as_deref(),
        Some("checkpoints/step-100")
    );
    // A COMPLETE without rank 0's files cannot be made by the single-process marker.
    let error = mark_complete_without_coordinator(&run_dir, &checkpoint_key(200))
        .expect_err("no position.json")
        .to_string();
    assert!(
        error.contains("checkpoints/step-200/position.json"),
        "{error}"
    );
    // Once the coordinator completes 300 it is the latest.
    run_dir.put(
        &format!("{}/{COMPLETE_MARKER}", checkpoint_key(300)),
        Vec::new(),
    )?;
    assert_eq!(
        latest_complete_checkpoint(&run_dir)?.as_deref(),
        Some("checkpoints/step-300")
    );
    Ok(())
}

#[test]
fn every_rank_writes_its_position_and_only_rank_0_the_tensors() -> Result<()> {
    let folder = tempfile::tempdir()?;
    let run_dir = open_run_dir(&folder);
    let key = checkpoint_key(7);
    let mut rank_1 = contents(7, true);
    rank_1.position = position(7, 1, 2);
    write_checkpoint_part(&run_dir, &rank_1)?;
    assert_eq!(run_dir.list(&key)?, vec![format!("{key}/rank-1.json")]);
    write_checkpoint_part(&run_dir, &contents(7, true))?;
    let positions = read_rank_positions(&run_dir, &key)?;
    assert_eq!(positions.len(), 2);
    assert_eq!(positions[&0], position(7, 0, 2));
    assert_eq!(positions[&1], position(7, 1, 2));
    assert!(run_dir.exists(&format!("{key}/{WEIGHTS_FILE}"))?);
    assert!(!run_dir.exists(&format!("{key}/{COMPLETE_MARKER}"))?);

    let mut outside = contents(8, false);
    outside.position = position(8, 2, 2);
    let error = write_checkpoint_part(&run_dir, &outside)
        .expect_err("rank outside the world")
        .to_string();
    assert!(error.contains("rank 2 is outside world size 2"), "{error}");
    Ok(())
}
