//! Where clients get the job token: `ARBOR_TOKEN` or `--token-file`, never a flag value.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct TokenFlags {
    /// A file holding the job token (used when ARBOR_TOKEN is unset).
    #[arg(long, env = "ARBOR_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl TokenFlags {
    pub fn token(&self) -> anyhow::Result<String> {
        if let Ok(token) = std::env::var("ARBOR_TOKEN") {
            if !token.trim().is_empty() {
                return Ok(token.trim().to_string());
            }
        }
        let Some(path) = &self.token_file else {
            bail!("no job token: set ARBOR_TOKEN or pass --token-file");
        };
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("reading token file {}", path.display()))?;
        if token.trim().is_empty() {
            bail!("token file {} is empty", path.display());
        }
        Ok(token.trim().to_string())
    }
}
