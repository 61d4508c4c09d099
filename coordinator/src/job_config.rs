//! Loading `job.toml` at the edge: file, then `ARBOR_<SECTION>_<KEY>` variables, then `--set`
//! flags; and the job token (from `ARBOR_TOKEN` or `job.token_file`, never from a flag).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use arbor_common::config::{JobConfig, Override};
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct ConfigFlags {
    /// The job configuration (TOML, docs/architecture.md §7).
    #[arg(long, short = 'c', env = "ARBOR_CONFIG")]
    pub config: PathBuf,
    /// Override any config key: `--set section.key=value` (repeatable). Wins over
    /// `ARBOR_<SECTION>_<KEY>` environment variables, which win over the file.
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl ConfigFlags {
    pub fn load(&self) -> anyhow::Result<JobConfig> {
        let text = std::fs::read_to_string(&self.config)
            .with_context(|| format!("reading config {}", self.config.display()))?;
        let mut overrides = Override::from_env(std::env::vars());
        for flag in &self.overrides {
            overrides.push(Override::from_flag(flag)?);
        }
        let config = JobConfig::load(&text, &overrides)
            .with_context(|| format!("invalid config {}", self.config.display()))?;
        Ok(config)
    }

    /// Relative paths in the config are relative to the config file's folder.
    pub fn base_dir(&self) -> PathBuf {
        self.config
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }
}

/// A local path from a config value: a plain path (relative to `base`) or `file://`. Object-store
/// URLs are refused with a message that says so.
pub fn local_path(value: &str, base: &Path, field: &str) -> anyhow::Result<PathBuf> {
    let path = if let Some(rest) = value.strip_prefix("file://") {
        PathBuf::from(rest)
    } else if value.contains("://") {
        bail!("{field} `{value}`: the coordinator reads {field} from a local or mounted path; object-store URLs are not supported here yet");
    } else {
        PathBuf::from(value)
    };
    Ok(if path.is_absolute() {
        path
    } else {
        base.join(path)
    })
}

/// The job token: `ARBOR_TOKEN`, else the contents of `job.token_file`.
pub fn job_token(config: &JobConfig, base: &Path) -> anyhow::Result<String> {
    if let Ok(token) = std::env::var("ARBOR_TOKEN") {
        if !token.trim().is_empty() {
            return Ok(token.trim().to_string());
        }
    }
    let Some(file) = &config.job.token_file else {
        bail!("no job token: set ARBOR_TOKEN or job.token_file");
    };
    let path = local_path(file, base, "job.token_file")?;
    let token = std::fs::read_to_string(&path)
        .with_context(|| format!("reading job.token_file {}", path.display()))?;
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!("job.token_file {} is empty", path.display());
    }
    Ok(token)
}
