//! LoRA mode against its references: a new network leaves the model unchanged; the exported
//! kohya file loads in diffusers (`load_lora_weights`) and there changes the UNet and the text
//! encoder exactly as arbor's LoRA-augmented forward does, and so does a hand-written Python
//! merge of kohya's math (worker/tests/fixtures/check_lora.py); `arbor-worker merge-lora` writes
//! a single file that diffusers' `from_single_file` loads to the same outputs. Also the training
//! options that come with it: min-SNR-γ weights against diffusers' formula, and offset noise.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use arbor_common::config::{JobConfig, LoraTarget, SavePrecision};
use arbor_testkit::python_bin;
use arbor_worker::lora::kohya_file::{read_kohya_file, write_kohya_file};
use arbor_worker::train::training_model::TrainingModel;
use tch::{Device, Kind, Tensor};

use crate::e2e_support::worker_bin;
use crate::model_fixtures::{
    fixture_script, fixtures_dir, get, inputs, max_abs_diff, read_tensors, FORWARD_ATOL,
};

fn lora_config(targets: &str, train_text_encoder: bool, extra: &str) -> JobConfig {
    let model = fixtures_dir().join("model");
    let text = format!(
        r#"
[job]
name = "lora-test"
run_dir = "/nonexistent/run"
seed = 5

[data]
manifest = "/nonexistent/manifest.jsonl"

[model]
path = "{model}"
mode = "lora"
train_text_encoder = {train_text_encoder}

[train]
mixed_precision = "fp32"
{extra}

[lora]
rank = 4
alpha = 2.0
conv_rank = 2
conv_alpha = 3.0
targets = [{targets}]
save_precision = "fp32"
"#,
        model = model.display(),
    );
    JobConfig::load(&text, &[]).expect("the test config is valid")
}

const ALL_TARGETS: &str = r#""attention", "feed_forward", "projections", "resnet_conv""#;

/// The UNet output and CLIP's penultimate-layer states (final layer norm applied) on the fixture
/// inputs.
fn outputs(model: &TrainingModel) -> (Tensor, Tensor) {
    let inputs = inputs();
    tch::no_grad(|| {
        let unet = model
            .unet
            .try_forward(
                get(&inputs, "unet.sample"),
                get(&inputs, "unet.timesteps"),
                get(&inputs, "unet.encoder_hidden_states"),
                None,
            )
            .unwrap();
        let clip = model
            .text_encoder
            .encode(get(&inputs, "clip.input_ids"), 2)
            .unwrap();
        (unet, clip)
    })
}

/// Gives every LoRA weight (up included, which starts at zero) a random value.
fn randomise_lora(model: &TrainingModel, seed: i64) {
    tch::manual_seed(seed);
    let mut variables: Vec<(String, Tensor)> = model
        .lora
        .as_ref()
        .unwrap()
        .var_store()
        .variables()
        .into_iter()
        .collect();
    variables.sort_by(|left, right| left.0.cmp(&right.0));
    tch::no_grad(|| {
        for (_, mut variable) in variables {
            let value = variable.randn_like() * 0.1;
            variable.copy_(&value);
        }
    });
}

fn run_python(script: &str, args: &[&str]) -> String {
    let output = Command::new(python_bin())
        .arg(fixture_script(script))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("running the fixture script");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{script} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `arbor-worker merge-lora` of `lora` into the fixture model, written to `out`.
fn merge_lora(lora: &Path, out: &Path) -> std::process::Output {
    Command::new(worker_bin())
        .args(["merge-lora", "--model"])
        .arg(fixtures_dir().join("model"))
        .arg("--lora")
        .arg(lora)
        .arg("--out")
        .arg(out)
        .output()
        .expect("running arbor-worker merge-lora")
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

#[test]
fn a_new_network_leaves_the_model_unchanged_and_adapts_only_its_targets() {
    let plain = TrainingModel::load(&lora_config(r#""attention""#, false, ""), Device::Cpu)
        .expect("lora model");
    let lora = plain.lora.as_ref().unwrap();
    // The tiny UNet has 11 transformers of one block each: 2 attention layers × 4 projections.
    assert_eq!(lora.modules().len(), 11 * 2 * 4);
    assert!(lora.modules().iter().all(|module| {
        module.name.starts_with("lora_unet_")
            && ["to_q", "to_k", "to_v", "to_out_0"]
                .iter()
                .any(|suffix| module.name.ends_with(suffix))
    }));
    // Only the network trains; up starts at zero, so the model computes what the base does.
    let trainable = plain.trainable();
    assert_eq!(trainable.len(), lora.modules().len() * 2);
    assert!(trainable.iter().all(|(name, _)| name.starts_with("lora.")));
    let (unet, clip) = outputs(&plain);
    let goldens = crate::model_fixtures::goldens();
    assert!(max_abs_diff(&unet, get(&goldens, "unet.out"), "unet.out") <= FORWARD_ATOL);

    let every = TrainingModel::load(&lora_config(ALL_TARGETS, true, ""), Device::Cpu).unwrap();
    let modules = every.lora.as_ref().unwrap().modules();
    let count = |prefix: &str| {
        modules
            .iter()
            .filter(|m| m.name.starts_with(prefix))
            .count()
    };
    // 3 CLIP layers × 6 layers each.
    assert_eq!(count("lora_te_text_model_encoder_layers_"), 3 * 6);
    let conv: Vec<_> = modules
        .iter()
        .filter(|module| module.name.contains("resnets") || module.name.contains("samplers"))
        .collect();
    // 2 convs in each of the 17 resnets (6 down, 2 mid, 9 up), 2 downsamplers, 2 upsamplers.
    assert_eq!(conv.len(), 17 * 2 + 4);
    assert!(conv
        .iter()
        .all(|module| module.rank == 2 && module.alpha == 3.0));
    let proj_in = modules
        .iter()
        .find(|module| module.name == "lora_unet_down_blocks_0_attentions_0_proj_in")
        .expect("proj_in is adapted");
    assert_eq!((proj_in.rank, proj_in.alpha), (4, 2.0));
    let (unet_every, clip_every) = outputs(&every);
    assert_eq!(max_abs_diff(&unet_every, &unet, "unet"), 0.0);
    assert_eq!(max_abs_diff(&clip_every, &clip, "clip"), 0.0);
}

#[test]
fn the_kohya_export_loads_in_diffusers_and_changes_the_model_as_arbor_does() {
    let work = tempfile::tempdir().unwrap();
    let model = TrainingModel::load(&lora_config(ALL_TARGETS, true, ""), Device::Cpu).unwrap();
    let (base_unet, base_clip) = outputs(&model);
    randomise_lora(&model, 11);
    let (unet, clip) = outputs(&model);
    assert!(max_abs_diff(&unet, &base_unet, "unet") > 1e-2);
    assert!(max_abs_diff(&clip, &base_clip, "clip") > 1e-2);

    let lora = model.lora.as_ref().unwrap();
    let file = work.path().join("lora.safetensors");
    let metadata = HashMap::from([("ss_network_module".to_string(), "networks.lora".to_string())]);
    write_kohya_file(
        &file,
        &lora.kohya_tensors(None),
        SavePrecision::Fp32,
        metadata,
    )
    .unwrap();
    let (modules, read_metadata) = read_kohya_file(&file).unwrap();
    assert_eq!(modules.len(), lora.modules().len());
    assert_eq!(read_metadata["ss_network_module"], "networks.lora");

    let out = work.path().join("outputs.safetensors");
    let fixture_inputs = fixtures_dir().join("inputs.safetensors");
    let report = run_python(
        "check_lora.py",
        &[
            "check",
            "--model",
            &path_arg(&fixtures_dir().join("model")),
            "--lora",
            &path_arg(&file),
            "--inputs",
            &path_arg(&fixture_inputs),
            "--out",
            &path_arg(&out),
        ],
    );
    eprintln!("check_lora: {report}");
    let python = read_tensors(&out).unwrap();
    for (name, arbor, base) in [
        ("unet.out", &unet, &base_unet),
        ("clip.penultimate_ln", &clip, &base_clip),
    ] {
        assert!(max_abs_diff(get(&python, &format!("base.{name}")), base, name) <= FORWARD_ATOL);
        for source in ["diffusers", "reference"] {
            let key = format!("{source}.{name}");
            let error = max_abs_diff(get(&python, &key), arbor, &key);
            eprintln!("{key}: max abs error {error:.3e}");
            assert!(error <= FORWARD_ATOL, "{key}: {error:e}");
        }
    }

    // merge-lora: a single file that diffusers loads to the LoRA-augmented outputs.
    let merged = work.path().join("merged.safetensors");
    let output = merge_lora(&file, &merged);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let merged_out = work.path().join("merged_outputs.safetensors");
    run_python(
        "make_fixtures.py",
        &[
            "from-single-file",
            "--ldm",
            &path_arg(&merged),
            "--config",
            &path_arg(&fixtures_dir().join("model")),
            "--inputs",
            &path_arg(&fixture_inputs),
            "--out",
            &path_arg(&merged_out),
        ],
    );
    let loaded = read_tensors(&merged_out).unwrap();
    for (key, arbor) in [("unet.out", &unet), ("clip.penultimate_ln", &clip)] {
        let error = max_abs_diff(get(&loaded, key), arbor, key);
        eprintln!("merged {key}: max abs error {error:.3e}");
        assert!(error <= FORWARD_ATOL, "merged {key}: {error:e}");
    }
}

#[test]
fn merge_lora_refuses_a_lora_for_another_model_naming_the_module() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("foreign.safetensors");
    let tensors = vec![
        (
            "lora_unet_input_blocks_9_1_proj_in.lora_down.weight".to_string(),
            Tensor::zeros([2, 8], (Kind::Float, Device::Cpu)),
        ),
        (
            "lora_unet_input_blocks_9_1_proj_in.lora_up.weight".to_string(),
            Tensor::zeros([8, 2], (Kind::Float, Device::Cpu)),
        ),
    ];
    write_kohya_file(&file, &tensors, SavePrecision::Fp16, HashMap::new()).unwrap();
    let merged = work.path().join("merged.safetensors");
    let output = merge_lora(&file, &merged);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("lora_unet_input_blocks_9_1_proj_in"),
        "{stderr}"
    );
    assert!(!merged.exists(), "nothing is written");

    // A key that is not a LoRA weight is named too.
    let odd = work.path().join("odd.safetensors");
    let tensors = vec![(
        "lora_unet_x.hada_w1_a".to_string(),
        Tensor::zeros([2, 2], (Kind::Float, Device::Cpu)),
    )];
    write_kohya_file(&odd, &tensors, SavePrecision::Fp16, HashMap::new()).unwrap();
    let error = read_kohya_file(&odd).unwrap_err().to_string();
    assert!(error.contains("lora_unet_x.hada_w1_a"), "{error}");
}

#[test]
fn lora_targets_and_settings_are_validated_naming_the_field() {
    let config = lora_config(r#""attention""#, false, "");
    assert_eq!(config.lora.targets, [LoraTarget::Attention]);
    let model = fixtures_dir().join("model");
    for (setting, field) in [
        ("[lora]\nrank = 0", "lora.rank"),
        ("[lora]\ntargets = []", "lora.targets"),
        ("[lora]\ntargets = [\"everything\"]", "lora.targets"),
        ("[lora]\ndropout = 1.5", "lora.dropout"),
        ("[lora]\nalpha = -1.0", "lora.alpha"),
        ("[lora]\nsave_precision = \"fp8\"", "lora.save_precision"),
        ("[train]\nmin_snr_gamma = 0.0", "train.min_snr_gamma"),
        ("[train]\nnoise_offset = -0.1", "train.noise_offset"),
        (
            "[data]\nmanifest = \"m\"\ncaption_dropout = 2.0",
            "data.caption_dropout",
        ),
    ] {
        let data = if setting.starts_with("[data]") {
            String::new()
        } else {
            "[data]\nmanifest = \"m\"\n".to_string()
        };
        let text = format!(
            "[job]\nrun_dir = \"r\"\n{data}[model]\npath = \"{}\"\nmode = \"lora\"\n{setting}\n",
            model.display()
        );
        let error = JobConfig::load(&text, &[]).unwrap_err().to_string();
        assert!(error.contains(field), "{setting}: {error}");
    }
}

#[test]
fn min_snr_weights_match_the_formula_of_diffusers_training_scripts() {
    let timesteps = Tensor::from_slice(&[0i64, 1, 10, 100, 250, 500, 750, 999]);
    let script = r#"
import json, sys
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          num_train_timesteps=1000)
timesteps = torch.tensor(json.loads(sys.argv[1]))
gamma = float(sys.argv[2])
snr = compute_snr(scheduler, timesteps)
clamped = torch.stack([snr, gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
print(json.dumps({"epsilon": (clamped / snr).tolist(), "v_prediction": (clamped / (snr + 1)).tolist()}))
"#;
    let output = Command::new(python_bin())
        .args(["-c", script, "[0, 1, 10, 100, 250, 500, 750, 999]", "5.0"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let expected: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    for (prediction, key) in [("epsilon", "epsilon"), ("v_prediction", "v_prediction")] {
        let mut config = arbor_worker::ddpm::SchedulerConfig::sd1();
        config.prediction_type = prediction.parse().unwrap();
        let schedule = arbor_worker::ddpm::DdpmSchedule::new(&config);
        let weights = schedule.min_snr_weights(&timesteps, 5.0);
        let weights: Vec<f64> = Vec::<f32>::try_from(&weights)
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect();
        let expected: Vec<f64> = expected[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|value| value.as_f64().unwrap())
            .collect();
        for (index, (ours, theirs)) in weights.iter().zip(&expected).enumerate() {
            assert!(
                (ours - theirs).abs() <= 1e-5 * theirs.abs().max(1.0),
                "{prediction} t={}: {ours} vs {theirs}",
                timesteps.int64_value(&[index as i64])
            );
        }
        // Low timesteps (high SNR) are down-weighted, high ones are not (epsilon).
        if prediction == "epsilon" {
            assert!(weights[0] < 0.01 && (weights[7] - 1.0).abs() < 1e-6);
        }
    }
}

#[test]
fn offset_noise_adds_one_draw_per_sample_and_channel() {
    let model = TrainingModel::load(
        &lora_config(r#""attention""#, false, "noise_offset = 0.5"),
        Device::Cpu,
    )
    .unwrap();
    tch::manual_seed(3);
    let latents = Tensor::zeros([64, 4, 16, 16], (Kind::Float, Device::Cpu));
    let noise = model.training_noise(&latents);
    // Per (sample, channel) means: variance 0.5² + 1/256 with the offset, 1/256 without.
    let means = noise.mean_dim([2, 3].as_slice(), false, Kind::Float);
    let variance = means.var(true).double_value(&[]);
    assert!((variance - 0.254).abs() < 0.06, "variance {variance}");
    let plain = TrainingModel::load(&lora_config(r#""attention""#, false, ""), Device::Cpu)
        .unwrap()
        .training_noise(&latents)
        .mean_dim([2, 3].as_slice(), false, Kind::Float)
        .var(true)
        .double_value(&[]);
    assert!(plain < 0.01, "variance without offset {plain}");
}
