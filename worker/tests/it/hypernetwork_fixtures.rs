//! Shared by the hypernetwork tests: builds the reference fixtures once per script version with
//! `worker/tests/fixtures/make_hypernetwork_fixtures.py` (torch + diffusers from the project's
//! virtualenv, offline) and runs its `check-pt` mode on files arbor writes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use arbor_common::config::{ConfigChoice, HypernetworkActivation};
use arbor_testkit::python_bin;
use arbor_worker::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use tch::{nn, Device, Tensor};

use crate::model_fixtures::{fixture_script, script_fixtures};
pub use crate::model_fixtures::{get, max_abs_diff, FORWARD_ATOL, GRAD_RTOL, GRAD_SCALE_FLOOR};

/// The cases of the fixture script (its `CASES`).
pub const CASES: [&str; 3] = [
    "leakyrelu_121",
    "swish_layernorm_dropout_1_15_2_1",
    "linear_121_default",
];
/// The activations both A1111 and ComfyUI accept, as the job config lists them.
pub const ACTIVATIONS: &[HypernetworkActivation] = <HypernetworkActivation as ConfigChoice>::ALL;

fn script() -> PathBuf {
    fixture_script("make_hypernetwork_fixtures.py")
}

/// The fixture directory (see the script's docstring).
pub fn fixtures_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        script_fixtures(
            "make_hypernetwork_fixtures.py",
            &["make"],
            "hypernetwork-fixtures",
        )
        .expect("building the hypernetwork fixtures")
    })
}

pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    crate::model_fixtures::read_tensors(path).unwrap_or_else(|error| panic!("{error:#}"))
}

pub fn load_unet() -> (nn::VarStore, UNet2DConditionModel) {
    let unet_dir = fixtures_dir().join("unet");
    let config = UNet2DConditionConfig::from_diffusers_json(&unet_dir.join("config.json")).unwrap();
    let mut var_store = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(var_store.root(), &config);
    var_store
        .load(unet_dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    var_store.freeze();
    (var_store, unet)
}

/// Runs the script's `check-pt` on `file`: returns the printed metadata (JSON) and the outputs
/// of A1111 modules loaded from it for `inputs` (`x.<size>`), or the script's error.
pub fn python_check_pt(
    file: &Path,
    inputs: &[(String, Tensor)],
    work_dir: &Path,
) -> Result<(serde_json::Value, HashMap<String, Tensor>)> {
    let inputs_path = work_dir.join("check-inputs.safetensors");
    let out_path = work_dir.join("check-outputs.safetensors");
    Tensor::write_safetensors(inputs, &inputs_path)?;
    let output = Command::new(python_bin())
        .arg(script())
        .arg("check-pt")
        .arg(file)
        .arg(&inputs_path)
        .arg(&out_path)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .context("running check-pt")?;
    if !output.status.success() {
        bail!(
            "check-pt failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "check-pt output {:?}",
                String::from_utf8_lossy(&output.stdout)
            )
        })?;
    Ok((metadata, read_tensors(&out_path)))
}
