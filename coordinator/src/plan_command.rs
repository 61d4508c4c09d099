//! `arbor plan`: inspect buckets, assignments and epoch plans (docs/architecture.md §2).

use std::io::{BufRead, BufWriter, Write};
use std::process::ExitCode;

use anyhow::Context;
use arbor_common::accumulation::TrainingScale;
use arbor_common::assign::{Assigner, BucketedItems};
use arbor_common::buckets::BucketTable;
use arbor_common::learning_rate::LearningRate;
use arbor_common::plan::EpochPlan;
use arbor_common::sampler::BatchBucket;
use arbor_common::summary::PlanSummary;
use clap::{Args, Subcommand};
use serde_json::json;

use crate::object_file::read_manifest_at;
use crate::plan_flags::{AssignFlags, BucketFlags, EpochFlags};

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Print the bucket table: id, resolution and aspect ratio of every bucket.
    Buckets(BucketsArgs),
    /// Assign image sizes read from stdin (one `W H` or `WxH` per line) to buckets.
    ///
    /// A malformed line is reported with its line number on stderr and skipped; the exit status
    /// is non-zero if any line was malformed.
    Assign(AssignArgs),
    /// Plan one epoch of a manifest: pruning, trimming, per-rank shards and batches.
    Epoch(EpochArgs),
}

#[derive(Debug, Args)]
pub struct BucketsArgs {
    #[command(flatten)]
    buckets: BucketFlags,
    /// Print `{"buckets":[{"id","width","height","aspect"}, …]}` instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct AssignArgs {
    #[command(flatten)]
    buckets: BucketFlags,
    #[command(flatten)]
    assign: AssignFlags,
    /// Print one JSON object per line: width, height, bucket, bucket_width, bucket_height,
    /// ar_error, kept.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct EpochArgs {
    /// The dataset manifest (JSON Lines: id, key, width, height, caption), a path or an
    /// object-store URL.
    #[arg(long)]
    manifest: String,
    #[command(flatten)]
    buckets: BucketFlags,
    #[command(flatten)]
    assign: AssignFlags,
    #[command(flatten)]
    epoch: EpochFlags,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// Also list every rank's batches (bucket, resolution and item ids).
    #[arg(long)]
    batches: bool,
    /// Micro-batches per optimizer step (`schedule.grad_accum`), for the global batch and the
    /// optimizer steps per epoch.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    grad_accum: u32,
    /// The learning rate (`train.lr`), to print beside the global batch it applies to.
    #[arg(long)]
    lr: Option<String>,
}

pub fn run(command: PlanCommand) -> anyhow::Result<ExitCode> {
    match command {
        PlanCommand::Buckets(args) => print_buckets(&args),
        PlanCommand::Assign(args) => assign_stdin(&args),
        PlanCommand::Epoch(args) => plan_epoch(&args),
    }
}

fn print_buckets(args: &BucketsArgs) -> anyhow::Result<ExitCode> {
    let table = args.buckets.table()?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    if args.json {
        let buckets: Vec<_> = table
            .buckets()
            .iter()
            .enumerate()
            .map(|(id, bucket)| {
                json!({"id": id, "width": bucket.width, "height": bucket.height, "aspect": bucket.aspect()})
            })
            .collect();
        serde_json::to_writer(&mut out, &json!({ "buckets": buckets }))?;
        writeln!(out)?;
        return Ok(ExitCode::SUCCESS);
    }
    writeln!(out, "{:>4}  {:>11}  {:>7}", "id", "resolution", "aspect")?;
    for (id, bucket) in table.buckets().iter().enumerate() {
        let base = if id == usize::from(table.base_id()) {
            "  (base_res, catch-all)"
        } else {
            ""
        };
        writeln!(
            out,
            "{id:>4}  {:>11}  {:>7.4}{base}",
            bucket.to_string(),
            bucket.aspect()
        )?;
    }
    writeln!(out, "{} buckets", table.len())?;
    Ok(ExitCode::SUCCESS)
}

/// Parses `W H`, `WxH` or `W,H`.
fn parse_size_line(line: &str) -> Result<(u32, u32), String> {
    let fields: Vec<&str> = line
        .split(|c: char| c.is_whitespace() || c == 'x' || c == 'X' || c == ',')
        .filter(|field| !field.is_empty())
        .collect();
    let [width, height] = fields.as_slice() else {
        return Err(format!("expected `W H` or `WxH`, got `{}`", line.trim()));
    };
    let parse = |side: &str, name: &str| -> Result<u32, String> {
        match side.parse::<u32>() {
            Ok(0) => Err(format!("{name} must be positive")),
            Ok(value) => Ok(value),
            Err(error) => Err(format!("invalid {name} `{side}`: {error}")),
        }
    };
    Ok((parse(width, "width")?, parse(height, "height")?))
}

fn assign_stdin(args: &AssignArgs) -> anyhow::Result<ExitCode> {
    let assigner = args.assign.assigner(&args.buckets)?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut malformed = 0usize;
    for (index, bytes) in std::io::stdin().lock().split(b'\n').enumerate() {
        let line_number = index + 1;
        let bytes = bytes.with_context(|| format!("reading stdin line {line_number}"))?;
        let Ok(line) = String::from_utf8(bytes) else {
            eprintln!("line {line_number}: not UTF-8 text");
            malformed += 1;
            continue;
        };
        if line.trim().is_empty() {
            continue;
        }
        let (width, height) = match parse_size_line(&line) {
            Ok(size) => size,
            Err(reason) => {
                eprintln!("line {line_number}: {reason}");
                malformed += 1;
                continue;
            }
        };
        let assignment = assigner.assign(line_number as u64, width, height)?;
        if args.json {
            let record = json!({
                "width": width,
                "height": height,
                "bucket": assignment.bucket_id,
                "bucket_width": assignment.bucket.width,
                "bucket_height": assignment.bucket.height,
                "ar_error": assignment.ar_error,
                "kept": assignment.kept,
            });
            serde_json::to_writer(&mut out, &record)?;
            writeln!(out)?;
        } else {
            let verdict = if assignment.kept { "kept" } else { "pruned" };
            writeln!(
                out,
                "{width}x{height} -> bucket {} ({}) aspect error {:.4} {verdict}",
                assignment.bucket_id, assignment.bucket, assignment.ar_error
            )?;
        }
    }
    out.flush()?;
    if malformed > 0 {
        eprintln!("{malformed} malformed line(s) skipped");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads a manifest (a path or an object-store URL) and assigns its records; broken lines are
/// reported and skipped.
pub fn load_bucketed_manifest(
    name: &str,
    assigner: &Assigner,
) -> anyhow::Result<(BucketedItems, usize)> {
    let manifest = read_manifest_at(name)?;
    let sizes = manifest
        .records
        .iter()
        .map(|record| (record.id, record.width, record.height));
    let items = BucketedItems::assign_all(assigner, sizes)?;
    Ok((items, manifest.skipped_lines.len()))
}

fn plan_epoch(args: &EpochArgs) -> anyhow::Result<ExitCode> {
    let assigner = args.assign.assigner(&args.buckets)?;
    let table = assigner.table();
    let (items, skipped_lines) = load_bucketed_manifest(&args.manifest, &assigner)?;
    let plan = EpochPlan::new(items.len(), args.epoch.params())?;
    let summary = PlanSummary::compute(&items, table, &plan)?;
    if let Some(lr) = &args.lr {
        LearningRate::parse(lr).context("--lr")?;
    }
    let scale = TrainingScale {
        world_size: args.epoch.world_size,
        bsz: args.epoch.bsz,
        grad_accum: args.grad_accum,
        batches_per_rank: summary.batches_per_rank,
    };
    let mut out = BufWriter::new(std::io::stdout().lock());
    if args.json {
        let mut value = serde_json::to_value(&summary)?;
        value["skipped_manifest_lines"] = json!(skipped_lines);
        value["global_batch"] = json!(scale.global_batch());
        value["grad_accum"] = json!(scale.grad_accum);
        value["steps_per_epoch"] = json!(scale.steps_per_epoch());
        value["learning_rate"] = json!(args.lr);
        if args.batches {
            value["ranks"] = rank_batches_json(&items, table, &plan)?;
        }
        serde_json::to_writer(&mut out, &value)?;
        writeln!(out)?;
    } else {
        write_report(&mut out, &summary, table, skipped_lines)?;
        writeln!(out, "\n{}", scale.describe(args.lr.as_deref()))?;
        if args.batches {
            write_batches(&mut out, &items, table, &plan)?;
        }
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn bucket_label(bucket: BatchBucket) -> serde_json::Value {
    match bucket {
        BatchBucket::Bucket(id) => json!(id),
        BatchBucket::CatchAll => json!("catchall"),
    }
}

fn rank_batches_json(
    items: &BucketedItems,
    table: &BucketTable,
    plan: &EpochPlan,
) -> anyhow::Result<serde_json::Value> {
    let mut ranks = Vec::new();
    for rank in 0..plan.params().world_size {
        let mut sampler = plan.sampler(items, table, rank)?;
        let mut batches = Vec::new();
        while let Some(batch) = sampler.next_batch() {
            let ids: Vec<u64> = batch.positions.iter().map(|&p| items.id(p)).collect();
            batches.push(json!({
                "bucket": bucket_label(batch.bucket),
                "width": batch.resolution.width,
                "height": batch.resolution.height,
                "items": ids,
            }));
        }
        ranks.push(json!({"rank": rank, "batches": batches}));
    }
    Ok(json!(ranks))
}

fn write_report(
    out: &mut impl Write,
    summary: &PlanSummary,
    table: &BucketTable,
    skipped_lines: usize,
) -> anyhow::Result<()> {
    writeln!(
        out,
        "items {}  pruned {}  kept after trim {}  trimmed {}  skipped manifest lines {}",
        summary.items, summary.pruned, summary.kept_after_trim, summary.trimmed, skipped_lines
    )?;
    writeln!(
        out,
        "per rank: {} items, {} batches  (mean aspect error {:.4})",
        summary.items_per_rank, summary.batches_per_rank, summary.mean_aspect_error
    )?;
    writeln!(out, "\nkept items per bucket:")?;
    let largest = summary
        .bucket_items
        .values()
        .copied()
        .max()
        .unwrap_or(0)
        .max(1);
    for (&bucket, &count) in &summary.bucket_items {
        let resolution = table.get(bucket).map(|b| b.to_string()).unwrap_or_default();
        let bar = "#".repeat(((count * 40).div_ceil(largest)) as usize);
        writeln!(out, "{bucket:>4} {resolution:>10} {count:>10}  {bar}")?;
    }
    writeln!(out, "\ncatch-all (trained at {}):", table.base())?;
    for (rank, (items, batches)) in summary
        .catchall_items_per_rank
        .iter()
        .zip(&summary.catchall_batches_per_rank)
        .enumerate()
    {
        writeln!(out, "  rank {rank}: {items} items, {batches} batches")?;
    }
    Ok(())
}

fn write_batches(
    out: &mut impl Write,
    items: &BucketedItems,
    table: &BucketTable,
    plan: &EpochPlan,
) -> anyhow::Result<()> {
    for rank in 0..plan.params().world_size {
        writeln!(out, "\nrank {rank}:")?;
        let mut sampler = plan.sampler(items, table, rank)?;
        while let Some(batch) = sampler.next_batch() {
            let ids: Vec<String> = batch
                .positions
                .iter()
                .map(|&p| items.id(p).to_string())
                .collect();
            let label = match batch.bucket {
                BatchBucket::Bucket(id) => format!("bucket {id}"),
                BatchBucket::CatchAll => "catch-all".to_string(),
            };
            writeln!(
                out,
                "  batch {:>5}  {label:<10} {:>10}  [{}]",
                batch.index,
                batch.resolution.to_string(),
                ids.join(", ")
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size_line;

    #[test]
    fn size_lines_accept_common_spellings() {
        assert_eq!(parse_size_line("1920 1080"), Ok((1920, 1080)));
        assert_eq!(parse_size_line(" 1920x1080 "), Ok((1920, 1080)));
        assert_eq!(parse_size_line("1920\t1080"), Ok((1920, 1080)));
        assert!(parse_size_line("1920").is_err());
        assert!(parse_size_line("0 5")
            .unwrap_err()
            .contains("width must be positive"));
        assert!(parse_size_line("a b").is_err());
        assert!(parse_size_line("1 2 3").is_err());
    }
}
