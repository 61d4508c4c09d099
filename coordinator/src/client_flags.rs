//! The flags of the commands that talk to a running coordinator (`arbor status`,
//! `arbor checkpoint`): its address, the job token and the TLS CA, and the client they make.

use anyhow::Context;
use arbor_runtime::client::{connect, Client};
use clap::Args;

use crate::token_flags::TokenFlags;

#[derive(Debug, Args)]
pub struct ClientFlags {
    /// The coordinator, `host:port` or `http(s)://host:port`.
    #[arg(long, env = "ARBOR_COORDINATOR", default_value = "127.0.0.1:50051")]
    pub coordinator: String,
    #[command(flatten)]
    pub token: TokenFlags,
    /// PEM CA certificate to verify a TLS coordinator (`https://host:port`).
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
}

impl ClientFlags {
    /// A current-thread runtime and a client of the coordinator, made inside it.
    pub fn connect(&self) -> anyhow::Result<(tokio::runtime::Runtime, Client)> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let token = self.token.token()?;
        let tls_ca_pem = match &self.tls_ca {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("reading --tls-ca {}", path.display()))?,
            ),
            None => None,
        };
        let client = {
            let _context = runtime.enter();
            connect(&self.coordinator, &token, tls_ca_pem)?
        };
        Ok((runtime, client))
    }
}
