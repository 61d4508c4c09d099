//! `arbor preview --manifest M [plan flags] --epoch E --rank R --batches K --out grid.png`:
//! renders the first K batches of one rank, as they will be trained (after EXIF orientation,
//! cover-resize and crop at the `(seed, epoch, item)` offset), into one PNG grid: one row per
//! batch, each cell labelled `B<bucket> #<item id>` (`C` for catch-all batches, a trailing `!`
//! when the item failed to load and its slot repeats another item).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use arbor_common::assign::BucketedItems;
use arbor_common::plan::EpochPlan;
use arbor_common::sampler::BatchBucket;
use arbor_data::batch_loader::{
    BatchLoader, BatchRequest, LoadItem, LoaderOptions, DEFAULT_MAX_PIXELS,
};
use arbor_data::contact_sheet::{render_sheet, save_png, SheetRow};
use arbor_data::store::DatasetStore;
use clap::Args;
use tracing::warn;

use crate::object_file::{parent_location, read_manifest_at};
use crate::plan_flags::{AssignFlags, BucketFlags, EpochFlags};

/// Flags of `arbor preview`.
#[derive(Debug, Args)]
pub struct PreviewArgs {
    /// The dataset manifest (JSON Lines: id, key, width, height, caption), a path or an
    /// object-store URL.
    #[arg(long)]
    pub manifest: String,
    /// The dataset root the manifest's keys are relative to (a folder or an object-store URL);
    /// defaults to the manifest's header (`image_root`, written by `arbor index` for a manifest
    /// outside its image folder), else the manifest's folder.
    #[arg(long)]
    pub root: Option<String>,
    #[command(flatten)]
    pub buckets: BucketFlags,
    #[command(flatten)]
    pub assign: AssignFlags,
    #[command(flatten)]
    pub epoch: EpochFlags,
    /// The rank whose batches to render.
    #[arg(long, default_value_t = 0)]
    pub rank: u32,
    /// How many batches (from the first) to render.
    #[arg(long, default_value_t = 4)]
    pub batches: u64,
    /// Longer side of each cell in pixels.
    #[arg(long, default_value_t = 256)]
    pub cell: u32,
    /// Images with more pixels are refused as decompression bombs.
    #[arg(long, default_value_t = DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Where to write the PNG grid.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn run(args: PreviewArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        args.batches > 0,
        "invalid parameter `batches`: must be at least 1"
    );
    anyhow::ensure!(
        args.cell >= 16,
        "invalid parameter `cell`: must be at least 16 pixels"
    );
    let assigner = args.assign.assigner(&args.buckets)?;
    let table = assigner.table();
    let manifest = read_manifest_at(&args.manifest)?;
    let keys: HashMap<u64, &str> = manifest
        .records
        .iter()
        .map(|record| (record.id, record.key.as_str()))
        .collect();
    let items = BucketedItems::assign_all(
        &assigner,
        manifest
            .records
            .iter()
            .map(|record| (record.id, record.width, record.height)),
    )?;
    let params = args.epoch.params();
    let plan = EpochPlan::new(items.len(), params)?;
    let mut sampler = plan.sampler(&items, table, args.rank)?;
    let mut requests = Vec::new();
    let mut bucket_labels = Vec::new();
    while let Some(batch) = sampler.next_batch() {
        if requests.len() as u64 >= args.batches {
            break;
        }
        let batch_items = batch
            .positions
            .iter()
            .map(|&position| {
                let id = items.id(position);
                LoadItem {
                    id,
                    key: keys.get(&id).map(|key| key.to_string()).unwrap_or_default(),
                }
            })
            .collect();
        bucket_labels.push(match batch.bucket {
            BatchBucket::Bucket(id) => format!("B{id}"),
            BatchBucket::CatchAll => "C".to_owned(),
        });
        requests.push(BatchRequest {
            items: batch_items,
            bucket_width: batch.resolution.width,
            bucket_height: batch.resolution.height,
            seed: params.seed,
            epoch: params.epoch,
        });
    }
    anyhow::ensure!(
        !requests.is_empty(),
        "rank {} has no batches in epoch {} ({} kept items, world size {}, bsz {})",
        args.rank,
        params.epoch,
        items.len(),
        params.world_size,
        params.bsz
    );

    let root = match (&args.root, &manifest.image_root) {
        (Some(root), _) => root.clone(),
        (None, Some(image_root)) => image_root.clone(),
        (None, None) => parent_location(&args.manifest),
    };
    let store = DatasetStore::open(&root)?;
    let loader = BatchLoader::new(
        store,
        LoaderOptions {
            max_pixels: args.max_pixels,
            ..LoaderOptions::default()
        },
    )?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut loaded = Vec::with_capacity(requests.len());
    for request in &requests {
        loaded.push(runtime.block_on(loader.load_batch(request))?);
    }
    let mut failures = 0;
    let rows: Vec<SheetRow<'_>> = loaded
        .iter()
        .zip(&bucket_labels)
        .map(|(batch, bucket_label)| {
            for failure in &batch.failures {
                failures += 1;
                warn!(item_id = failure.id, key = %failure.key, reason = %failure.reason, "item failed to load");
            }
            let labels = batch
                .items
                .iter()
                .map(|item| {
                    let marker = if item.loaded_id == Some(item.id) { "" } else { " !" };
                    format!("{bucket_label} #{}{marker}", item.id)
                })
                .collect();
            SheetRow { batch, labels }
        })
        .collect();
    let sheet = render_sheet(&rows, args.cell);
    save_png(&sheet, &args.out).map_err(anyhow::Error::msg)?;
    println!(
        "wrote {}: rank {} epoch {}, {} batches of {} ({}x{} pixels), {} failed items",
        args.out.display(),
        args.rank,
        params.epoch,
        rows.len(),
        params.bsz,
        sheet.width(),
        sheet.height(),
        failures
    );
    Ok(ExitCode::SUCCESS)
}
