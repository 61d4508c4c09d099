//! Shared by the UNet/VAE/DDPM/train-step parity tests: builds the parity fixtures once per
//! fixture-script version with `worker/tests/fixtures/make_fixtures.py` (diffusers from the
//! project's virtualenv, offline) and reads its tensors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use arbor_testkit::{fnv1a, python_bin};
use tch::Tensor;

/// A script of `worker/tests/fixtures`.
pub fn fixture_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Runs fixture script `name` with `args` and a new folder, once per script version: the folder
/// is `<CARGO_TARGET_TMPDIR>/<cache>/<version>`, made complete (a `COMPLETE` file) or not at all.
pub fn script_fixtures(name: &str, args: &[&str], cache: &str) -> Result<PathBuf> {
    let script = fixture_script(name);
    let script_bytes = std::fs::read(&script).with_context(|| format!("reading {script:?}"))?;
    let version = format!("{:016x}", fnv1a(&script_bytes));
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join(cache);
    let dir = base.join(&version);
    if dir.join("COMPLETE").exists() {
        return Ok(dir);
    }
    let staging = base.join(format!("{version}.staging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&base)?;
    let status = Command::new(python_bin())
        .arg(&script)
        .args(args)
        .arg(&staging)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .with_context(|| format!("running {script:?} with {:?}", python_bin()))?;
    if !status.success() {
        bail!("fixture script {script:?} failed with {status}");
    }
    std::fs::write(staging.join("COMPLETE"), b"")?;
    if std::fs::rename(&staging, &dir).is_err() && !dir.join("COMPLETE").exists() {
        bail!("could not move fixtures into {dir:?}");
    }
    let _ = std::fs::remove_dir_all(&staging);
    Ok(dir)
}

/// The fixture directory (model/, inputs.safetensors, goldens.safetensors, errors.json).
pub fn fixtures_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        script_fixtures("make_fixtures.py", &["make"], "model-parity-fixtures")
            .expect("building the parity fixtures")
    })
}

fn build_sampler_goldens() -> Result<PathBuf> {
    let script = fixture_script("make_sampler_fixtures.py");
    let script_bytes = std::fs::read(&script).with_context(|| format!("reading {script:?}"))?;
    let dir = fixtures_dir();
    let out = dir.join(format!(
        "samplers-{:016x}.safetensors",
        fnv1a(&script_bytes)
    ));
    if out.exists() {
        return Ok(out);
    }
    let staging = dir.join(format!(
        "samplers.staging-{}.safetensors",
        std::process::id()
    ));
    let status = Command::new(python_bin())
        .arg(&script)
        .arg(dir)
        .arg(&staging)
        .env("HF_HUB_OFFLINE", "1")
        .status()
        .with_context(|| format!("running {script:?} with {:?}", python_bin()))?;
    if !status.success() {
        bail!("sampler fixture script {script:?} failed with {status}");
    }
    std::fs::rename(&staging, &out)?;
    Ok(out)
}

/// Goldens of diffusers' DDIM and Euler sampling loops (make_sampler_fixtures.py).
pub fn sampler_goldens() -> HashMap<String, Tensor> {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    let path = PATH.get_or_init(|| build_sampler_goldens().expect("building the sampler goldens"));
    read_tensors(path).expect("reading the sampler goldens")
}

pub fn read_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    Ok(Tensor::read_safetensors(path)
        .with_context(|| format!("reading {path:?}"))?
        .into_iter()
        .collect())
}

pub fn inputs() -> HashMap<String, Tensor> {
    read_tensors(&fixtures_dir().join("inputs.safetensors")).expect("reading the inputs")
}

pub fn goldens() -> HashMap<String, Tensor> {
    read_tensors(&fixtures_dir().join("goldens.safetensors")).expect("reading the goldens")
}

pub fn get<'a>(tensors: &'a HashMap<String, Tensor>, name: &str) -> &'a Tensor {
    tensors
        .get(name)
        .unwrap_or_else(|| panic!("fixture tensor `{name}` is missing"))
}

/// Max |a − b| after checking the shapes agree.
pub fn max_abs_diff(actual: &Tensor, expected: &Tensor, name: &str) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shape of {name}");
    (actual.to_kind(tch::Kind::Double) - expected.to_kind(tch::Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

pub const FORWARD_ATOL: f64 = 1e-4;
pub const GRAD_RTOL: f64 = 1e-3;
/// Same floor as the fixture script's GRAD_SCALE_FLOOR: gradients are compared relative to
/// max(|golden|.max(), floor), since some are exactly zero in exact arithmetic.
pub const GRAD_SCALE_FLOOR: f64 = 1e-4;

pub fn assert_close(actual: &Tensor, expected: &Tensor, name: &str) {
    let error = max_abs_diff(actual, expected, name);
    println!("{name}: max abs error {error:.3e}");
    assert!(
        error <= FORWARD_ATOL,
        "{name}: max abs error {error:e} > {FORWARD_ATOL:e}"
    );
}
