//! Shared helpers of arbor-data's integration tests: the committed corpus generator
//! (bench/loader/make_corpus.py, run with the project's virtualenv) and pixel readers.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use arbor_data::batch_loader::Batch;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The project's virtualenv (scripts/setup.sh makes it; `ARBOR_VENV` overrides its location).
pub fn venv() -> PathBuf {
    match std::env::var_os("ARBOR_VENV") {
        Some(path) => PathBuf::from(path),
        None => workspace_root().join(".venv"),
    }
}

pub fn venv_tool(name: &str) -> PathBuf {
    let tool = venv().join("bin").join(name);
    assert!(
        tool.exists(),
        "{} is missing: run scripts/setup.sh (it installs scripts/requirements/data.txt)",
        tool.display()
    );
    tool
}

/// Writes the odd-file corpus into `out`.
pub fn make_odd_corpus(out: &Path) {
    let status = Command::new(venv_tool("python"))
        .arg(workspace_root().join("bench/loader/make_corpus.py"))
        .arg("odd")
        .arg(out)
        .status()
        .expect("running make_corpus.py");
    assert!(status.success(), "make_corpus.py odd failed: {status}");
}

/// The RGB8 value of pixel (x, y) of slot `index`, read back from CHW f32 in [-1, 1].
pub fn pixel(batch: &Batch, index: usize, x: u32, y: u32) -> [u8; 3] {
    let values = batch.item_pixels(index);
    let plane = (batch.bucket_width * batch.bucket_height) as usize;
    let offset = (y * batch.bucket_width + x) as usize;
    let read = |channel: usize| {
        let value = values[channel * plane + offset];
        assert!((-1.0..=1.0).contains(&value), "value {value} out of range");
        ((value + 1.0) * 127.5).round() as u8
    };
    [read(0), read(1), read(2)]
}

pub fn assert_close(actual: [u8; 3], expected: [u8; 3], tolerance: u8, context: &str) {
    for channel in 0..3 {
        let difference = actual[channel].abs_diff(expected[channel]);
        assert!(
            difference <= tolerance,
            "{context}: got {actual:?}, expected {expected:?} (tolerance {tolerance})"
        );
    }
}
