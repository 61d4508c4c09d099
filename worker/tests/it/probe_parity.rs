//! `arbor-worker probe` on the fixture's inputs writes every golden name, and each output
//! matches diffusers/transformers: forward outputs within atol 1e-4, gradients within rtol 1e-3
//! of their tensor's max magnitude (floored; see GRAD_SCALE_FLOOR).

use crate::model_fixtures::{
    assert_close, fixtures_dir, get, goldens, max_abs_diff, read_tensors, GRAD_RTOL,
    GRAD_SCALE_FLOOR,
};
use assert_cmd::Command;

#[test]
fn probe_reproduces_every_golden() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("probe.safetensors");
    let output = Command::cargo_bin("arbor-worker")
        .expect("binary")
        .arg("probe")
        .arg("--model")
        .arg(fixtures_dir().join("model"))
        .arg("--inputs")
        .arg(fixtures_dir().join("inputs.safetensors"))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run probe");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let outputs = read_tensors(&out).expect("outputs");
    let goldens = goldens();
    let mut golden_names: Vec<&String> = goldens.keys().collect();
    golden_names.sort();
    let mut output_names: Vec<&String> = outputs.keys().collect();
    output_names.sort();
    assert_eq!(
        output_names, golden_names,
        "the probe writes exactly the golden names"
    );

    let mut worst_forward = 0.0f64;
    let mut worst_gradient = 0.0f64;
    for name in golden_names {
        let golden = get(&goldens, name);
        let actual = get(&outputs, name);
        if name.starts_with("train.grad.") {
            let scale = golden.abs().max().double_value(&[]).max(GRAD_SCALE_FLOOR);
            let relative = max_abs_diff(actual, golden, name) / scale;
            worst_gradient = worst_gradient.max(relative);
            assert!(
                relative <= GRAD_RTOL,
                "{name}: gradient error {relative:e} of max > {GRAD_RTOL:e}"
            );
        } else {
            worst_forward = worst_forward.max(max_abs_diff(actual, golden, name));
            assert_close(actual, golden, name);
        }
    }
    println!("probe parity: worst forward max abs error {worst_forward:.3e}, worst gradient error relative to max {worst_gradient:.3e}");
}

#[test]
fn an_incomplete_input_group_names_the_missing_input() {
    let dir = tempfile::tempdir().expect("tempdir");
    let inputs = read_tensors(&fixtures_dir().join("inputs.safetensors")).expect("inputs");
    let partial: Vec<(String, tch::Tensor)> = inputs
        .into_iter()
        .filter(|(name, _)| name == "unet.sample" || name == "unet.timesteps")
        .collect();
    let inputs_path = dir.path().join("partial.safetensors");
    tch::Tensor::write_safetensors(&partial, &inputs_path).expect("write");
    let output = Command::cargo_bin("arbor-worker")
        .expect("binary")
        .arg("probe")
        .arg("--model")
        .arg(fixtures_dir().join("model"))
        .arg("--inputs")
        .arg(&inputs_path)
        .arg("--out")
        .arg(dir.path().join("out.safetensors"))
        .output()
        .expect("run probe");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("unet.encoder_hidden_states"), "{stderr}");
}
