//! `arbor status`: what a running job is doing.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use arbor_proto::v1::{StatusReply, StatusRequest};
use clap::Args;
use serde_json::json;

use arbor_runtime::trainer::TOKEN_LENGTH_BINS;

use crate::client_flags::ClientFlags;

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    client: ClientFlags,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: StatusArgs) -> anyhow::Result<std::process::ExitCode> {
    let (runtime, mut client) = args.client.connect()?;
    let coordinator = &args.client.coordinator;
    let reply = runtime.block_on(async {
        let reply = tokio::time::timeout(Duration::from_secs(10), client.status(StatusRequest {}))
            .await
            .context("the coordinator did not answer within 10s")?
            .with_context(|| format!("status from {coordinator}"))?;
        anyhow::Ok(reply.into_inner())
    })?;
    let mut out = std::io::stdout().lock();
    if args.json {
        serde_json::to_writer_pretty(&mut out, &status_json(&reply))?;
        writeln!(out)?;
    } else {
        write_status(&mut out, &reply)?;
    }
    Ok(std::process::ExitCode::SUCCESS)
}

pub fn status_json(reply: &StatusReply) -> serde_json::Value {
    let workers: Vec<_> = reply
        .workers
        .iter()
        .map(|w| {
            json!({
                "worker_id": w.worker_id, "node": w.node, "local_rank": w.local_rank,
                "rank": if w.rank < 0 { serde_json::Value::Null } else { json!(w.rank) },
                "batches_done": w.batches_done, "items_per_second": w.items_per_second,
                "loss": w.loss, "seconds_since_heartbeat": w.seconds_since_heartbeat,
                "learning_rate": w.learning_rate,
                "token_length_counts": TOKEN_LENGTH_BINS.iter().zip(&w.token_length_counts)
                    .map(|(bin, count)| (bin.to_string(), json!(count)))
                    .collect::<serde_json::Map<_, _>>(),
            })
        })
        .collect();
    json!({
        "job": reply.job,
        "phase": reply.phase,
        "generation": reply.generation,
        "world_size": reply.world_size,
        "epoch": reply.epoch,
        "segment": reply.segment,
        "batches_per_rank": reply.batches_per_rank,
        "step": reply.step,
        "regroups": reply.regroups,
        "pending_checkpoint_batch": (reply.pending_checkpoint_batch > 0).then_some(reply.pending_checkpoint_batch),
        "failure": if reply.failure.is_empty() { serde_json::Value::Null } else { json!(reply.failure) },
        "last_checkpoint": reply.last_checkpoint.as_ref().map(|c| json!({
            "epoch": c.epoch, "segment": c.segment, "batch": c.batch, "step": c.step, "path": c.checkpoint,
        })),
        "workers": workers,
        "recent_events": reply.recent_events,
    })
}

fn write_status(out: &mut impl Write, reply: &StatusReply) -> anyhow::Result<()> {
    writeln!(
        out,
        "job {}: {}  generation {}  world size {}  epoch {} (segment {})  step {}  regroups {}",
        reply.job,
        reply.phase,
        reply.generation,
        reply.world_size,
        reply.epoch,
        reply.segment,
        reply.step,
        reply.regroups
    )?;
    if !reply.failure.is_empty() {
        writeln!(out, "failure: {}", reply.failure)?;
    }
    match &reply.last_checkpoint {
        Some(c) => writeln!(
            out,
            "last checkpoint: {} (epoch {} batch {})",
            c.checkpoint, c.epoch, c.batch
        )?,
        None => writeln!(out, "last checkpoint: none")?,
    }
    if reply.pending_checkpoint_batch > 0 {
        writeln!(
            out,
            "requested checkpoint: at batch {}",
            reply.pending_checkpoint_batch
        )?;
    }
    writeln!(
        out,
        "\n{:>5}  {:<32} {:>10} {:>10} {:>9} {:>10} {:>8}  prompts by tokens (<=75/150/225/more)",
        "rank", "worker", "batches", "items/s", "loss", "lr", "seen"
    )?;
    for w in &reply.workers {
        let rank = if w.rank < 0 {
            "-".to_string()
        } else {
            w.rank.to_string()
        };
        let prompts: Vec<String> = w.token_length_counts.iter().map(u64::to_string).collect();
        writeln!(
            out,
            "{rank:>5}  {:<32} {:>4}/{:<5} {:>10.1} {:>9.4} {:>10.3e} {:>7.1}s  {}",
            w.worker_id,
            w.batches_done,
            reply.batches_per_rank,
            w.items_per_second,
            w.loss,
            w.learning_rate,
            w.seconds_since_heartbeat,
            prompts.join("/")
        )?;
    }
    writeln!(out, "\nrecent events:")?;
    for event in reply.recent_events.iter().rev().take(10).rev() {
        writeln!(out, "  {event}")?;
    }
    Ok(())
}
