//! `arbor-worker probe --hypernetwork FILE`: the `hn.*` outputs against the Python reference.

use crate::hypernetwork_fixtures::{
    fixtures_dir, get, max_abs_diff, read_tensors, FORWARD_ATOL, GRAD_RTOL, GRAD_SCALE_FLOOR,
};
use assert_cmd::Command;
use tch::Tensor;

const INPUTS: [&str; 4] = [
    "hn.sample",
    "hn.timesteps",
    "hn.encoder_hidden_states",
    "hn.target",
];

#[test]
fn probe_hn_outputs_match_the_reference() {
    let case = "swish_layernorm_dropout_1_15_2_1";
    let work = tempfile::tempdir().unwrap();
    let tensors = read_tensors(&fixtures_dir().join(format!("{case}.safetensors")));
    let inputs: Vec<(String, Tensor)> = INPUTS
        .iter()
        .map(|name| (name.to_string(), get(&tensors, name).shallow_clone()))
        .collect();
    let inputs_path = work.path().join("inputs.safetensors");
    Tensor::write_safetensors(&inputs, &inputs_path).unwrap();
    let out = work.path().join("out.safetensors");
    let output = Command::cargo_bin("arbor-worker")
        .unwrap()
        .arg("probe")
        .arg("--model")
        .arg(fixtures_dir())
        .arg("--inputs")
        .arg(&inputs_path)
        .arg("--out")
        .arg(&out)
        .arg("--hypernetwork")
        .arg(fixtures_dir().join(format!("{case}.pt")))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let outputs = read_tensors(&out);
    let error = max_abs_diff(
        get(&outputs, "hn.unet_out"),
        get(&tensors, "hn.unet_out"),
        "hn.unet_out",
    );
    println!("probe hn.unet_out max abs error {error:.3e}");
    assert!(error <= FORWARD_ATOL);
    let loss_error = max_abs_diff(
        get(&outputs, "hn.loss"),
        get(&tensors, "hn.loss"),
        "hn.loss",
    );
    assert!(loss_error <= 1e-5, "hn.loss error {loss_error:e}");
    let golden_gradients: Vec<&String> = tensors
        .keys()
        .filter(|name| name.starts_with("hn.grad."))
        .collect();
    assert!(golden_gradients
        .iter()
        .any(|name| name.as_str() == "hn.grad.48.k.linear.0.weight"));
    assert!(golden_gradients
        .iter()
        .any(|name| name.as_str() == "hn.grad.64.v.linear.9.bias"));
    for name in golden_gradients {
        let expected = get(&tensors, name);
        let scale = expected.abs().max().double_value(&[]).max(GRAD_SCALE_FLOOR);
        let relative = max_abs_diff(get(&outputs, name), expected, name) / scale;
        assert!(relative <= GRAD_RTOL, "{name}: relative error {relative:e}");
    }
}

#[test]
fn probe_hn_inputs_without_a_hypernetwork_are_an_error() {
    let work = tempfile::tempdir().unwrap();
    let tensors = read_tensors(&fixtures_dir().join("linear_121_default.safetensors"));
    let inputs: Vec<(String, Tensor)> = INPUTS
        .iter()
        .map(|name| (name.to_string(), get(&tensors, name).shallow_clone()))
        .collect();
    let inputs_path = work.path().join("inputs.safetensors");
    Tensor::write_safetensors(&inputs, &inputs_path).unwrap();
    let output = Command::cargo_bin("arbor-worker")
        .unwrap()
        .args(["probe", "--model"])
        .arg(fixtures_dir())
        .arg("--inputs")
        .arg(&inputs_path)
        .arg("--out")
        .arg(work.path().join("out.safetensors"))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("hn.sample") && stderr.contains("--hypernetwork"),
        "{stderr}"
    );
}
