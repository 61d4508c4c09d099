//! `arbor index SRC --out MANIFEST`: indexes a dataset (a folder or an object-store prefix)
//! into the JSON Lines manifest of DESIGN §7, with a JSON report of every skipped file.
//!
//! The exit status is 0 whenever the manifest was written, skips or not; the summary line on
//! stdout says how many files were written and how many were skipped, by reason.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use arbor_data::batch_loader::DEFAULT_MAX_PIXELS;
use arbor_data::indexer::{index_dataset, IndexOptions, IndexOutcome, IndexProgress};
use arbor_data::skip_reason::{counts_by_reason, skip_summary};
use arbor_data::store::DatasetStore;
use clap::Args;
use serde::Serialize;
use tracing::{info, warn};

/// Flags of `arbor index`.
#[derive(Debug, Clone, Args)]
pub struct IndexArgs {
    /// The dataset root: a folder (or file:// URL), or s3://bucket/prefix, gs://…, az://…
    /// (credentials and endpoints from the usual AWS_*, GOOGLE_*, AZURE_* variables).
    pub src: String,
    /// Where to write the manifest (JSON Lines).
    #[arg(long)]
    pub out: PathBuf,
    /// Where to write the JSON report of skipped files (without it, each skip is logged).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Objects read at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Images with more pixels are skipped as decompression bombs (Pillow's default cap).
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Sidecar caption extensions, tried in order.
    #[arg(long, value_delimiter = ',', default_value = "txt,caption")]
    pub caption_extensions: Vec<String>,
    /// Index images without a sidecar caption with an empty caption (counted) instead of
    /// skipping them.
    #[arg(long)]
    pub allow_missing_captions: bool,
}

/// The JSON report written by `--report`.
#[derive(Debug, Serialize)]
struct IndexReport<'a> {
    source: &'a str,
    manifest: String,
    images_found: usize,
    written: usize,
    skipped_count: usize,
    counts_by_reason: std::collections::BTreeMap<&'static str, usize>,
    skipped: &'a [arbor_data::skip_reason::SkippedFile],
    uncaptioned: &'a [String],
}

pub fn run(args: IndexArgs) -> anyhow::Result<ExitCode> {
    let options = IndexOptions {
        concurrency: args.concurrency,
        max_pixels: args.max_pixels,
        caption_extensions: args.caption_extensions.clone(),
        require_captions: !args.allow_missing_captions,
        ..IndexOptions::default()
    };
    options.validate()?;
    let store = DatasetStore::open(&args.src)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let progress = ProgressDisplay::new();
    let started = Instant::now();
    let outcome = runtime
        .block_on(index_dataset(&store, &options, &|update| {
            progress.update(update)
        }))
        .with_context(|| format!("indexing {}", args.src))?;
    progress.finish();

    write_manifest(&args.out, &outcome)?;
    if let Some(report_path) = &args.report {
        write_report(report_path, &args, &outcome)?;
    } else {
        for skipped in &outcome.skipped {
            warn!(key = %skipped.key, reason = skipped.reason.name(), detail = %skipped.detail, "file skipped");
        }
    }
    if !outcome.uncaptioned.is_empty() {
        warn!(
            count = outcome.uncaptioned.len(),
            "images indexed with an empty caption (no sidecar found)"
        );
    }
    info!(
        seconds = started.elapsed().as_secs_f64(),
        images = outcome.images_found,
        "index finished"
    );
    println!(
        "indexed {}: {} images found, {} written to {}, {}{}",
        args.src,
        outcome.images_found,
        outcome.records.len(),
        args.out.display(),
        skip_summary(&outcome.skipped),
        if outcome.uncaptioned.is_empty() {
            String::new()
        } else {
            format!(", {} without caption", outcome.uncaptioned.len())
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes the manifest next to its final path, then renames it, so a reader never sees half.
fn write_manifest(path: &Path, outcome: &IndexOutcome) -> anyhow::Result<()> {
    let temporary = temporary_path(path);
    let file = std::fs::File::create(&temporary)
        .with_context(|| format!("creating manifest {}", temporary.display()))?;
    let mut writer = std::io::BufWriter::new(file);
    for record in &outcome.records {
        serde_json::to_writer(&mut writer, record)?;
        writer.write_all(b"\n")?;
    }
    writer
        .into_inner()
        .map_err(|error| error.into_error())
        .and_then(|file| file.sync_all())
        .with_context(|| format!("writing manifest {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("renaming manifest into {}", path.display()))?;
    Ok(())
}

fn write_report(path: &Path, args: &IndexArgs, outcome: &IndexOutcome) -> anyhow::Result<()> {
    let report = IndexReport {
        source: &args.src,
        manifest: args.out.display().to_string(),
        images_found: outcome.images_found,
        written: outcome.records.len(),
        skipped_count: outcome.skipped.len(),
        counts_by_reason: counts_by_reason(&outcome.skipped)
            .into_iter()
            .map(|(reason, count)| (reason.name(), count))
            .collect(),
        skipped: &outcome.skipped,
        uncaptioned: &outcome.uncaptioned,
    };
    let temporary = temporary_path(path);
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&temporary, text + "\n")
        .with_context(|| format!("writing report {}", temporary.display()))?;
    std::fs::rename(&temporary, path)
        .with_context(|| format!("renaming report into {}", path.display()))?;
    Ok(())
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".partial");
    path.with_file_name(name)
}

/// A progress bar on a terminal, periodic log lines otherwise.
enum ProgressDisplay {
    Bar(indicatif::ProgressBar),
    Log(Mutex<Instant>),
}

impl ProgressDisplay {
    fn new() -> Self {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} indexing [{bar:40}] {pos}/{len} images ({per_sec}, eta {eta})",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            ProgressDisplay::Bar(bar)
        } else {
            ProgressDisplay::Log(Mutex::new(Instant::now()))
        }
    }

    fn update(&self, progress: IndexProgress) {
        match self {
            ProgressDisplay::Bar(bar) => {
                bar.set_length(progress.total as u64);
                bar.set_position(progress.done as u64);
            }
            ProgressDisplay::Log(last) => {
                let Ok(mut last) = last.lock() else {
                    return;
                };
                if progress.done == progress.total || last.elapsed() >= Duration::from_secs(5) {
                    *last = Instant::now();
                    info!(done = progress.done, total = progress.total, "indexing");
                }
            }
        }
    }

    fn finish(&self) {
        if let ProgressDisplay::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
