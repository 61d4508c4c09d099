//! `arbor checkpoint`: asks a running job to checkpoint now (before maintenance, a spot
//! instance's reclaim, or to pick a good step), and optionally waits until it is complete.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use arbor_proto::v1::{RequestCheckpointRequest, StatusRequest};
use clap::Args;

use crate::client_flags::ClientFlags;

#[derive(Debug, Args)]
pub struct CheckpointArgs {
    #[command(flatten)]
    client: ClientFlags,
    /// Why, recorded in the job's events.
    #[arg(long, default_value = "")]
    reason: String,
    /// Also write the exports of that step (the formats of the job's end: single-file and
    /// diffusers for a fine-tune, A1111 `.pt` and safetensors for a hypernetwork) to
    /// `exports/step-<N>/` in the run directory.
    #[arg(long)]
    export: bool,
    /// Wait until the checkpoint is complete and print its path (or fail after this many
    /// seconds); without it the command returns once the request is accepted.
    #[arg(long, value_name = "SECONDS")]
    wait: Option<u64>,
}

pub fn run(args: CheckpointArgs) -> anyhow::Result<std::process::ExitCode> {
    let (runtime, mut client) = args.client.connect()?;
    let coordinator = &args.client.coordinator;
    runtime.block_on(async {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            client.request_checkpoint(RequestCheckpointRequest {
                reason: args.reason.clone(),
                export: args.export,
            }),
        )
        .await
        .context("the coordinator did not answer within 10s")?
        .with_context(|| format!("requesting a checkpoint from {coordinator}"))?
        .into_inner();
        println!(
            "checkpoint requested: epoch {} segment {} at batch {} (generation {})",
            reply.epoch, reply.segment, reply.batch, reply.generation
        );
        let Some(wait_seconds) = args.wait else {
            return Ok(std::process::ExitCode::SUCCESS);
        };
        let deadline = Instant::now() + Duration::from_secs(wait_seconds);
        loop {
            let status = client
                .status(StatusRequest {})
                .await
                .with_context(|| format!("status from {coordinator}"))?
                .into_inner();
            let reached = status.last_checkpoint.as_ref().filter(|last| {
                (last.epoch, last.segment, last.batch) >= (reply.epoch, reply.segment, reply.batch)
                    || last.epoch > reply.epoch
            });
            if let Some(last) = reached {
                println!("checkpoint complete: {}", last.checkpoint);
                return Ok(std::process::ExitCode::SUCCESS);
            }
            if status.generation != reply.generation {
                bail!(
                    "the group re-formed (generation {} -> {}) before the checkpoint completed",
                    reply.generation,
                    status.generation
                );
            }
            if Instant::now() >= deadline {
                bail!("the checkpoint did not complete within --wait {wait_seconds}s");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}
