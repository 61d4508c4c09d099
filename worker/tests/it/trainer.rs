//! The trainer of `arbor-worker train` in one process (world size 1, no coordinator): the
//! runtime's calls (start, train_batch, checkpoint, finish) made directly on a tiny SD-topology
//! model (worker/tests/fixtures/make_fixtures.py) and a few generated images.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use arbor_common::buckets::Bucket;
use arbor_common::config::{JobConfig, LoraTarget};
use arbor_common::sampler::BatchBucket;
use arbor_runtime::trainer::{Batch, BatchItem, GroupInfo, Trainer, ValidationItem};
use arbor_worker::hypernetwork::pt_reader::read_pt;
use arbor_worker::lora::kohya_file::read_kohya_file;
use arbor_worker::train::checkpoint::{checkpoint_key, mark_complete_without_coordinator};
use arbor_worker::train::metrics_log::StepMetrics;
use arbor_worker::train::run_dir::RunDir;
use arbor_worker::train::trainer::{TchTrainer, TrainerOptions};
use tch::Tensor;

const CAPTIONS: [&str; 4] = [
    "1girl, red dress, smile",
    "landscape, mountains, sky, clouds",
    "cat, sitting, window",
    "1boy, blue shirt, outdoors",
];

struct Fixture {
    _temp: tempfile::TempDir,
    dataset: PathBuf,
    run_dir: PathBuf,
}

/// Four small images of varied aspect ratios, one zero-byte "image", and a manifest.
fn fixture() -> Fixture {
    let temp = tempfile::tempdir().unwrap();
    let dataset = temp.path().join("data");
    std::fs::create_dir_all(&dataset).unwrap();
    let sizes = [(40u32, 32u32), (32, 48), (48, 40), (32, 32)];
    let mut manifest = String::new();
    for (index, (width, height)) in sizes.iter().enumerate() {
        let image = image::RgbImage::from_fn(*width, *height, |x, y| {
            image::Rgb([
                (x * 255 / width) as u8,
                (y * 255 / height) as u8,
                (index * 60) as u8,
            ])
        });
        let key = format!("img{index}.png");
        image.save(dataset.join(&key)).unwrap();
        manifest.push_str(
            &serde_json::json!({"id": index as u64 + 1, "key": key, "width": width, "height": height, "caption": CAPTIONS[index]})
                .to_string(),
        );
        manifest.push('\n');
    }
    std::fs::write(dataset.join("broken.png"), b"").unwrap();
    std::fs::write(dataset.join("manifest.jsonl"), manifest).unwrap();
    let run_dir = temp.path().join("run");
    Fixture {
        _temp: temp,
        dataset,
        run_dir,
    }
}

fn config(fixture: &Fixture, mode: &str, extra: &str) -> JobConfig {
    let model = crate::model_fixtures::fixtures_dir().join("model");
    let text = format!(
        r#"
[job]
name = "trainer-test"
run_dir = "{run_dir}"
seed = 7

[data]
manifest = "{manifest}"

[buckets]
max_area = 4096
min_dim = 32
max_dim = 64
step = 32
base_res = [32, 32]

[schedule]
bsz = 2
max_steps = 100

[model]
path = "{model}"
mode = "{mode}"

[train]
lr = "1e-3"
mixed_precision = "fp32"
{extra}

[hypernetwork]
sizes = [48, 32, 64]

[samples]
every = 2
prompts = ["1girl, red dress", "cat"]
negative = "lowres"
steps = 2
guidance = 5.0
"#,
        run_dir = fixture.run_dir.display(),
        manifest = fixture.dataset.join("manifest.jsonl").display(),
        model = model.display(),
    );
    JobConfig::load(&text, &[]).expect("the test config is valid")
}

fn solo(resume_checkpoint: &str, resume_step: u64) -> GroupInfo {
    GroupInfo {
        rank: 0,
        world_size: 1,
        generation: 1,
        store_address: String::new(),
        store_prefix: String::new(),
        resume_checkpoint: resume_checkpoint.to_string(),
        resume_step,
    }
}

fn item(id: u64, key: &str) -> BatchItem {
    BatchItem {
        id,
        key: key.to_string(),
        caption: CAPTIONS
            .get(id as usize - 1)
            .copied()
            .unwrap_or("broken")
            .to_string(),
        width: 32,
        height: 32,
    }
}

fn batch(index: u64, ids: [u64; 2]) -> Batch {
    Batch {
        epoch: 0,
        index,
        bucket: BatchBucket::CatchAll,
        resolution: Bucket {
            width: 32,
            height: 32,
        },
        items: ids
            .iter()
            .map(|id| item(*id, &format!("img{}.png", id - 1)))
            .collect(),
        epoch_batches: BATCHES.len() as u64,
    }
}

fn trainer() -> TchTrainer {
    TchTrainer::new(TrainerOptions {
        device: tch::Device::Cpu,
        data_root: None,
        collective_timeout: None,
    })
}

/// Detached copies of a VarStore's variables by name.
fn snapshot(store: &tch::nn::VarStore) -> HashMap<String, Tensor> {
    store
        .variables()
        .into_iter()
        .map(|(name, tensor)| (name, tensor.detach().copy()))
        .collect()
}

fn trainable_snapshot(trainer: &TchTrainer) -> HashMap<String, Tensor> {
    trainer
        .trainable()
        .unwrap()
        .iter()
        .map(|(name, tensor)| (name.clone(), tensor.detach().copy()))
        .collect()
}

fn max_change(before: &HashMap<String, Tensor>, after: &HashMap<String, Tensor>) -> f64 {
    before
        .iter()
        .map(|(name, tensor)| (tensor - &after[name]).abs().max().double_value(&[]))
        .fold(0.0, f64::max)
}

fn read_metrics(run_dir: &Path) -> Vec<StepMetrics> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect()
}

fn assert_png(path: &Path) {
    let image = image::open(path).unwrap_or_else(|error| panic!("{path:?}: {error}"));
    assert!(image.width() > 0 && image.height() > 0, "{path:?} is empty");
}

const BATCHES: [[u64; 2]; 3] = [[1, 2], [3, 4], [2, 3]];

/// libtorch's CPU generator is process-global and the trainer seeds it per step: tests that
/// train run one at a time so that no other test draws from it in between.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[test]
fn hypernetwork_mode_trains_only_the_hypernetwork_and_exports_it() {
    let _serial = serial();
    let fixture = fixture();
    let config = config(&fixture, "hypernetwork", "");
    let mut trainer = trainer();
    trainer.start(&solo("", 0), &config).unwrap();
    let model = trainer.model().unwrap();
    let unet_before = snapshot(&model.unet_store);
    let clip_before = snapshot(&model.text_encoder_store);
    let vae_before = snapshot(&model.vae_store);
    let trainable_before = trainable_snapshot(&trainer);
    assert!(trainable_before
        .keys()
        .all(|name| name.starts_with("hypernetwork.")));
    for (index, ids) in BATCHES.iter().enumerate() {
        let outcome = trainer.train_batch(&batch(index as u64, *ids)).unwrap();
        // The first steps' losses are read back with their batch.
        assert!(
            outcome.loss.is_some_and(f64::is_finite),
            "loss {:?}",
            outcome.loss
        );
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        // What the runtime reports to the coordinator: the rate and the batch's two prompts.
        assert!(
            outcome.learning_rate.is_some_and(|lr| lr > 0.0),
            "{outcome:?}"
        );
        assert_eq!(outcome.token_length_counts, [2, 0, 0, 0], "{outcome:?}");
        if index == 0 {
            // `arbor checkpoint --export` after the first step: exports/step-1/.
            trainer.export(1).unwrap();
        }
    }
    assert_eq!(trainer.step(), 3);
    let model = trainer.model().unwrap();
    assert_eq!(max_change(&unet_before, &snapshot(&model.unet_store)), 0.0);
    assert_eq!(
        max_change(&clip_before, &snapshot(&model.text_encoder_store)),
        0.0
    );
    assert_eq!(max_change(&vae_before, &snapshot(&model.vae_store)), 0.0);
    assert!(max_change(&trainable_before, &trainable_snapshot(&trainer)) > 0.0);
    trainer.finish().unwrap();

    let metrics = read_metrics(&fixture.run_dir);
    assert_eq!(
        metrics.iter().map(|record| record.step).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(metrics
        .iter()
        .all(|record| record.loss.is_finite() && record.lr > 0.0));
    assert!(metrics.iter().all(|record| record.bucket == "32x32"));
    assert_eq!(metrics[0].token_length_histogram.total(), 2);
    assert_png(&fixture.run_dir.join("samples/step-2.png"));
    assert_png(&fixture.run_dir.join("samples/step-3.png"));
    assert_png(&fixture.run_dir.join("loss.png"));
    let pt = read_pt(&fixture.run_dir.join("exports/hypernetwork.pt")).unwrap();
    assert_eq!(pt.modules.keys().copied().collect::<Vec<_>>(), [32, 48, 64]);
    assert_eq!(pt.step, 3);
    let early = read_pt(&fixture.run_dir.join("exports/step-1/hypernetwork.pt")).unwrap();
    assert_eq!(
        early.step, 1,
        "the export on request holds the weights of its step"
    );
    for folder in ["exports/step-1", "exports"] {
        let listed: Vec<String> = std::fs::read_dir(fixture.run_dir.join(folder))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with("step-"))
            .collect();
        assert_eq!(listed, ["hypernetwork.pt"], "{folder} holds only the .pt");
    }
}

#[test]
fn finetune_mode_trains_the_unet_and_exports_single_file_and_diffusers() {
    let _serial = serial();
    let fixture = fixture();
    let config = config(&fixture, "finetune", "");
    let mut trainer = trainer();
    trainer.start(&solo("", 0), &config).unwrap();
    let model = trainer.model().unwrap();
    let unet_before = snapshot(&model.unet_store);
    let clip_before = snapshot(&model.text_encoder_store);
    let vae_before = snapshot(&model.vae_store);
    assert!(trainer
        .trainable()
        .unwrap()
        .iter()
        .all(|(name, _)| name.starts_with("unet.")));
    for (index, ids) in BATCHES.iter().take(2).enumerate() {
        let outcome = trainer.train_batch(&batch(index as u64, *ids)).unwrap();
        assert!(outcome.loss.is_some_and(f64::is_finite));
    }
    let model = trainer.model().unwrap();
    assert!(max_change(&unet_before, &snapshot(&model.unet_store)) > 0.0);
    assert_eq!(
        max_change(&clip_before, &snapshot(&model.text_encoder_store)),
        0.0
    );
    assert_eq!(max_change(&vae_before, &snapshot(&model.vae_store)), 0.0);
    trainer.finish().unwrap();
    assert_eq!(read_metrics(&fixture.run_dir).len(), 2);
    let single_file = fixture.run_dir.join("exports/model.safetensors");
    let tensors = Tensor::read_safetensors(&single_file).unwrap();
    assert!(tensors
        .iter()
        .any(|(name, _)| name.starts_with("model.diffusion_model.")));
    assert!(tensors
        .iter()
        .any(|(name, _)| name.starts_with("cond_stage_model.transformer.text_model.")));
    // The exported UNet is the trained one.
    let diffusers_unet = fixture
        .run_dir
        .join("exports/diffusers/unet/diffusion_pytorch_model.safetensors");
    let exported: HashMap<String, Tensor> = Tensor::read_safetensors(&diffusers_unet)
        .unwrap()
        .into_iter()
        .collect();
    let trained = snapshot(&trainer.model().unwrap().unet_store);
    assert_eq!(exported.len(), trained.len());
    assert_eq!(max_change(&trained, &exported), 0.0);
    assert!(fixture
        .run_dir
        .join("exports/diffusers/unet/config.json")
        .is_file());
}

#[test]
fn lora_mode_trains_only_the_lora_resumes_exactly_and_exports_a_kohya_file() {
    let _serial = serial();
    let fixture = fixture();
    let mut config = config(&fixture, "lora", "ema_decay = 0.9\nmin_snr_gamma = 5.0");
    config.model.train_text_encoder = true;
    config.lora.rank = 4;
    config.lora.targets = vec![LoraTarget::Attention, LoraTarget::ResnetConv];
    let mut trainer = trainer();
    trainer.start(&solo("", 0), &config).unwrap();
    let model = trainer.model().unwrap();
    let unet_before = snapshot(&model.unet_store);
    let clip_before = snapshot(&model.text_encoder_store);
    let trainable_names: Vec<String> = trainer
        .trainable()
        .unwrap()
        .iter()
        .map(|(name, _)| name.clone())
        .collect();
    assert!(trainable_names.iter().all(|name| name.starts_with("lora.")));
    assert!(trainable_names
        .iter()
        .any(|name| name.starts_with("lora.lora_te_text_model_encoder_layers_0_mlp_fc1.")));
    trainer.train_batch(&batch(0, BATCHES[0])).unwrap();
    trainer.export(1).unwrap();
    trainer.train_batch(&batch(1, BATCHES[1])).unwrap();
    trainer.checkpoint(2, 0, 2).unwrap();
    let at_checkpoint = trainable_snapshot(&trainer);
    trainer.train_batch(&batch(2, BATCHES[2])).unwrap();
    let after_three = trainable_snapshot(&trainer);
    let model = trainer.model().unwrap();
    assert_eq!(max_change(&unet_before, &snapshot(&model.unet_store)), 0.0);
    assert_eq!(
        max_change(&clip_before, &snapshot(&model.text_encoder_store)),
        0.0
    );
    assert!(max_change(&at_checkpoint, &after_three) > 0.0);

    // A restarted process resumes to the checkpoint's LoRA and optimizer state exactly.
    let key = checkpoint_key(2);
    let run_dir = RunDir::open(fixture.run_dir.to_str().unwrap()).unwrap();
    mark_complete_without_coordinator(&run_dir, &key).unwrap();
    let mut restarted = self::trainer();
    restarted.start(&solo(&key, 2), &config).unwrap();
    assert_eq!(
        max_change(&at_checkpoint, &trainable_snapshot(&restarted)),
        0.0
    );
    restarted.train_batch(&batch(2, BATCHES[2])).unwrap();
    assert!(max_change(&after_three, &trainable_snapshot(&restarted)) < 1e-6);
    restarted.finish().unwrap();
    assert_png(&fixture.run_dir.join("samples/step-2.png"));

    // The export: only lora.safetensors, kohya's layout and metadata, the EMA weights.
    for folder in ["exports/step-1", "exports"] {
        let listed: Vec<String> = std::fs::read_dir(fixture.run_dir.join(folder))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.starts_with("step-"))
            .collect();
        assert_eq!(listed, ["lora.safetensors"], "{folder}");
    }
    let (modules, metadata) =
        read_kohya_file(&fixture.run_dir.join("exports/lora.safetensors")).unwrap();
    assert_eq!(modules.len() * 2, trainable_names.len());
    assert!(modules
        .iter()
        .all(|module| module.down.kind() == tch::Kind::Half));
    for (key, value) in [
        ("ss_network_module", "networks.lora"),
        ("ss_network_dim", "4"),
        ("ss_network_alpha", "4"),
        ("ss_base_model_version", "sd_v1"),
        ("ss_steps", "3"),
        ("ss_epoch", "1"),
        ("ss_resolution", "(32, 32)"),
        ("ss_min_snr_gamma", "5"),
        ("modelspec.architecture", "stable-diffusion-v1/lora"),
    ] {
        assert_eq!(metadata.get(key).map(String::as_str), Some(value), "{key}");
    }
    let network_args: serde_json::Value =
        serde_json::from_str(&metadata["ss_network_args"]).unwrap();
    assert_eq!(network_args["conv_dim"], "4");
    let tags: serde_json::Value = serde_json::from_str(&metadata["ss_tag_frequency"]).unwrap();
    assert_eq!(tags["trainer-test"]["1girl"], 1);
    let (early, early_metadata) =
        read_kohya_file(&fixture.run_dir.join("exports/step-1/lora.safetensors")).unwrap();
    assert_eq!(early_metadata["ss_steps"], "1");
    assert_eq!(early.len(), modules.len());
    // With EMA on, the export is the shadow, not the live weights.
    let live = trainable_snapshot(&restarted);
    let module = &modules[0];
    let live_up = &live[&format!("lora.{}.lora_up.weight", module.name)];
    let exported_up = module.up.to_kind(tch::Kind::Float);
    assert!(
        (live_up - &exported_up).abs().max().double_value(&[]) > 1e-4,
        "the export holds the live weights, not the EMA shadow"
    );
}

fn validation_item(id: u64, key: &str) -> ValidationItem {
    ValidationItem {
        item: item(id, key),
        resolution: Bucket {
            width: 32,
            height: 32,
        },
    }
}

/// The validation losses a trainer reports over `BATCHES`, with `lr`.
fn validation_losses(fixture: &Fixture, lr: &str) -> Vec<(f64, u64)> {
    let mut config = config(fixture, "lora", "");
    config.train.lr = lr.to_string();
    config.data.validation_fraction = 0.5;
    config.samples.validation_every = 1;
    config.samples.every = 0;
    let mut trainer = trainer();
    trainer.start(&solo("", 0), &config).unwrap();
    // Two items measured, one that fails to load and is left out.
    trainer.validation_items(&[
        validation_item(3, "img2.png"),
        validation_item(4, "img3.png"),
        validation_item(9, "broken.png"),
    ]);
    let losses = BATCHES
        .iter()
        .enumerate()
        .map(|(index, ids)| {
            let outcome = trainer.train_batch(&batch(index as u64, *ids)).unwrap();
            outcome.validation.expect("validation every step")
        })
        .collect();
    trainer.finish().unwrap();
    losses
}

#[test]
fn the_validation_loss_uses_fixed_draws_and_is_logged() {
    let _serial = serial();
    let fixture = fixture();
    // A rate too small to move any output (the LoRA's up weights stay below fp32 rounding of
    // the UNet's outputs): every measurement must draw the same crops, noise and timesteps.
    let frozen = validation_losses(&fixture, "1e-30");
    assert_eq!(
        frozen.iter().map(|(_, step)| *step).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(frozen[0].0.is_finite() && frozen[0].0 > 0.0);
    assert!(
        frozen.iter().all(|(loss, _)| *loss == frozen[0].0),
        "{frozen:?}"
    );
    let records = read_metrics(&fixture.run_dir);
    assert!(records
        .iter()
        .all(|record| record.validation_loss == Some(frozen[0].0)));
    assert_png(&fixture.run_dir.join("loss.png"));

    // Training moves it, from the first step on.
    let fixture = self::fixture();
    let trained = validation_losses(&fixture, "1e-2");
    assert!(
        trained
            .iter()
            .zip(&frozen)
            .all(|(trained, frozen)| trained.0 != frozen.0),
        "{trained:?} vs {frozen:?}"
    );
    assert!(trained[0].0 != trained[2].0, "{trained:?}");
}

#[test]
fn a_bad_image_is_reported_and_training_continues() {
    let _serial = serial();
    let fixture = fixture();
    let config = config(&fixture, "hypernetwork", "");
    let mut trainer = trainer();
    trainer.start(&solo("", 0), &config).unwrap();
    let mut broken = batch(0, [1, 2]);
    broken.items[1] = BatchItem {
        id: 99,
        key: "broken.png".to_string(),
        caption: "broken".to_string(),
        width: 32,
        height: 32,
    };
    let outcome = trainer.train_batch(&broken).unwrap();
    assert_eq!(outcome.failures.len(), 1);
    assert!(
        outcome.failures[0].starts_with("item 99 `broken.png`: "),
        "{:?}",
        outcome.failures
    );
    assert!(outcome.loss.is_some_and(f64::is_finite));
    let mut missing = batch(1, [3, 4]);
    missing.items[0].key = "does-not-exist.png".to_string();
    let outcome = trainer.train_batch(&missing).unwrap();
    assert_eq!(outcome.failures.len(), 1);
    assert!(
        outcome.failures[0].contains("`does-not-exist.png`"),
        "{:?}",
        outcome.failures
    );
    let outcome = trainer.train_batch(&batch(2, [3, 4])).unwrap();
    assert!(outcome.failures.is_empty());
    assert_eq!(trainer.step(), 3);
    trainer.finish().unwrap();
    let failed: Vec<u32> = read_metrics(&fixture.run_dir)
        .iter()
        .map(|record| record.failed_items)
        .collect();
    assert_eq!(failed, [1, 1, 0]);
}

#[test]
fn resume_from_a_checkpoint_restores_the_exact_state() {
    let _serial = serial();
    let fixture = fixture();
    let config = config(&fixture, "hypernetwork", "ema_decay = 0.9");
    let mut trainer = trainer();
    trainer.start(&solo("", 0), &config).unwrap();
    let initial = trainable_snapshot(&trainer);
    trainer.train_batch(&batch(0, BATCHES[0])).unwrap();
    trainer.train_batch(&batch(1, BATCHES[1])).unwrap();
    trainer.checkpoint(2, 0, 2).unwrap();
    let at_checkpoint = trainable_snapshot(&trainer);
    trainer.train_batch(&batch(2, BATCHES[2])).unwrap();
    let after_three = trainable_snapshot(&trainer);
    assert!(max_change(&at_checkpoint, &after_three) > 0.0);

    // A partial checkpoint (no COMPLETE) is refused.
    let key = checkpoint_key(2);
    let error = trainer.start(&solo(&key, 2), &config).unwrap_err();
    assert!(error.contains("COMPLETE"), "{error}");

    let run_dir = RunDir::open(fixture.run_dir.to_str().unwrap()).unwrap();
    mark_complete_without_coordinator(&run_dir, &key).unwrap();
    // A survivor rolls back in-process.
    trainer.start(&solo(&key, 2), &config).unwrap();
    assert_eq!(trainer.step(), 2);
    assert_eq!(
        max_change(&at_checkpoint, &trainable_snapshot(&trainer)),
        0.0
    );
    // A restarted process resumes to the same state, and its next step matches the
    // uninterrupted run's (same optimizer state, same seeded noise).
    let mut restarted = self::trainer();
    restarted.start(&solo(&key, 2), &config).unwrap();
    assert_eq!(
        max_change(&at_checkpoint, &trainable_snapshot(&restarted)),
        0.0
    );
    restarted.train_batch(&batch(2, BATCHES[2])).unwrap();
    assert!(max_change(&after_three, &trainable_snapshot(&restarted)) < 1e-6);
    // The metrics of the rolled-back stretch are dropped on resume.
    restarted.finish().unwrap();
    let steps: Vec<u64> = read_metrics(&fixture.run_dir)
        .iter()
        .map(|record| record.step)
        .collect();
    assert_eq!(steps, [1, 2, 3]);

    // A start without a checkpoint resets to the initial weights.
    trainer.start(&solo("", 0), &config).unwrap();
    assert_eq!(trainer.step(), 0);
    assert_eq!(max_change(&initial, &trainable_snapshot(&trainer)), 0.0);

    // check_checkpoint reads what the next start resumes from; a truncated file makes the
    // checkpoint unusable, with the file named.
    let mut checked = self::trainer();
    checked.check_checkpoint(&config, &key).unwrap();
    checked.start(&solo(&key, 2), &config).unwrap();
    assert_eq!(
        max_change(&at_checkpoint, &trainable_snapshot(&checked)),
        0.0
    );
    let weights = fixture.run_dir.join(&key).join("weights.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let error = checked.check_checkpoint(&config, &key).unwrap_err();
    assert!(
        error.contains("weights.safetensors") && error.contains("truncated"),
        "{error}"
    );
}

#[test]
fn gradient_accumulation_steps_every_window_and_at_the_epoch_end() {
    let _serial = serial();
    let fixture = fixture();
    let mut config = config(&fixture, "hypernetwork", "");
    config.schedule.grad_accum = 2;
    let mut trainer = trainer();
    trainer.start(&solo("", 0), &config).unwrap();
    let before = trainable_snapshot(&trainer);
    // Three batches with grad_accum 2: the windows are [0, 1] and [2] (the epoch's last batch
    // closes its short window), so two optimizer steps and no gradient left pending.
    trainer.train_batch(&batch(0, BATCHES[0])).unwrap();
    assert_eq!(trainer.step(), 0);
    assert_eq!(
        max_change(&before, &trainable_snapshot(&trainer)),
        0.0,
        "the first micro-batch of a window must not step the optimizer"
    );
    trainer.train_batch(&batch(1, BATCHES[1])).unwrap();
    assert_eq!(trainer.step(), 1);
    let after_first_window = trainable_snapshot(&trainer);
    assert!(max_change(&before, &after_first_window) > 0.0);
    trainer.train_batch(&batch(2, BATCHES[2])).unwrap();
    assert_eq!(trainer.step(), 2);
    assert!(max_change(&after_first_window, &trainable_snapshot(&trainer)) > 0.0);
    trainer.finish().unwrap();
    let metrics = read_metrics(&fixture.run_dir);
    assert_eq!(
        metrics.iter().map(|record| record.step).collect::<Vec<_>>(),
        [1, 2]
    );
}

#[test]
fn the_prompt_layout_is_chosen_by_the_job_config() {
    let _serial = serial();
    let fixture = fixture();
    // 180 tokens ("red", "dress", "," sixty times): three 75-token chunks.
    let long_prompt = vec!["red dress"; 60].join(", ");
    let mut widths = Vec::new();
    for layout in ["chunked", "kohya"] {
        let mut config = config(&fixture, "hypernetwork", "");
        config.model.prompt_layout = layout.parse().unwrap();
        let mut trainer = trainer();
        trainer.start(&solo("", 0), &config).unwrap();
        let context = trainer
            .model()
            .unwrap()
            .encode_prompts(&[long_prompt.clone(), "cat".to_string()], None)
            .unwrap();
        widths.push(context.size()[1]);
    }
    // A1111/NovelAI: 77 states per chunk; kohya-ss: BOS + 75 per chunk + EOS.
    assert_eq!(widths, [3 * 77, 3 * 75 + 2]);
}

#[test]
fn tensorboard_logs_read_back_with_tensorboard_and_match_metrics_jsonl_across_a_resume() {
    let _serial = serial();
    let fixture = fixture();
    let config = config(&fixture, "hypernetwork", "");
    // Steps 1 to 3 (samples at step 2), flushed at a checkpoint at step 3 that never completes.
    let mut first = trainer();
    first.start(&solo("", 0), &config).unwrap();
    for (index, ids) in BATCHES.iter().enumerate() {
        first.train_batch(&batch(index as u64, *ids)).unwrap();
        if index == 1 {
            first.checkpoint(2, 0, 2).unwrap();
        }
    }
    first.checkpoint(3, 0, 3).unwrap();
    // Another process resumes from step 2 and trains step 3 again: TensorBoard must show the
    // second session's step 3 only.
    let key = checkpoint_key(2);
    let run_dir = RunDir::open(fixture.run_dir.to_str().unwrap()).unwrap();
    mark_complete_without_coordinator(&run_dir, &key).unwrap();
    let mut resumed = trainer();
    resumed.start(&solo(&key, 2), &config).unwrap();
    resumed.train_batch(&batch(2, BATCHES[2])).unwrap();
    resumed.finish().unwrap();

    let event_files = std::fs::read_dir(fixture.run_dir.join("tensorboard"))
        .unwrap()
        .count();
    assert_eq!(event_files, 2, "one event file per session");
    let metrics = read_metrics(&fixture.run_dir);
    assert_eq!(
        metrics.iter().map(|record| record.step).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let script = crate::model_fixtures::fixture_script("check_tensorboard.py");
    let output = std::process::Command::new(arbor_testkit::python_bin())
        .arg(&script)
        .arg(&fixture.run_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let checked: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(checked["steps"], serde_json::json!([1, 2, 3]));
    assert_eq!(checked["sample_steps"], serde_json::json!([2, 3]));
    assert_eq!(checked["files"], 2);
}
