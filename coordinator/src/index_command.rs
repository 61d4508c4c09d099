//! `arbor index SRC --out MANIFEST`: indexes a dataset (a folder or an object-store prefix)
//! into the JSON Lines manifest of docs/architecture.md §7, with a JSON report of every skipped
//! file.
//!
//! The exit status is 0 whenever the manifest was written, skips or not; the summary line on
//! stdout says how many files were written and how many were skipped, by reason. A manifest
//! written outside the indexed folder starts with a header naming it ([`image_root_for`]).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use arbor_common::manifest::ManifestHeader;
use arbor_data::batch_loader::DEFAULT_MAX_PIXELS;
use arbor_data::indexer::{index_dataset, IndexOptions, IndexOutcome, IndexProgress};
use arbor_data::skip_reason::{counts_by_reason, skip_summary};
use arbor_data::store::DatasetStore;
use clap::Args;
use serde::Serialize;
use tracing::{info, warn};

use crate::object_file::{is_object_url, parent_location, write_all};

/// Flags of `arbor index`.
#[derive(Debug, Clone, Args)]
pub struct IndexArgs {
    /// The dataset root: a folder (or file:// URL), or s3://bucket/prefix, gs://…, az://…
    /// (credentials and endpoints from the usual AWS_*, GOOGLE_*, AZURE_* variables).
    pub src: String,
    /// Where to write the manifest (JSON Lines): a path or an object-store URL such as
    /// s3://bucket/prefix/manifest.jsonl.
    #[arg(long)]
    pub out: String,
    /// Where to write the JSON report of skipped files, a path or an object-store URL (without
    /// it, each skip is logged).
    #[arg(long)]
    pub report: Option<String>,
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

    let image_root = image_root_for(&args.src, &args.out)?;
    write_manifest(&args.out, image_root.as_deref(), &outcome)?;
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
    if let Some(image_root) = &image_root {
        println!(
            "the manifest is outside {image_root}: its header records that folder as the image root"
        );
    }
    println!(
        "indexed {}: {} images found, {} written to {}, {}{}",
        args.src,
        outcome.images_found,
        outcome.records.len(),
        args.out,
        skip_summary(&outcome.skipped),
        if outcome.uncaptioned.is_empty() {
            String::new()
        } else {
            format!(", {} without caption", outcome.uncaptioned.len())
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// What the manifest's header records as the image root: nothing when the manifest sits in the
/// folder (or prefix) it indexes, so the pair can move together; otherwise the source as an
/// absolute path or its URL, so the manifest can live anywhere.
pub fn image_root_for(src: &str, out: &str) -> anyhow::Result<Option<String>> {
    let trimmed = |location: &str| location.trim_end_matches('/').to_string();
    let local = |location: &str| -> Option<PathBuf> {
        if let Some(path) = location.strip_prefix("file://") {
            return Some(PathBuf::from(path));
        }
        (!is_object_url(location)).then(|| PathBuf::from(location))
    };
    let absolute = |path: &Path| -> anyhow::Result<PathBuf> {
        let path = if path.as_os_str().is_empty() {
            Path::new(".")
        } else {
            path
        };
        path.canonicalize()
            .with_context(|| format!("resolving {}", path.display()))
    };
    let out_folder = parent_location(out);
    match (local(src), local(&out_folder)) {
        (Some(src_path), Some(out_path)) => {
            let src_path = absolute(&src_path)?;
            if absolute(&out_path)? == src_path {
                return Ok(None);
            }
            Ok(Some(src_path.display().to_string()))
        }
        (Some(src_path), None) => Ok(Some(absolute(&src_path)?.display().to_string())),
        (None, _) if trimmed(src) == trimmed(&out_folder) => Ok(None),
        (None, _) => Ok(Some(trimmed(src))),
    }
}

/// Writes the manifest whole and atomically ([`crate::object_file::write_all`]), with a header
/// line naming the image root when there is one.
fn write_manifest(
    name: &str,
    image_root: Option<&str>,
    outcome: &IndexOutcome,
) -> anyhow::Result<()> {
    let mut bytes = Vec::with_capacity(outcome.records.len() * 128 + 256);
    if let Some(image_root) = image_root {
        let header = ManifestHeader {
            image_root: image_root.to_string(),
        };
        bytes.extend_from_slice(header.to_line().as_bytes());
        bytes.push(b'\n');
    }
    for record in &outcome.records {
        serde_json::to_writer(&mut bytes, record)?;
        bytes.push(b'\n');
    }
    write_all(name, bytes, "manifest")
}

fn write_report(name: &str, args: &IndexArgs, outcome: &IndexOutcome) -> anyhow::Result<()> {
    let report = IndexReport {
        source: &args.src,
        manifest: args.out.clone(),
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
    let text = serde_json::to_string_pretty(&report)? + "\n";
    write_all(name, text.into_bytes(), "report")
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

#[cfg(test)]
mod image_root_tests {
    use super::image_root_for;

    #[test]
    fn a_manifest_beside_its_images_records_no_root_and_one_elsewhere_records_the_source() {
        let same = |src: &str, out: &str| image_root_for(src, out).unwrap();
        assert_eq!(
            same("s3://bucket/ds/", "s3://bucket/ds/manifest.jsonl"),
            None
        );
        assert_eq!(
            same("s3://bucket/ds", "s3://bucket/ds/manifest.jsonl"),
            None
        );
        assert_eq!(
            same("s3://bucket/ds/", "s3://bucket/meta/manifest.jsonl").as_deref(),
            Some("s3://bucket/ds")
        );
        assert_eq!(
            same("gs://bucket/ds", "/tmp/manifest.jsonl").as_deref(),
            Some("gs://bucket/ds")
        );
        let folder = tempfile::tempdir().unwrap();
        let images = folder.path().join("images");
        std::fs::create_dir(&images).unwrap();
        let images_text = images.display().to_string();
        assert_eq!(
            same(&images_text, &images.join("m.jsonl").display().to_string()),
            None
        );
        assert_eq!(
            same(
                &format!("{images_text}/"),
                &format!("file://{images_text}/m.jsonl")
            ),
            None
        );
        let recorded = same(
            &images_text,
            &folder.path().join("m.jsonl").display().to_string(),
        );
        assert_eq!(
            recorded.map(std::path::PathBuf::from),
            Some(images.canonicalize().unwrap())
        );
    }
}
