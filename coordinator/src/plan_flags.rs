//! Command-line flags shared by every command that builds a plan (`plan`, `preview`, …).

use arbor_common::assign::{AspectMetric, AssignParams, Assigner};
use arbor_common::buckets::{BucketParams, BucketTable};
use arbor_common::plan::PlanParams;
use clap::Args;

/// The bucket table (docs/architecture.md §2 defaults).
#[derive(Debug, Clone, Args)]
pub struct BucketFlags {
    /// Largest bucket area in pixels.
    #[arg(long, default_value_t = 512 * 768)]
    pub max_area: u64,
    /// Smallest bucket side.
    #[arg(long, default_value_t = 256)]
    pub min_dim: u32,
    /// Largest bucket side.
    #[arg(long, default_value_t = 1024)]
    pub max_dim: u32,
    /// Bucket side increment.
    #[arg(long, default_value_t = 64)]
    pub step: u32,
    /// Resolution of catch-all batches, as WxH.
    #[arg(long, default_value = "512x512", value_parser = parse_resolution)]
    pub base_res: [u32; 2],
}

impl BucketFlags {
    pub fn params(&self) -> BucketParams {
        BucketParams {
            max_area: self.max_area,
            min_dim: self.min_dim,
            max_dim: self.max_dim,
            step: self.step,
            base_res: self.base_res,
        }
    }

    pub fn table(&self) -> anyhow::Result<BucketTable> {
        Ok(BucketTable::new(self.params())?)
    }
}

/// How images are matched to buckets.
#[derive(Debug, Clone, Args)]
pub struct AssignFlags {
    /// Aspect distance used to pick a bucket: `linear` (NovelAI) or `log`.
    #[arg(long, default_value = "linear")]
    pub aspect_metric: AspectMetric,
    /// Images whose linear aspect error is at least this are pruned (and counted).
    #[arg(long, default_value_t = 4.0)]
    pub max_ar_error: f64,
}

impl AssignFlags {
    pub fn assigner(&self, buckets: &BucketFlags) -> anyhow::Result<Assigner> {
        let params = AssignParams {
            aspect_metric: self.aspect_metric,
            max_ar_error: self.max_ar_error,
        };
        Ok(Assigner::new(buckets.table()?, params)?)
    }
}

/// Which epoch of which group shape.
#[derive(Debug, Clone, Args)]
pub struct EpochFlags {
    /// Per-rank batch size.
    #[arg(long)]
    pub bsz: u32,
    /// Number of ranks (GPUs).
    #[arg(long)]
    pub world_size: u32,
    /// The job seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The epoch (0-based).
    #[arg(long, default_value_t = 0)]
    pub epoch: u64,
}

impl EpochFlags {
    pub fn params(&self) -> PlanParams {
        PlanParams {
            seed: self.seed,
            epoch: self.epoch,
            world_size: self.world_size,
            bsz: self.bsz,
        }
    }
}

/// Parses `WxH` (or `W,H`) into `[W, H]`.
pub fn parse_resolution(text: &str) -> Result<[u32; 2], String> {
    let (width, height) = text
        .split_once(['x', 'X', ','])
        .ok_or_else(|| format!("expected WxH, got `{text}`"))?;
    let parse = |side: &str| {
        side.trim()
            .parse::<u32>()
            .map_err(|error| format!("invalid side `{side}` in `{text}`: {error}"))
    };
    Ok([parse(width)?, parse(height)?])
}
