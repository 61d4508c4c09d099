//! Training end to end with real processes (issue 7): `arbor coordinator` and 2 `arbor-worker
//! train` ranks on Gloo, a tiny SD1-topology model on tiny images, on CPU. The exports load in
//! the Python tools users load them with; a worker SIGKILLed mid-epoch is replaced and the job
//! resumes from the last complete checkpoint; a checkpoint without COMPLETE is never resumed.
//! Every job keeps the ledger exact: each item of each epoch trained once after rollbacks.
//!
//! Needs the `arbor` binary beside `arbor-worker` (`cargo build -p arbor-coordinator` with the
//! same target folder) and the project's venv (scripts/setup.sh; ARBOR_PYTHON_BIN).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use crate::e2e_support::{
    check_exports, one_job_at_a_time, tiny_model, worker_bin, Job, JobSpec, TOKEN,
};
use arbor_testkit::process::signal;
use serde_json::Value;

const JOB_LIMIT: Duration = Duration::from_secs(240);

/// Items per epoch that a 2-rank job of `bsz` trains: all 24 but the trim.
fn global_batch(spec: &JobSpec) -> usize {
    2 * spec.bsz as usize
}

fn steps_per_epoch(spec: &JobSpec) -> u64 {
    (spec.items / global_batch(spec)) as u64
}

fn assert_metrics_cover_every_step(job: &Job, total_steps: u64, exactly_once: bool) {
    let (by_step, lines) = job.metrics();
    let steps: Vec<u64> = by_step.keys().copied().collect();
    assert_eq!(
        steps.len() as u64,
        total_steps,
        "metrics.jsonl steps {steps:?}, expected {total_steps}"
    );
    let first = steps[0];
    assert!(first <= 1, "metrics start at step {first}");
    assert_eq!(
        steps,
        (first..first + total_steps).collect::<Vec<_>>(),
        "metrics.jsonl has a hole"
    );
    for (step, record) in &by_step {
        let loss = record["loss"]
            .as_f64()
            .unwrap_or_else(|| panic!("step {step}: no numeric loss in {record}"));
        assert!(loss.is_finite() && loss > 0.0, "step {step}: loss {loss}");
    }
    if exactly_once {
        assert_eq!(lines as u64, total_steps, "one metrics record per step");
    }
}

fn mean_loss(records: &[&Value]) -> f64 {
    records
        .iter()
        .map(|record| record["loss"].as_f64().unwrap())
        .sum::<f64>()
        / records.len() as f64
}

#[test]
fn a_two_worker_finetune_runs_to_completion_and_its_exports_load_in_diffusers() {
    let _one = one_job_at_a_time();
    let spec = JobSpec {
        epochs: 3,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    job.start_worker(0);
    job.start_worker(1);
    job.wait_coordinator_success(JOB_LIMIT);
    for status in job.wait_workers(Duration::from_secs(30)) {
        assert!(
            status.success(),
            "a worker failed: {status}\n{}",
            job.logs()
        );
    }

    let state = job.state();
    assert_eq!(state["finished"], true, "{state}");
    assert_eq!(state["generation"], 1, "no regroup happened: {state}");
    for epoch in 0..spec.epochs {
        job.assert_ledger_exact(epoch, 1, global_batch(&spec));
        assert_eq!(job.rolled_back(epoch), 0);
    }
    let total_steps = spec.epochs * steps_per_epoch(&spec);
    assert_metrics_cover_every_step(&job, total_steps, true);
    let (by_step, _) = job.metrics();
    let records: Vec<&Value> = by_step.values().collect();
    let (first, last) = (
        mean_loss(&records[..4]),
        mean_loss(&records[records.len() - 4..]),
    );
    eprintln!("finetune loss: first 4 steps {first:.4}, last 4 steps {last:.4}");

    let run = job.run_dir();
    let (complete, partial) = job.checkpoints();
    assert!(!complete.is_empty(), "no complete checkpoint");
    assert!(partial.is_empty(), "partial checkpoints {partial:?}");
    assert!(run.join("loss.png").is_file(), "loss.png");
    let samples = std::fs::read_dir(run.join("samples"))
        .map(|entries| entries.count())
        .unwrap_or(0);
    assert!(samples > 0, "no sample grid in samples/");

    let exports = run.join("exports");
    assert!(exports.join("model.safetensors").is_file());
    assert!(exports.join("diffusers/model_index.json").is_file());
    let checked = check_exports(&[
        "finetune",
        "--exports",
        &exports.display().to_string(),
        "--base-model",
        &tiny_model().dir.display().to_string(),
    ]);
    eprintln!("check_exports: {checked}");
    assert!(checked["unet_tensors_changed"].as_u64().unwrap() > 0);
}

#[test]
fn a_two_worker_hypernetwork_job_exports_a_pt_that_torch_load_accepts() {
    let _one = one_job_at_a_time();
    let spec = JobSpec {
        epochs: 1,
        mode: "hypernetwork",
        samples_every: 100,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    job.start_worker(0);
    job.start_worker(1);
    job.wait_coordinator_success(JOB_LIMIT);
    for status in job.wait_workers(Duration::from_secs(30)) {
        assert!(
            status.success(),
            "a worker failed: {status}\n{}",
            job.logs()
        );
    }
    job.assert_ledger_exact(0, 1, global_batch(&spec));
    assert_metrics_cover_every_step(&job, steps_per_epoch(&spec), true);

    let exports = job.run_dir().join("exports");
    assert!(exports.join("hypernetwork.pt").is_file());
    assert!(
        !exports.join("hypernetwork.safetensors").exists(),
        "no safetensors form: ComfyUI would load it as an empty patch"
    );
    let sizes = tiny_model()
        .hypernetwork_sizes
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let checked = check_exports(&[
        "hypernetwork",
        "--exports",
        &exports.display().to_string(),
        "--sizes",
        &sizes,
    ]);
    eprintln!("check_exports: {checked}");
    assert_eq!(checked["step"], steps_per_epoch(&spec));
}

#[test]
fn a_two_worker_lora_job_holds_out_validation_items_and_exports_a_lora_diffusers_loads() {
    let _one = one_job_at_a_time();
    let spec = JobSpec {
        epochs: 1,
        mode: "lora",
        samples_every: 100,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    let config_path = job.path().join("job.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let config = config
        .replace("[data]\n", "[data]\nvalidation_fraction = 0.25\n")
        .replace("[model]\n", "[model]\ntrain_text_encoder = true\n")
        .replace("[samples]\n", "[samples]\nvalidation_every = 2\n")
        + "\n[lora]\nrank = 4\ntargets = [\"attention\", \"projections\"]\nsave_precision = \"fp32\"\n";
    std::fs::write(&config_path, config).unwrap();
    job.start_coordinator();
    job.start_worker(0);
    job.start_worker(1);
    job.wait_coordinator_success(JOB_LIMIT);
    for status in job.wait_workers(Duration::from_secs(30)) {
        assert!(
            status.success(),
            "a worker failed: {status}\n{}",
            job.logs()
        );
    }
    // The held-out items never train; every other item trains once.
    let held_out: HashSet<u64> = job
        .item_ids()
        .into_iter()
        .filter(|&id| arbor_common::validation::is_held_out(id, 0.25))
        .collect();
    assert!(!held_out.is_empty(), "the test dataset holds nothing out");
    let trained = job.trained_items(0);
    assert!(trained.keys().all(|id| !held_out.contains(id)));
    let kept = job.item_ids().len() - held_out.len();
    assert!(
        kept - trained.len() < global_batch(&spec),
        "{} of {kept} trained",
        trained.len()
    );
    // The validation loss every 2 steps, in metrics.jsonl and the coordinator's status.
    let (metrics, _) = job.metrics();
    let measured: Vec<u64> = metrics
        .iter()
        .filter(|(_, record)| {
            record["validation_loss"]
                .as_f64()
                .is_some_and(f64::is_finite)
        })
        .map(|(step, _)| *step)
        .collect();
    assert!(
        !measured.is_empty() && measured.iter().all(|step| step % 2 == 0),
        "{measured:?}"
    );
    let coordinator_log = job.coordinator_log();
    assert!(
        coordinator_log.contains("global batch 4 = 2 rank(s) x bsz 2 x grad_accum 1"),
        "{coordinator_log}"
    );

    // The LoRA loads in diffusers and changes the UNet and the text encoder as kohya's math says.
    let lora = job.run_dir().join("exports/lora.safetensors");
    let inputs = job.path().join("lora_inputs.safetensors");
    write_unet_inputs(&tiny_model().dir, &inputs);
    let out = job.path().join("lora_outputs.safetensors");
    let output = std::process::Command::new(arbor_testkit::python_bin())
        .arg(arbor_testkit::repo_root().join("worker/tests/fixtures/check_lora.py"))
        .args(["check", "--model"])
        .arg(&tiny_model().dir)
        .arg("--lora")
        .arg(&lora)
        .arg("--inputs")
        .arg(&inputs)
        .arg("--out")
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "check_lora.py failed: {report}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Value = serde_json::from_str(report.lines().last().unwrap()).unwrap();
    assert!(report["te_modules"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["metadata"]["ss_network_dim"], "4");
    let changed = report["max_abs_diff"]["unet.out"]["base_vs_reference"]
        .as_f64()
        .unwrap();
    assert!(changed > 0.0, "training left the LoRA at zero: {report}");
}

/// Random UNet and CLIP inputs for the model at `model` (its unet/config.json's shapes).
fn write_unet_inputs(model: &Path, path: &Path) {
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("unet/config.json")).unwrap())
            .unwrap();
    let channels = config["in_channels"].as_i64().unwrap();
    let size = config["sample_size"].as_i64().unwrap().min(16);
    let width = config["cross_attention_dim"].as_i64().unwrap();
    tch::manual_seed(0);
    let options = (tch::Kind::Float, tch::Device::Cpu);
    let tensors = [
        (
            "unet.sample",
            tch::Tensor::randn([2, channels, size, size], options),
        ),
        ("unet.timesteps", tch::Tensor::from_slice(&[10i64, 700])),
        (
            "unet.encoder_hidden_states",
            tch::Tensor::randn([2, 77, width], options),
        ),
        (
            "clip.input_ids",
            tch::Tensor::randint(1000, [2, 77], (tch::Kind::Int64, tch::Device::Cpu)),
        ),
    ];
    tch::Tensor::write_safetensors(&tensors, path).unwrap();
}

/// The coordinator's "group formed" events: (generation, world size, epoch, from batch).
fn groups_formed(log: &str) -> Vec<(u64, u64, u64, u64)> {
    log.lines()
        .filter_map(|line| {
            let rest = &line[line.find("group formed: generation ")? + 25..];
            let numbers: Vec<u64> = rest
                .split(|c: char| !c.is_ascii_digit())
                .filter(|part| !part.is_empty())
                .filter_map(|part| part.parse().ok())
                .collect();
            // generation G, world size W, epoch E segment S from batch B
            (numbers.len() >= 5).then(|| (numbers[0], numbers[1], numbers[2], numbers[4]))
        })
        .collect()
}

/// Waits until the job has a complete checkpoint and the current epoch trained past it, then
/// returns the last checkpoint record.
fn wait_past_a_checkpoint(job: &Job) -> Value {
    job.wait_until(
        Duration::from_secs(120),
        "batches past a complete checkpoint",
        |job| {
            let state = job.state();
            let checkpoint = &state["last_checkpoint"];
            if checkpoint.is_null() || state["finished"] == true {
                return false;
            }
            let epoch = state["epoch"].as_u64().unwrap_or(0);
            let from = if checkpoint["epoch"].as_u64() == Some(epoch) {
                checkpoint["batch"].as_u64().unwrap_or(0)
            } else {
                0
            };
            job.ledger_lines(epoch)
                .iter()
                .any(|line| line["batch"].as_u64() > Some(from))
        },
    );
    job.state()["last_checkpoint"].clone()
}

fn expected_resume_batch(state: &Value) -> u64 {
    let checkpoint = &state["last_checkpoint"];
    if checkpoint["epoch"] == state["epoch"] {
        checkpoint["batch"].as_u64().unwrap()
    } else {
        0
    }
}

/// Kills worker 1 mid-epoch past a checkpoint, starts a replacement and checks that the job
/// resumes from that checkpoint with an exact ledger. `survivor_flags` go to worker 0.
fn kill_a_worker_mid_epoch_and_resume(survivor_flags: &[&str]) -> Job {
    let _one = one_job_at_a_time();
    let spec = JobSpec {
        items: 36,
        epochs: 2,
        checkpoint_every: 3,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    job.start_coordinator();
    job.start_worker_with(0, survivor_flags);
    job.start_worker(1);
    wait_past_a_checkpoint(&job);
    signal(job.workers[1].id(), "-KILL");
    // The killed rank may have reported a checkpoint just before it died, and the survivor's
    // report can complete it after the kill. Once the regroup has begun no checkpoint can
    // complete (CheckpointDone needs a running group): the state then holds the one to resume
    // from.
    job.wait_until(
        Duration::from_secs(60),
        "the regroup after the kill",
        |job| job.coordinator_log().contains("regroup: "),
    );
    let state_at_kill = job.state();
    let resume_batch = expected_resume_batch(&state_at_kill);
    let epoch_at_kill = state_at_kill["epoch"].as_u64().unwrap();
    // Batches the ledger holds past the checkpoint at the kill: the regroup must roll them back.
    // (The kill can land right after a checkpoint completes, before any batch past it.)
    let past_checkpoint_at_kill = job
        .ledger_lines(epoch_at_kill)
        .iter()
        .filter(|line| {
            line["batch"]
                .as_u64()
                .is_some_and(|batch| batch >= resume_batch)
        })
        .count();
    eprintln!(
        "killed worker 1 in epoch {epoch_at_kill}; last checkpoint {}",
        state_at_kill["last_checkpoint"]
    );
    job.start_worker(1);
    job.wait_coordinator_success(JOB_LIMIT);
    let statuses = job.wait_workers(Duration::from_secs(30));
    assert!(
        statuses[0].success(),
        "the survivor failed: {}\n{}",
        statuses[0],
        job.logs()
    );
    assert!(
        statuses[2].success(),
        "the replacement failed: {}\n{}",
        statuses[2],
        job.logs()
    );

    let state = job.state();
    assert_eq!(state["finished"], true, "{state}");
    let log = job.coordinator_log();
    let groups = groups_formed(&log);
    let regrouped = groups
        .iter()
        .find(|group| group.0 >= 2)
        .unwrap_or_else(|| panic!("no second group formed: {groups:?}\n{}", job.logs()));
    assert_eq!(regrouped.1, 2, "the replacement joined: {groups:?}");
    assert_eq!(
        (regrouped.2, regrouped.3),
        (epoch_at_kill, resume_batch),
        "resumed at the last complete checkpoint: {groups:?}"
    );
    for epoch in 0..spec.epochs {
        // One plan per world size the epoch ran with; the world size never changed.
        job.assert_ledger_exact(epoch, 1, global_batch(&spec));
    }
    if past_checkpoint_at_kill > 0 {
        assert!(
            job.rolled_back(epoch_at_kill) > 0,
            "the {past_checkpoint_at_kill} batches trained after the checkpoint were not rolled back\n{}",
            job.logs()
        );
    } else {
        eprintln!("the kill landed on a checkpoint boundary: nothing to roll back");
    }
    let total_steps = spec.epochs * steps_per_epoch(&spec);
    assert_metrics_cover_every_step(&job, total_steps, false);
    let (_, partial) = job.checkpoints();
    for step in partial {
        let folder = job.run_dir().join(format!("checkpoints/step-{step}"));
        assert!(!folder.join("COMPLETE").exists());
    }
    assert!(job.run_dir().join("exports/model.safetensors").is_file());
    job
}

#[test]
fn a_worker_killed_mid_epoch_is_replaced_and_the_job_resumes_from_the_last_checkpoint() {
    let job = kill_a_worker_mid_epoch_and_resume(&[]);
    // Gloo survivors re-form in-process.
    assert!(
        !job.worker_log(0).contains("restarted for a regroup"),
        "{}",
        job.worker_log(0)
    );
}

#[test]
fn survivors_forced_onto_the_restart_path_replace_their_process_and_the_job_resumes() {
    // The path NCCL workers take on every regroup, forced on Gloo.
    let job = kill_a_worker_mid_epoch_and_resume(&["--restart-on-regroup"]);
    let log = job.worker_log(0);
    assert!(
        log.contains("restarting this process to join it"),
        "the survivor did not restart\n{log}"
    );
    assert!(
        log.contains("worker process restarted for a regroup"),
        "the replacement process did not start\n{log}"
    );
    // The new process loaded the model again and resumed from the checkpoint.
    assert!(
        log.matches("model loaded").count() >= 2,
        "the restarted process did not load the model\n{log}"
    );
    assert!(log.contains("resumed from checkpoint"), "{log}");
    // It joined under the same worker id: the coordinator never saw a new worker 0.
    let joined = job
        .coordinator_log()
        .lines()
        .filter(|line| line.contains(" joined") && line.contains("worker n0-0-"))
        .count();
    assert_eq!(joined, 1, "{}", job.coordinator_log());
}

#[test]
fn nproc_children_take_distinct_local_ranks_and_devices() {
    // `--device cpu`: each child logs its local rank and device before it looks for the
    // coordinator (none listens here).
    for (device, expect_error) in [("cpu", false), ("cuda", true)] {
        let output = std::process::Command::new(worker_bin())
            .args(["train", "--coordinator", "127.0.0.1:1", "--nproc", "2"])
            .args(["--connect-timeout-s", "1", "--device", device])
            .env("ARBOR_TOKEN", TOKEN)
            .env("RUST_LOG", "info")
            .env_remove("CUDA_VISIBLE_DEVICES")
            .env_remove("NO_COLOR")
            .env_remove("ARBOR_LOG_COLOR")
            .env_remove("ARBOR_LOG_FORMAT")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stderr);
        // Piped output (the parent's and the children's) is plain text.
        assert!(!text.contains('\u{1b}'), "{text:?}");
        assert!(!output.status.success(), "{text}");
        assert!(text.contains("2 of 2 local ranks failed"), "{text}");
        for local_rank in 0..2 {
            let lines: Vec<&str> = text
                .lines()
                .filter(|line| line.starts_with(&format!("[local {local_rank}] ")))
                .collect();
            if expect_error {
                if tch::Cuda::device_count() > local_rank {
                    continue;
                }
                // Refused before joining, naming the rank, its device and the visible count.
                let refusal = format!("local rank {local_rank} needs cuda:{local_rank}");
                assert!(
                    lines.iter().any(|line| line.contains(&refusal)
                        && line.contains("CUDA device(s) are visible")),
                    "{text}"
                );
            } else {
                assert!(
                    lines.iter().any(|line| line.contains("device chosen")
                        && line.contains(&format!("local_rank={local_rank}"))
                        && line.contains("device=cpu")),
                    "{text}"
                );
            }
        }
    }
}

#[test]
fn json_logs_are_one_object_per_line_for_the_worker_and_its_children() {
    let output = std::process::Command::new(worker_bin())
        .args(["train", "--coordinator", "127.0.0.1:1", "--nproc", "2"])
        .args(["--connect-timeout-s", "1", "--device", "cpu"])
        .env("ARBOR_TOKEN", TOKEN)
        .env("ARBOR_LOG_FORMAT", "json")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    let records: Vec<Value> = text
        .lines()
        .map(|line| {
            let record: Value = serde_json::from_str(line)
                .unwrap_or_else(|error| panic!("not JSON ({error}): {line:?}\n{text}"));
            assert!(
                record["level"].is_string() && record["fields"].is_object(),
                "{line}"
            );
            record
        })
        .collect();
    for local_rank in 0..2 {
        assert!(
            records.iter().any(|record| record["process"]
                == format!("local {local_rank}").as_str()
                && record["fields"]["message"] == "device chosen"
                && record["fields"]["local_rank"] == local_rank),
            "{text}"
        );
    }
    assert!(
        records.iter().any(|record| record["level"] == "ERROR"
            && record["fields"]["error"]
                .as_str()
                .is_some_and(|error| error.contains("2 of 2 local ranks failed"))),
        "{text}"
    );
}

/// Copies every file of `from` but COMPLETE into `to`, halving each (weights and optimizer state
/// cut mid-write) except the coordinator's record, which is rewritten for `step`.
fn plant_partial_checkpoint(from: &Path, to: &Path, step: u64) {
    std::fs::create_dir_all(to).unwrap();
    let mut planted = 0;
    for entry in walk(from) {
        let relative = entry.strip_prefix(from).unwrap();
        if relative == Path::new("COMPLETE") {
            continue;
        }
        let target = to.join(relative);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let bytes = std::fs::read(&entry).unwrap();
        if relative == Path::new("coordinator.json") {
            let mut record: Value = serde_json::from_slice(&bytes).unwrap();
            record["step"] = step.into();
            record["path"] = format!("checkpoints/step-{step}").into();
            std::fs::write(&target, serde_json::to_vec_pretty(&record).unwrap()).unwrap();
        } else {
            std::fs::write(&target, &bytes[..bytes.len() / 2]).unwrap();
        }
        planted += 1;
    }
    assert!(
        planted > 1,
        "the checkpoint {from:?} holds no weights to copy"
    );
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[test]
fn a_checkpoint_interrupted_mid_write_is_never_resumed() {
    let _one = one_job_at_a_time();
    let spec = JobSpec {
        items: 36,
        epochs: 2,
        checkpoint_every: 3,
        ..JobSpec::default()
    };
    let total_steps = spec.epochs * steps_per_epoch(&spec);
    let mut job = Job::new(&spec);
    job.start_coordinator();
    job.start_worker(0);
    job.start_worker(1);
    wait_past_a_checkpoint(&job);
    // The whole job dies at once; then a crash mid-write is simulated: a newer checkpoint
    // folder with truncated weights and the coordinator's record, but no COMPLETE.
    job.kill_all();
    let state = job.state();
    let checkpoint = state["last_checkpoint"].clone();
    let resume_batch = expected_resume_batch(&state);
    let complete_step = checkpoint["step"].as_u64().unwrap();
    let partial_step = complete_step + 1000;
    let run = job.run_dir();
    let partial = run.join(format!("checkpoints/step-{partial_step}"));
    plant_partial_checkpoint(
        &run.join(checkpoint["path"].as_str().unwrap()),
        &partial,
        partial_step,
    );
    let log_before_restart = job.coordinator_log().len();

    job.start_coordinator();
    job.start_worker(0);
    job.start_worker(1);
    job.wait_coordinator_success(JOB_LIMIT);
    for status in job.wait_workers(Duration::from_secs(30)) {
        assert!(
            status.success(),
            "a worker failed: {status}\n{}",
            job.logs()
        );
    }

    let log = job.coordinator_log();
    let groups = groups_formed(&log[log_before_restart..]);
    let first = groups
        .first()
        .unwrap_or_else(|| panic!("no group formed after the restart\n{}", job.logs()));
    assert_eq!(
        (first.2, first.3),
        (state["epoch"].as_u64().unwrap(), resume_batch),
        "the restarted job resumed at step {complete_step}'s position: {groups:?}"
    );
    assert!(
        !partial.join("COMPLETE").exists(),
        "the partial checkpoint became complete"
    );
    assert_eq!(
        groups.len(),
        1,
        "the restarted job ran without another regroup (a failed resume regroups): {groups:?}"
    );
    let final_state = job.state();
    assert_eq!(final_state["finished"], true, "{final_state}");
    assert!(final_state["last_checkpoint"]["step"].as_u64().unwrap() < partial_step);
    for epoch in 0..spec.epochs {
        job.assert_ledger_exact(epoch, 1, global_batch(&spec));
    }
    assert_metrics_cover_every_step(&job, total_steps, false);
    assert!(run.join("exports/model.safetensors").is_file());
}

#[test]
fn a_trainer_that_cannot_start_fails_the_job_after_max_start_failures_with_the_reason() {
    let _serial = one_job_at_a_time();
    let spec = JobSpec::default();
    let mut job = Job::new(&spec);
    let config_path = job.path().join("job.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let model_line = config
        .lines()
        .find(|line| line.starts_with("path = "))
        .unwrap()
        .to_string();
    std::fs::write(
        &config_path,
        config.replace(&model_line, "path = \"/nonexistent/arbor-model\""),
    )
    .unwrap();
    job.start_coordinator();
    job.start_worker(0);
    job.start_worker(1);
    let exit = job.wait_coordinator(Duration::from_secs(120));
    let logs = job.logs();
    assert!(
        !exit.success(),
        "the coordinator must end the job as failed: {exit}\n{logs}"
    );
    let failure = job.state()["failure"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        failure.contains("cannot train this job (3 start failures")
            && failure.contains("the trainer did not start")
            && failure.contains("/nonexistent/arbor-model"),
        "{failure}\n{logs}"
    );
    let regroups = job.state()["regroups"].as_u64().unwrap_or(u64::MAX);
    assert!(
        regroups <= 2,
        "at most max_start_failures - 1 regroups, not a loop: {regroups}\n{logs}"
    );
}
