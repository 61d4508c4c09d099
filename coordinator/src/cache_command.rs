//! `arbor cache`: fill the latent cache (`train.cache_latents`) ahead of training, with the same
//! coordinator and `arbor-worker train` processes as the job itself.
//!
//! It serves the job of `--config` for one epoch with `train.fill_cache_only`: the workers load
//! the VAE alone, take their shards of the epoch as in training, and encode what the cache does
//! not have yet. Its state goes to `<job.run_dir>/cache-fill` (the training run directory is
//! untouched), and the cache is the training job's: `data.latent_cache`, else
//! `<job.run_dir>/latent-cache`. Progress and ETA show in `arbor status`; a killed worker is
//! handled as in training (its remaining batches are re-sharded, its written latents kept).

use anyhow::Context;
use arbor_common::config::JobConfig;
use clap::Args;

use crate::coordinator_command::serve_job;
use crate::job_config::ConfigFlags;

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(flatten)]
    pub config: ConfigFlags,
    /// Keep serving Status, /metrics and the health endpoints after the fill ends, until
    /// SIGTERM or Ctrl-C (as `arbor coordinator --keep-serving`).
    #[arg(long, env = "ARBOR_KEEP_SERVING")]
    pub keep_serving: bool,
}

pub fn run(args: CacheArgs) -> anyhow::Result<std::process::ExitCode> {
    let config = args.config.load()?;
    let fill = fill_config(config)?;
    eprintln!(
        "filling the latent cache {} (state in {}); start the workers with `arbor-worker train --coordinator …` as for training",
        fill.data.latent_cache.as_deref().unwrap_or_default(),
        fill.job.run_dir
    );
    serve_job(fill, args.config.base_dir(), args.keep_serving)
}

/// The job that fills `config`'s latent cache: one epoch, nothing trained, its state in
/// `<job.run_dir>/cache-fill`.
pub fn fill_config(mut config: JobConfig) -> anyhow::Result<JobConfig> {
    let run_dir = config.job.run_dir.trim_end_matches('/').to_string();
    config.data.latent_cache = Some(config.data.latent_cache_location(&run_dir));
    config.job.run_dir = format!("{run_dir}/cache-fill");
    config.job.name = format!("{}-cache-fill", config.job.name);
    config.train.cache_latents = true;
    config.train.fill_cache_only = true;
    config.schedule.epochs = 1;
    config.schedule.max_steps = None;
    config.samples.every = 0;
    config
        .validate()
        .context("the cache-filling job's config is invalid")?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = include_str!("../../deploy/job.example.toml");

    #[test]
    fn the_fill_job_runs_one_epoch_in_its_own_run_dir_into_the_training_cache() {
        let config = JobConfig::load(CONFIG, &[]).unwrap();
        let run_dir = config.job.run_dir.clone();
        let fill = fill_config(config.clone()).unwrap();
        assert_eq!(fill.job.run_dir, format!("{run_dir}/cache-fill"));
        assert_eq!(
            fill.data.latent_cache.as_deref(),
            Some(format!("{run_dir}/latent-cache").as_str())
        );
        assert!(fill.train.cache_latents && fill.train.fill_cache_only);
        assert_eq!(fill.schedule.epochs, 1);
        assert_eq!(fill.schedule.max_steps, None);
        // An explicit cache stays where it is.
        let mut shared = config;
        shared.data.latent_cache = Some("s3://bucket/cache".to_string());
        shared.train.cache_latents = true;
        let fill = fill_config(shared).unwrap();
        assert_eq!(fill.data.latent_cache.as_deref(), Some("s3://bucket/cache"));
    }
}
