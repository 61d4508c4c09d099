//! Benchmark: the latent cache on CPU. One training step of the small SD-topology UNet
//! (`support/bench_unet.rs`, full fine-tune, fused AdamW) on a batch served from the cache
//! (`train.cache_latents`: a ranged read per item, a latent-space crop, a posterior sample),
//! against the same step on the same items with JPEG decode, cover resize, crop and VAE encode,
//! side by side in interleaved rounds. Then the latents read per second with one runtime
//! thread (one core): from the local disk, and from the moto S3 test server (a Python server on
//! loopback, so a floor, not an S3 figure).
//!
//! The images are generated JPEGs of `--image WxH` in a `--bucket` square bucket; the VAE is
//! SD1's topology at reduced widths (32/64/64/64 channels, one layer per block), so its share of
//! the step is in proportion to the small UNet's, as SD1.5's VAE is to its UNet's.
//!
//!     cargo bench -p arbor-worker --bench latent_cache -- [--rounds N] [--steps N]
//!         [--batch N] [--items N] [--bucket N] [--image WxH] [--threads N] [--no-s3]

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use arbor_data::batch_loader::{BatchLoader, BatchRequest, LoadItem, LoaderOptions};
use arbor_data::latent_batch::{load_latent_batch, LatentBatch};
use arbor_data::latent_cache::LatentCache;
use arbor_data::store::DatasetStore;
use arbor_testkit::moto::MotoServer;
use arbor_worker::ddpm::DdpmSchedule;
use arbor_worker::train::adamw::AdamW;
use arbor_worker::train::cached_latents::{
    cropped_posterior, item_distributions, vae_digest, LatentEncoder,
};
use arbor_worker::train::train_step::{adamw, optimizer_step, DiffusionBatch};
use arbor_worker::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use arbor_worker::vae::{AutoencoderKL, AutoencoderKLConfig};
use object_store::PutPayload;
use tch::{nn, Device, Kind, Tensor};

// Only the UNet config and the median are used here.
#[allow(dead_code)]
#[path = "support/bench_unet.rs"]
mod bench_unet;
use bench_unet::{median, unet_config_json};

const LEARNING_RATE: f64 = 1e-4;
const SEED: u64 = 7;

struct Options {
    rounds: usize,
    steps: usize,
    batch: usize,
    items: usize,
    bucket: u32,
    image: (u32, u32),
    threads: i32,
    s3: bool,
}

fn parse_options() -> Result<Options> {
    let mut options = Options {
        rounds: 3,
        steps: 4,
        batch: 4,
        items: 32,
        bucket: 128,
        image: (400, 300),
        threads: 2,
        s3: true,
    };
    let mut arguments = std::env::args().skip(1);
    while let Some(argument) = arguments.next() {
        let mut value = |name: &str| {
            arguments
                .next()
                .with_context(|| format!("{name} needs a value"))
        };
        match argument.as_str() {
            "--rounds" => options.rounds = value("--rounds")?.parse()?,
            "--steps" => options.steps = value("--steps")?.parse()?,
            "--batch" => options.batch = value("--batch")?.parse()?,
            "--items" => options.items = value("--items")?.parse()?,
            "--bucket" => options.bucket = value("--bucket")?.parse()?,
            "--threads" => options.threads = value("--threads")?.parse()?,
            "--image" => {
                let text = value("--image")?;
                let (width, height) = text
                    .split_once('x')
                    .with_context(|| format!("--image {text}: expected WxH"))?;
                options.image = (width.parse()?, height.parse()?);
            }
            "--no-s3" => options.s3 = false,
            // cargo bench passes --bench to every harness-less target.
            "--bench" => {}
            other => bail!("unknown option {other}"),
        }
    }
    if options.bucket % 64 != 0 || options.batch == 0 || options.items < options.batch {
        bail!("--bucket must be a multiple of 64 and --items at least --batch (at least 1)");
    }
    Ok(options)
}

/// SD1's VAE topology at reduced widths.
fn bench_vae_config() -> Result<AutoencoderKLConfig> {
    let value = serde_json::json!({
        "block_out_channels": [32, 64, 64, 64],
        "down_block_types": vec!["DownEncoderBlock2D"; 4],
        "up_block_types": vec!["UpDecoderBlock2D"; 4],
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "sample_size": 128,
    });
    Ok(AutoencoderKLConfig::from_diffusers_value(
        &value,
        Path::new("<bench vae>"),
    )?)
}

/// Writes `count` JPEGs of `width x height` with smooth gradients and noise under `folder`.
fn write_images(folder: &Path, count: usize, (width, height): (u32, u32)) -> Result<()> {
    for index in 0..count {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            let noise =
                (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ index as u32) % 23;
            image::Rgb([
                ((x * 255 / width) as u8).wrapping_add(noise as u8),
                ((y * 255 / height) as u8).wrapping_add((index * 37) as u8),
                (((x + y) * 127 / (width + height)) as u8).wrapping_add(noise as u8 * 2),
            ])
        });
        image.save(folder.join(format!("{index:04}.jpg")))?;
    }
    Ok(())
}

struct Model {
    unet: UNet2DConditionModel,
    _unet_store: nn::VarStore,
    vae: AutoencoderKL,
    vae_store: nn::VarStore,
    optimizer: AdamW,
    schedule: DdpmSchedule,
    context: Tensor,
}

impl Model {
    fn new() -> Result<Self> {
        tch::manual_seed(0);
        let config =
            UNet2DConditionConfig::from_diffusers_value(&unet_config_json(), Path::new("bench"))?;
        let unet_store = nn::VarStore::new(Device::Cpu);
        let unet = UNet2DConditionModel::new(unet_store.root(), &config);
        let mut vae_store = nn::VarStore::new(Device::Cpu);
        let vae = AutoencoderKL::new(vae_store.root(), &bench_vae_config()?);
        vae_store.freeze();
        let optimizer = adamw(&unet_store, 0.01);
        Ok(Self {
            unet,
            _unet_store: unet_store,
            vae,
            vae_store,
            optimizer,
            schedule: DdpmSchedule::sd1(),
            context: Tensor::randn([1, 77, 768], (Kind::Float, Device::Cpu)),
        })
    }

    fn encoder(&self) -> LatentEncoder<'_> {
        LatentEncoder {
            vae: &self.vae,
            device: Device::Cpu,
            autocast_bf16: false,
        }
    }

    /// One UNet step on `latents` (already scaled).
    fn train(&mut self, latents: &Tensor) -> Result<f64> {
        let batch_size = latents.size()[0];
        let noise = latents.randn_like();
        let timesteps = Tensor::randint(1000, [batch_size], (Kind::Int64, Device::Cpu));
        let context = self.context.expand([batch_size, 77, 768], false);
        let batch = DiffusionBatch {
            latents,
            noise: &noise,
            timesteps: &timesteps,
            encoder_hidden_states: &context,
        };
        Ok(optimizer_step(
            &mut self.optimizer,
            LEARNING_RATE,
            &self.unet,
            &self.schedule,
            &batch,
            None,
        )?)
    }
}

fn request(options: &Options, batch_number: usize) -> BatchRequest {
    let first = batch_number * options.batch % (options.items - options.batch + 1);
    BatchRequest {
        items: (first..first + options.batch)
            .map(|index| LoadItem {
                id: index as u64,
                key: format!("{index:04}.jpg"),
            })
            .collect(),
        bucket_width: options.bucket,
        bucket_height: options.bucket,
        seed: SEED,
        epoch: 1,
    }
}

fn fetch_runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?)
}

/// The step with decode, resize, crop and VAE encode: ms.
fn pixel_step(
    model: &mut Model,
    loader: &BatchLoader,
    runtime: &tokio::runtime::Runtime,
    request: &BatchRequest,
) -> Result<f64> {
    let start = Instant::now();
    let loaded = runtime.block_on(loader.load_batch(request))?;
    let pixels = Tensor::from_slice(&loaded.pixels).view([
        loaded.len() as i64,
        3,
        i64::from(loaded.bucket_height),
        i64::from(loaded.bucket_width),
    ]);
    let latents = tch::no_grad(|| model.vae.encode(&pixels).sample() * model.vae.scaling_factor());
    model.train(&latents)?;
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// The step served from the cache: ms.
fn cached_step(
    model: &mut Model,
    loader: &BatchLoader,
    cache: &LatentCache,
    digest: &str,
    runtime: &tokio::runtime::Runtime,
    request: &BatchRequest,
) -> Result<f64> {
    let start = Instant::now();
    let loaded = runtime.block_on(load_latent_batch(loader, cache, request, digest))?;
    let (distributions, new_entries) = item_distributions(&model.encoder(), &loaded)?;
    if !new_entries.is_empty() {
        bail!("the cache missed {} items", new_entries.len());
    }
    let posterior = cropped_posterior(&loaded, &distributions, 4, Device::Cpu)?;
    let latents = tch::no_grad(|| posterior.sample() * model.vae.scaling_factor());
    model.train(&latents)?;
    Ok(start.elapsed().as_secs_f64() * 1000.0)
}

/// Encodes every item into `cache` (untimed).
fn fill(
    model: &Model,
    loader: &BatchLoader,
    cache: &LatentCache,
    digest: &str,
    runtime: &tokio::runtime::Runtime,
    options: &Options,
) -> Result<()> {
    for first in (0..options.items).step_by(options.batch) {
        let request = BatchRequest {
            items: (first..(first + options.batch).min(options.items))
                .map(|index| LoadItem {
                    id: index as u64,
                    key: format!("{index:04}.jpg"),
                })
                .collect(),
            ..request(options, 0)
        };
        let loaded: LatentBatch =
            runtime.block_on(load_latent_batch(loader, cache, &request, digest))?;
        let (_, new_entries) = item_distributions(&model.encoder(), &loaded)?;
        runtime.block_on(cache.write_pack(&format!("bench-{first}"), &new_entries))?;
    }
    Ok(())
}

/// Latents read per second with one runtime thread: every item, `passes` times.
fn read_rate(
    loader: &BatchLoader,
    cache: &LatentCache,
    digest: &str,
    options: &Options,
    passes: usize,
) -> Result<f64> {
    let runtime = fetch_runtime(1)?;
    runtime.block_on(cache.refresh())?;
    let batches = options.items.div_ceil(options.batch);
    let start = Instant::now();
    let mut read = 0;
    for _ in 0..passes {
        for batch in 0..batches {
            let request = request(options, batch);
            let loaded = runtime.block_on(load_latent_batch(loader, cache, &request, digest))?;
            read += loaded.items.len();
        }
    }
    Ok(read as f64 / start.elapsed().as_secs_f64())
}

/// Copies every object of `from` to `to`.
fn copy_store(
    from: &DatasetStore,
    to: &DatasetStore,
    runtime: &tokio::runtime::Runtime,
) -> Result<()> {
    for (key, _) in runtime.block_on(from.list_keys())? {
        let bytes = runtime.block_on(from.get(&key))?;
        runtime.block_on(
            to.object_store()
                .put(&to.object_path(&key), PutPayload::from(bytes)),
        )?;
    }
    Ok(())
}

fn main() -> Result<()> {
    let options = parse_options()?;
    tch::set_num_threads(options.threads);
    let folder = tempfile::tempdir()?;
    let images = folder.path().join("images");
    std::fs::create_dir_all(&images)?;
    write_images(&images, options.items, options.image)?;
    let mut model = Model::new()?;
    let digest = vae_digest(&model.vae_store)?;
    let loader_options = LoaderOptions {
        decode_threads: options.threads as usize,
        ..LoaderOptions::default()
    };
    let dataset = DatasetStore::open(&images.display().to_string())?;
    let loader = BatchLoader::new(dataset.clone(), loader_options.clone())?;
    let cache_location = folder.path().join("cache").display().to_string();
    let cache = LatentCache::open(&cache_location)?;
    let runtime = fetch_runtime(2)?;
    fill(&model, &loader, &cache, &digest, &runtime, &options)?;

    // Interleaved rounds: the pixel path, then the cached one, on the same batches.
    let (mut pixel_times, mut cached_times) = (Vec::new(), Vec::new());
    for round in 0..options.rounds {
        for step in 0..options.steps + usize::from(round == 0) {
            let request = request(&options, step);
            let pixel = pixel_step(&mut model, &loader, &runtime, &request)?;
            let cached = cached_step(&mut model, &loader, &cache, &digest, &runtime, &request)?;
            // The first step of the first round warms both paths up.
            if round > 0 || step > 0 {
                pixel_times.push(pixel);
                cached_times.push(cached);
            }
        }
    }
    let (pixel, cached) = (median(&pixel_times), median(&cached_times));
    println!(
        "latent cache step (batch {} at {}x{} from {}x{} JPEGs, {} threads, small SD1 UNet + VAE)",
        options.batch,
        options.bucket,
        options.bucket,
        options.image.0,
        options.image.1,
        options.threads
    );
    println!(
        "  decode + resize + VAE encode + step: {pixel:8.1} ms (median of {})",
        pixel_times.len()
    );
    println!(
        "  served from the cache + step:        {cached:8.1} ms (median of {})",
        cached_times.len()
    );
    println!("  ratio cached / uncached: {:.3}x", cached / pixel);

    let local_rate = read_rate(
        &loader,
        &LatentCache::open(&cache_location)?,
        &digest,
        &options,
        5,
    )?;
    println!("latents read per second, one runtime thread: local disk {local_rate:.0}/s");
    if options.s3 {
        let mut server = MotoServer::start();
        server.create_bucket("arbor-bench");
        let s3_images =
            DatasetStore::open_with_options("s3://arbor-bench/images", server.options())?;
        let s3_cache = DatasetStore::open_with_options("s3://arbor-bench/cache", server.options())?;
        copy_store(&dataset, &s3_images, &runtime)?;
        let s3_loader = BatchLoader::new(s3_images, loader_options)?;
        // The keys follow the content tags, and S3's ETags are not the local files': the S3
        // cache is filled through the S3 loader (untimed), then read by a fresh handle.
        fill(
            &model,
            &s3_loader,
            &LatentCache::from_store(s3_cache.clone()),
            &digest,
            &runtime,
            &options,
        )?;
        let rate = read_rate(
            &s3_loader,
            &LatentCache::from_store(s3_cache),
            &digest,
            &options,
            2,
        )?;
        println!("                                            moto S3 server {rate:.0}/s (head + ranged get per item)");
        server.stop();
    }
    Ok(())
}
