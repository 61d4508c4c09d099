//! What arbor's training benchmarks share (`--bench train_step`, `--bench ddp_step`): the small
//! SD-topology UNet config, the timing summary, and reading a PyTorch baseline's JSON line.
//! Included with `#[path = "support/bench_unet.rs"] mod bench_unet;`.

use std::process::Command;

use anyhow::{bail, Context, Result};

/// The benchmarked UNet: SD1's topology (3 cross-attention levels and a plain one, 2 layers per
/// block, 8 heads, 768-wide text context) at reduced widths.
pub fn unet_config_json() -> serde_json::Value {
    serde_json::json!({
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64, 128, 128],
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "norm_num_groups": 32,
    })
}

/// An SD1.5-sized UNet (diffusers' `runwayml/stable-diffusion-v1-5` unet config: 320/640/1280/1280
/// channels, 8 heads, 768-wide context; about 860 M parameters), for GPU runs with random weights.
#[allow(dead_code)]
pub fn sd15_unet_config_json() -> serde_json::Value {
    serde_json::json!({
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 768,
        "norm_num_groups": 32,
    })
}

#[derive(Debug)]
pub struct Timing {
    pub median_ms: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
    pub loss: f64,
}

pub fn median(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|left, right| left.total_cmp(right));
    let middle = sorted.len() / 2;
    if sorted.len() % 2 == 0 {
        (sorted[middle - 1] + sorted[middle]) / 2.0
    } else {
        sorted[middle]
    }
}

pub fn summarize(times: Vec<f64>, loss: f64) -> Timing {
    assert!(!times.is_empty(), "at least one timed step");
    Timing {
        median_ms: median(&times),
        mean_ms: times.iter().sum::<f64>() / times.len() as f64,
        min_ms: times.iter().copied().fold(f64::INFINITY, f64::min),
        loss,
    }
}

/// Runs `command` and parses the last stdout line that starts with `{` as JSON.
pub fn run_json_command(mut command: Command, what: &str) -> Result<serde_json::Value> {
    let output = command
        .output()
        .with_context(|| format!("running {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed with {}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|line| line.starts_with('{'))
        .with_context(|| format!("{what} printed no json line"))?;
    Ok(serde_json::from_str(line)?)
}

/// A number field of a baseline's JSON.
pub fn json_f64(value: &serde_json::Value, name: &str) -> Result<f64> {
    value[name]
        .as_f64()
        .with_context(|| format!("json lacks the number `{name}`"))
}

/// The `times_ms` array of a baseline's JSON.
pub fn json_times(value: &serde_json::Value) -> Result<Vec<f64>> {
    value["times_ms"]
        .as_array()
        .context("json lacks `times_ms`")?
        .iter()
        .map(|time| time.as_f64().context("a non-numeric time in `times_ms`"))
        .collect()
}
