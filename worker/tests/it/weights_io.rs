//! Weight I/O: a single-file LDM export that diffusers' `from_single_file` reproduces exactly,
//! single-file loading with and without the CLIP `text_model.` prefix, diffusers export, and
//! errors that name the tensor and both shapes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command as ProcessCommand;

use crate::model_fixtures::{
    assert_close, fixture_script, fixtures_dir, get, goldens, read_tensors,
};
use arbor_testkit::python_bin;
use assert_cmd::Command;
use tch::Tensor;

fn worker() -> Command {
    Command::cargo_bin("arbor-worker").expect("binary")
}

fn export_single_file(model: &Path, out: &Path) {
    let output = worker()
        .arg("export")
        .arg("--model")
        .arg(model)
        .arg("--single-file")
        .arg(out)
        .output()
        .expect("run export");
    assert!(
        output.status.success(),
        "export: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Inputs of the probe without the groups that need components 4a's probe does not load.
fn clip_and_unet_inputs(dir: &Path) -> PathBuf {
    let inputs = read_tensors(&fixtures_dir().join("inputs.safetensors")).expect("inputs");
    let kept: Vec<(String, Tensor)> = inputs
        .into_iter()
        .filter(|(name, _)| name.starts_with("clip.") || name.starts_with("unet."))
        .collect();
    let path = dir.join("clip_unet_inputs.safetensors");
    Tensor::write_safetensors(&kept, &path).expect("write inputs");
    path
}

fn probe(model: &Path, inputs: &Path, out: &Path, config: Option<&Path>) -> std::process::Output {
    let mut command = worker();
    command
        .arg("probe")
        .arg("--model")
        .arg(model)
        .arg("--inputs")
        .arg(inputs)
        .arg("--out")
        .arg(out);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command.output().expect("run probe")
}

fn assert_probe_matches_goldens(outputs: &HashMap<String, Tensor>, names: &[&str], label: &str) {
    let goldens = goldens();
    for name in names {
        assert_close(
            get(outputs, name),
            get(&goldens, name),
            &format!("{label}: {name}"),
        );
    }
}

#[test]
fn single_file_export_loads_in_diffusers_from_single_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let single = dir.path().join("model.safetensors");
    export_single_file(&fixtures_dir().join("model"), &single);
    let tensors = Tensor::read_safetensors(&single).unwrap();
    // LDM stores the VAE mid-block attention's projections as 1x1 convolutions: A1111 and
    // ComfyUI load them as such, so the export must reshape diffusers' [C, C] to [C, C, 1, 1].
    let mid_attention: Vec<_> = tensors
        .iter()
        .filter(|(key, _)| {
            key.contains("mid.attn_1.")
                && ["q.", "k.", "v.", "proj_out."]
                    .iter()
                    .any(|part| key.contains(&format!("attn_1.{part}weight")))
        })
        .collect();
    assert_eq!(
        mid_attention.len(),
        8,
        "encoder and decoder q/k/v/proj_out weights"
    );
    for (key, tensor) in &mid_attention {
        let size = tensor.size();
        assert!(
            size.len() == 4 && size[2] == 1 && size[3] == 1,
            "{key} is {size:?}, not [C, C, 1, 1]"
        );
    }
    let keys: Vec<String> = tensors.into_iter().map(|(k, _)| k).collect();
    assert!(keys.iter().all(|key| {
        key.starts_with("model.diffusion_model.")
            || key.starts_with("first_stage_model.")
            || key.starts_with("cond_stage_model.transformer.text_model.")
    }));
    let outputs = python_component_outputs(
        dir.path(),
        &[
            "from-single-file",
            "--ldm",
            &single.display().to_string(),
            "--config",
            &fixtures_dir().join("model").display().to_string(),
        ],
    );
    assert_probe_matches_goldens(
        &outputs,
        PYTHON_OUTPUTS,
        "diffusers from_single_file of arbor's export",
    );
}

const PYTHON_OUTPUTS: &[&str] = &[
    "unet.out",
    "vae.posterior_mean",
    "vae.posterior_logvar",
    "vae.decode_of_mean",
    "clip.last_hidden_state",
    "clip.penultimate_ln",
];

/// Runs a loading mode of the fixture script (diffusers/transformers) on the fixture inputs.
fn python_component_outputs(dir: &Path, mode_args: &[&str]) -> HashMap<String, Tensor> {
    let out = dir.join("python_outputs.safetensors");
    let script = fixture_script("make_fixtures.py");
    let status = ProcessCommand::new(python_bin())
        .arg(script)
        .args(mode_args)
        .arg("--inputs")
        .arg(fixtures_dir().join("inputs.safetensors"))
        .arg("--out")
        .arg(&out)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .expect("run the fixture script");
    assert!(status.success(), "fixture script {mode_args:?} failed");
    read_tensors(&out).expect("outputs")
}

#[test]
fn single_file_with_and_without_text_model_prefix_probes_like_diffusers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let single = dir.path().join("model.safetensors");
    export_single_file(&fixtures_dir().join("model"), &single);
    let unprefixed = dir.path().join("unprefixed.safetensors");
    let renamed: Vec<(String, Tensor)> = Tensor::read_safetensors(&single)
        .unwrap()
        .into_iter()
        .map(|(key, tensor)| {
            (
                key.replace(
                    "cond_stage_model.transformer.text_model.",
                    "cond_stage_model.transformer.",
                ),
                tensor,
            )
        })
        .collect();
    Tensor::write_safetensors(&renamed, &unprefixed).unwrap();
    let inputs = clip_and_unet_inputs(dir.path());
    for (label, model) in [("prefixed", &single), ("unprefixed", &unprefixed)] {
        let out = dir.path().join(format!("{label}.out.safetensors"));
        let output = probe(model, &inputs, &out, Some(&fixtures_dir().join("model")));
        assert!(
            output.status.success(),
            "{label}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let outputs = read_tensors(&out).expect("outputs");
        assert_probe_matches_goldens(
            &outputs,
            &[
                "unet.out",
                "clip.last_hidden_state",
                "clip.penultimate_ln",
                "clip.chunked_penultimate_ln",
            ],
            label,
        );
    }
}

#[test]
fn diffusers_export_round_trips() {
    let dir = tempfile::tempdir().expect("tempdir");
    let single = dir.path().join("model.safetensors");
    export_single_file(&fixtures_dir().join("model"), &single);
    let exported = dir.path().join("diffusers");
    let output = worker()
        .arg("export")
        .arg("--model")
        .arg(&single)
        .arg("--diffusers")
        .arg(&exported)
        .arg("--config")
        .arg(fixtures_dir().join("model"))
        .output()
        .expect("run export");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for file in [
        "model_index.json",
        "unet/config.json",
        "vae/diffusion_pytorch_model.safetensors",
        "tokenizer/tokenizer.json",
        "scheduler/scheduler_config.json",
        "text_encoder/model.safetensors",
    ] {
        assert!(exported.join(file).is_file(), "{file} is exported");
    }
    let inputs = clip_and_unet_inputs(dir.path());
    let out = dir.path().join("out.safetensors");
    let output = probe(&exported, &inputs, &out, None);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_probe_matches_goldens(
        &read_tensors(&out).unwrap(),
        &["unet.out", "clip.penultimate_ln"],
        "diffusers export",
    );
    let outputs = python_component_outputs(
        dir.path(),
        &[
            "from-pretrained",
            "--model",
            &exported.display().to_string(),
        ],
    );
    assert_probe_matches_goldens(
        &outputs,
        PYTHON_OUTPUTS,
        "diffusers from_pretrained of arbor's export",
    );
}

#[test]
fn a_text_encoder_only_folder_probes_clip_inputs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("model");
    let text_encoder = model.join("text_encoder");
    std::fs::create_dir_all(&text_encoder).unwrap();
    for file in ["config.json", "model.safetensors"] {
        std::fs::copy(
            fixtures_dir().join("model/text_encoder").join(file),
            text_encoder.join(file),
        )
        .unwrap();
    }
    let inputs = read_tensors(&fixtures_dir().join("inputs.safetensors")).unwrap();
    let clip_only: Vec<(String, Tensor)> = inputs
        .into_iter()
        .filter(|(name, _)| name.starts_with("clip."))
        .collect();
    let inputs_path = dir.path().join("clip.safetensors");
    Tensor::write_safetensors(&clip_only, &inputs_path).unwrap();
    let out = dir.path().join("out.safetensors");
    let output = probe(&model, &inputs_path, &out, None);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let outputs = read_tensors(&out).unwrap();
    let mut names: Vec<&String> = outputs.keys().collect();
    names.sort();
    assert_eq!(
        names,
        [
            "clip.chunked_penultimate_ln",
            "clip.last_hidden_state",
            "clip.penultimate_ln",
            "ddpm.alphas_cumprod",
        ],
        "clip outputs (and the always-written schedule) only"
    );
    assert_probe_matches_goldens(
        &outputs,
        &[
            "clip.last_hidden_state",
            "clip.penultimate_ln",
            "clip.chunked_penultimate_ln",
        ],
        "text encoder only",
    );

    let unet_inputs = clip_and_unet_inputs(dir.path());
    let output = probe(&model, &unet_inputs, &out, None);
    assert!(!output.status.success(), "unet inputs need unet weights");
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("has no unet weights"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn missing_and_misshaped_tensors_name_the_key_and_both_shapes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let single = dir.path().join("model.safetensors");
    export_single_file(&fixtures_dir().join("model"), &single);
    let tensors = Tensor::read_safetensors(&single).unwrap();
    let inputs = clip_and_unet_inputs(dir.path());
    let out = dir.path().join("out.safetensors");

    let dropped_key = "model.diffusion_model.input_blocks.1.1.proj_in.weight";
    let missing: Vec<(String, Tensor)> = tensors
        .iter()
        .filter(|(k, _)| k != dropped_key)
        .map(|(k, t)| (k.clone(), t.shallow_clone()))
        .collect();
    assert_eq!(
        missing.len() + 1,
        tensors.len(),
        "the fixture has {dropped_key}"
    );
    let missing_path = dir.path().join("missing.safetensors");
    Tensor::write_safetensors(&missing, &missing_path).unwrap();
    let output = probe(
        &missing_path,
        &inputs,
        &out,
        Some(&fixtures_dir().join("model")),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("missing tensor `down_blocks.0.attentions.0.proj_in.weight`"),
        "{stderr}"
    );
    assert!(stderr.contains("[32, 32"), "expected shape named: {stderr}");

    let misshaped_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight";
    let misshaped: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(k, t)| {
            if k == misshaped_key {
                (
                    k.clone(),
                    Tensor::zeros([47], (tch::Kind::Float, tch::Device::Cpu)),
                )
            } else {
                (k.clone(), t.shallow_clone())
            }
        })
        .collect();
    let misshaped_path = dir.path().join("misshaped.safetensors");
    Tensor::write_safetensors(&misshaped, &misshaped_path).unwrap();
    let output = probe(
        &misshaped_path,
        &inputs,
        &out,
        Some(&fixtures_dir().join("model")),
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("`text_model.final_layer_norm.weight`"),
        "{stderr}"
    );
    assert!(stderr.contains("has shape [47], expected [48]"), "{stderr}");
}

#[test]
fn ckpt_is_refused_with_how_to_convert() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ckpt = dir.path().join("sd15.ckpt");
    std::fs::write(&ckpt, b"PK\x03\x04 pickle").unwrap();
    let output = worker()
        .arg("export")
        .arg("--model")
        .arg(&ckpt)
        .arg("--single-file")
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("sd15.ckpt")
            && stderr.contains("pickled checkpoint")
            && stderr.contains("save_file"),
        "{stderr}"
    );
}

#[test]
fn a_diffusers_folder_with_only_pickled_weights_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text_encoder = dir.path().join("text_encoder");
    std::fs::create_dir_all(&text_encoder).unwrap();
    std::fs::copy(
        fixtures_dir().join("model/text_encoder/config.json"),
        text_encoder.join("config.json"),
    )
    .unwrap();
    std::fs::write(text_encoder.join("pytorch_model.bin"), b"pickle").unwrap();
    let inputs = read_tensors(&fixtures_dir().join("inputs.safetensors")).unwrap();
    let clip_only: Vec<(String, Tensor)> = inputs
        .into_iter()
        .filter(|(name, _)| name == "clip.input_ids")
        .collect();
    let inputs_path = dir.path().join("clip.safetensors");
    Tensor::write_safetensors(&clip_only, &inputs_path).unwrap();
    let output = probe(
        dir.path(),
        &inputs_path,
        &dir.path().join("out.safetensors"),
        None,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("pytorch_model.bin") && stderr.contains("pickled checkpoint"),
        "{stderr}"
    );
}
