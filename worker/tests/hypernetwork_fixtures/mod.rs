//! Shared by the hypernetwork tests: builds the reference fixtures once per script version with
//! `worker/tests/fixtures/make_hypernetwork_fixtures.py` (torch + diffusers from the project's
//! virtualenv, offline) and runs its `check-pt` mode on files arbor writes.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use arbor_common::config::{ConfigChoice, HypernetworkActivation};
use arbor_worker::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use tch::{nn, Device, Tensor};

/// The cases of the fixture script (its `CASES`).
pub const CASES: [&str; 3] = [
    "leakyrelu_121",
    "swish_layernorm_dropout_1_15_2_1",
    "linear_121_default",
];
/// The activations both A1111 and ComfyUI accept, as the job config lists them.
pub const ACTIVATIONS: &[HypernetworkActivation] = <HypernetworkActivation as ConfigChoice>::ALL;
pub const FORWARD_ATOL: f64 = 1e-4;
pub const GRAD_RTOL: f64 = 1e-3;
pub const GRAD_SCALE_FLOOR: f64 = 1e-4;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/make_hypernetwork_fixtures.py")
}

pub fn python_bin() -> PathBuf {
    std::env::var_os("ARBOR_PYTHON_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("the worker crate lives in the repository")
                .join(".venv/bin/python")
        })
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |hash, byte| {
        (hash ^ u64::from(*byte)).wrapping_mul(0x100000001b3)
    })
}

fn build_fixtures() -> Result<PathBuf> {
    let script_bytes =
        std::fs::read(script()).with_context(|| format!("reading {:?}", script()))?;
    let version = format!("{:016x}", fnv1a(&script_bytes));
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hypernetwork-fixtures");
    let dir = base.join(&version);
    if dir.join("COMPLETE").exists() {
        return Ok(dir);
    }
    let staging = base.join(format!("{version}.staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&base)?;
    let status = Command::new(python_bin())
        .arg(script())
        .arg("make")
        .arg(&staging)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .with_context(|| format!("running {:?} with {:?}", script(), python_bin()))?;
    if !status.success() {
        bail!("fixture script failed with {status}");
    }
    std::fs::write(staging.join("COMPLETE"), b"")?;
    if std::fs::rename(&staging, &dir).is_err() && !dir.join("COMPLETE").exists() {
        bail!("could not move fixtures into {dir:?}");
    }
    let _ = std::fs::remove_dir_all(&staging);
    Ok(dir)
}

/// The fixture directory (see the script's docstring).
pub fn fixtures_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| build_fixtures().expect("building the hypernetwork fixtures"))
}

pub fn read_tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap_or_else(|error| panic!("reading {path:?}: {error}"))
        .into_iter()
        .collect()
}

pub fn get<'a>(tensors: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    tensors
        .get(name)
        .unwrap_or_else(|| panic!("fixture tensor `{name}` is missing"))
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

/// Max |a − b| after checking the shapes agree.
pub fn max_abs_diff(actual: &Tensor, expected: &Tensor, name: &str) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shape of {name}");
    (actual.to_kind(tch::Kind::Double) - expected.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
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
