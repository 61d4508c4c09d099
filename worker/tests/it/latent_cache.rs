//! The latent cache (`train.cache_latents`) end to end: a two-worker job fills it in its first
//! epoch and reads it in the later ones, and a fill interrupted by a SIGKILLed worker ends
//! complete with nothing encoded twice beyond the batches in flight. The cache's contents are
//! read back from its index objects.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arbor_data::store::DatasetStore;
use arbor_testkit::moto::MotoServer;
use arbor_testkit::process::signal;
use serde_json::Value;

use crate::e2e_support::{one_job_at_a_time, Job, JobSpec};

const JOB_LIMIT: Duration = Duration::from_secs(240);

/// Every index entry of the cache at `cache` (a folder): (key, pack) pairs, one per latent
/// written; every pack an index names is there.
fn cache_entries(cache: &Path) -> Vec<(String, String)> {
    if !cache.exists() {
        return Vec::new();
    }
    let store = DatasetStore::open(&cache.display().to_string()).unwrap();
    store_entries(&store)
}

/// [`cache_entries`] of a cache in any store.
fn store_entries(store: &DatasetStore) -> Vec<(String, String)> {
    let runtime = arbor_testkit::runtime();
    let keys = runtime.block_on(store.list_keys()).unwrap();
    let mut entries = Vec::new();
    for (key, _) in &keys {
        if !(key.starts_with("v1/index/") && key.ends_with(".json")) {
            continue;
        }
        let bytes = runtime.block_on(store.get(key)).unwrap();
        let index: Value = serde_json::from_slice(&bytes).unwrap();
        let pack = index["pack"].as_str().unwrap().to_string();
        assert!(
            keys.iter().any(|(other, _)| *other == pack),
            "{key} names a pack that is not there"
        );
        for entry in index["entries"].as_array().unwrap() {
            entries.push((entry["key"].as_str().unwrap().to_string(), pack.clone()));
        }
    }
    entries
}

fn with_cache(job: &Job, cache: &str) {
    let config_path = job.path().join("job.toml");
    let config = std::fs::read_to_string(&config_path).unwrap();
    let config = config
        .replace("[data]\n", &format!("[data]\nlatent_cache = \"{cache}\"\n"))
        .replace("[train]\n", "[train]\ncache_latents = true\n");
    std::fs::write(&config_path, config).unwrap();
}

/// Latents written per key.
fn writes_per_key(entries: &[(String, String)]) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for (key, _) in entries {
        *counts.entry(key.as_str()).or_default() += 1;
    }
    counts
}

/// A hypernetwork job of `spec` with the cache at `<job>/cache`, started with two workers.
fn start_cached_job(spec: JobSpec) -> (Job, PathBuf) {
    let spec = JobSpec {
        mode: "hypernetwork",
        samples_every: 100,
        ..spec
    };
    let mut job = Job::new(&spec);
    let cache = job.path().join("cache");
    with_cache(&job, &cache.display().to_string());
    start(&mut job);
    (job, cache)
}

fn start(job: &mut Job) {
    job.start_coordinator();
    job.start_worker(0);
    job.start_worker(1);
}

/// Waits for the job and every worker to succeed.
fn wait_success(job: &mut Job) {
    job.wait_coordinator_success(JOB_LIMIT);
    for status in job.wait_workers(Duration::from_secs(30)) {
        assert!(
            status.success(),
            "a worker failed: {status}\n{}",
            job.logs()
        );
    }
}

#[test]
fn a_two_worker_job_fills_the_cache_once_and_later_epochs_and_jobs_read_it() {
    let _one = one_job_at_a_time();
    let spec = JobSpec {
        epochs: 3,
        ..JobSpec::default()
    };
    let items = spec.items;
    let (mut job, cache) = start_cached_job(spec);
    wait_success(&mut job);
    job.assert_ledger_exact(2, 1, 4);
    let entries = cache_entries(&cache);
    let counts = writes_per_key(&entries);
    // Each (image, resolution) pair is encoded once: an item trained in a catch-all batch is at
    // another resolution, hence another key, so there are at least as many keys as items.
    assert!(counts.len() >= items, "{counts:?}");
    assert!(
        counts.values().all(|&count| count == 1),
        "latents encoded twice: {counts:?}\n{}",
        job.logs()
    );
    let (hits, misses) = cache_totals(&job, 0..2);
    assert_eq!(
        misses as usize,
        entries.len(),
        "every miss is written once\n{}",
        job.logs()
    );
    assert!(hits > 0, "later epochs read nothing back\n{}", job.logs());

    // A second job over the same images and cache (a fresh run directory): every latent is
    // read back, none is encoded.
    std::fs::remove_dir_all(job.run_dir()).unwrap();
    job.start_coordinator();
    job.start_worker(0);
    job.start_worker(1);
    job.wait_coordinator_success(JOB_LIMIT);
    for status in job.wait_workers(Duration::from_secs(30)) {
        assert!(
            status.success(),
            "a worker failed: {status}\n{}",
            job.logs()
        );
    }
    assert_eq!(
        cache_entries(&cache).len(),
        entries.len(),
        "the second job wrote latents\n{}",
        job.logs()
    );
    let (hits, misses) = cache_totals(&job, 2..4);
    assert_eq!(misses, 0, "{}", job.logs());
    assert!(hits > 0);
}

/// The cache's hits and misses summed over the workers `numbers` (each worker's last "latent
/// cache" line, logged at every checkpoint with the process's running totals).
fn cache_totals(job: &Job, numbers: std::ops::Range<u32>) -> (u64, u64) {
    let field = |line: &str, name: &str| -> u64 {
        let start = line
            .find(&format!(" {name}="))
            .unwrap_or_else(|| panic!("no {name} in {line}"))
            + name.len()
            + 2;
        line[start..]
            .split(|character: char| !character.is_ascii_digit())
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let mut totals = (0, 0);
    for number in numbers {
        let log = job.worker_log(number);
        let line = log
            .lines()
            .rev()
            .find(|line| line.contains("latent cache") && line.contains(" hits="))
            .unwrap_or_else(|| panic!("worker {number} logged no cache totals:\n{log}"));
        totals.0 += field(line, "hits");
        totals.1 += field(line, "misses");
    }
    totals
}

/// SIGKILLs worker 1 once the cache holds 8 latents (fewer than `items`), starts a replacement
/// after the regroup, and waits for the job, the survivor and the replacement to succeed.
/// Returns the latents cached at the kill.
fn kill_mid_fill_and_replace(job: &mut Job, cache: &Path, items: usize) -> usize {
    job.wait_until(Duration::from_secs(120), "a partly filled cache", |_| {
        cache_entries(cache).len() >= 8
    });
    signal(job.workers[1].id(), "-KILL");
    let at_kill = cache_entries(cache).len();
    assert!(
        at_kill < items,
        "the fill ended before the kill ({at_kill} latents)"
    );
    job.wait_until(
        Duration::from_secs(60),
        "the regroup after the kill",
        |job| job.coordinator_log().contains("regroup: "),
    );
    job.start_worker(1);
    job.wait_coordinator_success(JOB_LIMIT);
    let statuses = job.wait_workers(Duration::from_secs(30));
    assert!(statuses[0].success(), "the survivor failed\n{}", job.logs());
    assert!(
        statuses[2].success(),
        "the replacement failed\n{}",
        job.logs()
    );
    at_kill
}

#[test]
fn a_fill_with_a_worker_sigkilled_mid_epoch_ends_complete_with_little_encoded_twice() {
    let _one = one_job_at_a_time();
    let spec = JobSpec {
        items: 36,
        epochs: 2,
        checkpoint_every: 3,
        ..JobSpec::default()
    };
    let (items, epochs, in_flight) = (spec.items, spec.epochs, 2 * spec.bsz as usize);
    let (mut job, cache) = start_cached_job(spec);
    let at_kill = kill_mid_fill_and_replace(&mut job, &cache, items);
    for epoch in 0..epochs {
        job.assert_ledger_exact(epoch, 1, 4);
    }
    let entries = cache_entries(&cache);
    let counts = writes_per_key(&entries);
    eprintln!(
        "{at_kill} latents cached at the kill, {} keys after",
        counts.len()
    );
    // Complete: every item has its latent (at least one key per item).
    assert!(counts.len() >= items, "{counts:?}");
    // The killed rank's batch in flight (its pack not yet written) and the survivor's may be
    // encoded again after the regroup; nothing else.
    let twice: usize = counts.values().map(|&count| count - 1).sum();
    assert!(
        twice <= in_flight,
        "{twice} latents encoded twice (at most {in_flight} in flight): {counts:?}\n{}",
        job.logs()
    );
}

#[test]
fn the_cache_works_on_an_s3_server() {
    let _one = one_job_at_a_time();
    let mut server = MotoServer::start();
    server.create_bucket("arbor-cache");
    let spec = JobSpec {
        epochs: 2,
        mode: "hypernetwork",
        samples_every: 100,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    let location = "s3://arbor-cache/shared/latents";
    with_cache(&job, location);
    job.worker_env = server.environment();
    start(&mut job);
    wait_success(&mut job);
    let store = DatasetStore::open_with_options(location, server.options()).unwrap();
    let entries = store_entries(&store);
    let counts = writes_per_key(&entries);
    assert!(counts.len() >= spec.items, "{counts:?}\n{}", job.logs());
    assert!(
        counts.values().all(|&count| count == 1),
        "latents encoded twice: {counts:?}\n{}",
        job.logs()
    );
    let (hits, misses) = cache_totals(&job, 0..2);
    assert_eq!(misses as usize, entries.len(), "{}", job.logs());
    assert!(
        hits > 0,
        "the second epoch read nothing back\n{}",
        job.logs()
    );
    server.stop();
}

#[test]
fn arbor_cache_fills_ahead_of_training_and_survives_a_killed_worker() {
    let _one = one_job_at_a_time();
    let spec = JobSpec {
        items: 60,
        epochs: 1,
        checkpoint_every: 3,
        mode: "hypernetwork",
        samples_every: 100,
        ..JobSpec::default()
    };
    let mut job = Job::new(&spec);
    let cache = job.path().join("cache");
    with_cache(&job, &cache.display().to_string());
    job.start_coordinator_command("cache");
    job.start_worker(0);
    job.start_worker(1);
    let at_kill = kill_mid_fill_and_replace(&mut job, &cache, spec.items);
    // The fill's own run directory; the training one is untouched.
    assert!(job.run_dir().join("cache-fill/state.json").is_file());
    assert!(!job.run_dir().join("checkpoints").exists());
    let entries = cache_entries(&cache);
    let counts = writes_per_key(&entries);
    eprintln!("{at_kill} latents at the kill, {} after", counts.len());
    let twice: usize = counts.values().map(|&count| count - 1).sum();
    assert!(
        twice <= 2 * spec.bsz as usize,
        "{twice} latents encoded twice: {counts:?}\n{}",
        job.logs()
    );
    // The fill's workers loaded no UNet and trained nothing.
    let fill_log = job.worker_log(0);
    assert!(fill_log.contains("filling the latent cache"), "{fill_log}");
    assert!(!fill_log.contains("trainer started"), "{fill_log}");

    // Training then finds its first epoch cached: every item of the epoch is a hit.
    start(&mut job);
    job.wait_coordinator_success(JOB_LIMIT);
    let statuses = job.wait_workers(Duration::from_secs(30));
    assert!(
        statuses[3..].iter().all(|status| status.success()),
        "a training worker failed: {statuses:?}\n{}",
        job.logs()
    );
    let (hits, misses) = cache_totals(&job, 3..5);
    assert_eq!(misses, 0, "{}", job.logs());
    assert!(hits >= spec.items as u64 - 4, "{hits} hits\n{}", job.logs());
    assert_eq!(cache_entries(&cache).len(), entries.len());
}

/// The cache's pieces on the tiny model: the stored distribution is the fresh encode's (within
/// f16 rounding), the latent crop against the encoding of the pixel crop (reported, bounded),
/// the crops replay, and a changed image, bucket or VAE misses exactly where it should.
mod pieces {
    use std::path::Path;

    use arbor_common::config::JobConfig;
    use arbor_data::batch_loader::{BatchLoader, BatchRequest, LoadItem, LoaderOptions};
    use arbor_data::latent_batch::{load_latent_batch, LatentBatch, LatentSource};
    use arbor_data::latent_cache::LatentCache;
    use arbor_data::store::DatasetStore;
    use arbor_worker::train::cached_latents::{item_distributions, vae_digest, LatentEncoder};
    use arbor_worker::train::training_model::TrainingModel;
    use tch::{Device, Kind, Tensor};

    use crate::e2e_support::tiny_model;

    /// (width, height) of the test images: none has the bucket's aspect ratio exactly.
    const SIZES: [(u32, u32); 3] = [(80, 100), (100, 72), (70, 64)];

    fn write_image(path: &Path, width: u32, height: u32, phase: u32) {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([
                ((x * 7 + phase * 13) % 256) as u8,
                ((y * 5 + x * 3) % 256) as u8,
                (((x ^ y) * 11 + phase) % 256) as u8,
            ])
        });
        image.save(path).unwrap();
    }

    fn tiny_training_model() -> TrainingModel {
        let text = format!(
            "[job]\nname = \"cache\"\nrun_dir = \"/nonexistent/run\"\n[data]\nmanifest = \"/nonexistent/m.jsonl\"\n[model]\npath = \"{}\"\nmode = \"finetune\"\n[train]\nmixed_precision = \"fp32\"\n",
            tiny_model().dir.display()
        );
        TrainingModel::load(&JobConfig::load(&text, &[]).unwrap(), Device::Cpu).unwrap()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        data: std::path::PathBuf,
        cache_dir: std::path::PathBuf,
        loader: BatchLoader,
        runtime: tokio::runtime::Runtime,
    }

    impl Fixture {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let data = dir.path().join("data");
            std::fs::create_dir_all(&data).unwrap();
            for (index, (width, height)) in SIZES.iter().enumerate() {
                write_image(
                    &data.join(format!("{index}.png")),
                    *width,
                    *height,
                    index as u32,
                );
            }
            let store = DatasetStore::open(&data.display().to_string()).unwrap();
            let loader = BatchLoader::new(store, LoaderOptions::default()).unwrap();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            Self {
                cache_dir: dir.path().join("cache"),
                _dir: dir,
                data,
                loader,
                runtime,
            }
        }

        fn cache(&self) -> LatentCache {
            LatentCache::open(&self.cache_dir.display().to_string()).unwrap()
        }

        fn load(
            &self,
            cache: &LatentCache,
            bucket: (u32, u32),
            epoch: u64,
            digest: &str,
        ) -> LatentBatch {
            let request = BatchRequest {
                items: (0..SIZES.len())
                    .map(|index| LoadItem {
                        id: 100 + index as u64,
                        key: format!("{index}.png"),
                    })
                    .collect(),
                bucket_width: bucket.0,
                bucket_height: bucket.1,
                seed: 9,
                epoch,
            };
            self.runtime
                .block_on(load_latent_batch(&self.loader, cache, &request, digest))
                .unwrap()
        }

        /// Encodes what `batch` misses and writes it; returns the distributions.
        fn fill(
            &self,
            model: &TrainingModel,
            cache: &LatentCache,
            batch: &LatentBatch,
        ) -> Vec<Tensor> {
            let (distributions, new_entries) =
                item_distributions(&LatentEncoder::of_model(model), batch).unwrap();
            self.runtime
                .block_on(cache.write_pack("test", &new_entries))
                .unwrap();
            distributions
        }
    }

    fn cached_count(batch: &LatentBatch) -> usize {
        batch
            .items
            .iter()
            .filter(|item| matches!(item.source, LatentSource::Cached { .. }))
            .count()
    }

    #[test]
    fn cached_latents_equal_a_fresh_encode_and_crops_replay_and_track_pixel_crops() {
        let fixture = Fixture::new();
        let model = tiny_training_model();
        let digest = vae_digest(&model.vae_store).unwrap();
        let cache = fixture.cache();
        let first = fixture.load(&cache, (64, 64), 0, &digest);
        assert_eq!(cached_count(&first), 0);
        assert!(first.failures.is_empty(), "{:?}", first.failures);
        let encoded = fixture.fill(&model, &cache, &first);

        // A new handle (another worker) reads every latent back.
        let reader = fixture.cache();
        let second = fixture.load(&reader, (64, 64), 0, &digest);
        assert_eq!(cached_count(&second), SIZES.len());
        let (read_back, new_entries) =
            item_distributions(&LatentEncoder::of_model(&model), &second).unwrap();
        assert!(new_entries.is_empty());
        for (index, item) in first.items.iter().enumerate() {
            let LatentSource::Encode { pixels } = &item.source else {
                unreachable!()
            };
            let geometry = item.geometry;
            let image = Tensor::from_slice(pixels).view([
                1,
                3,
                i64::from(geometry.encoded_height),
                i64::from(geometry.encoded_width),
            ]);
            let fresh = tch::no_grad(|| model.vae.encode(&image));
            let fresh = Tensor::cat(&[&fresh.mean, &fresh.logvar], 1).squeeze_dim(0);
            let stored = read_back[index].to_kind(Kind::Float);
            assert_eq!(stored.size(), fresh.size());
            assert!(
                read_back[index].equal(&encoded[index]),
                "the read-back bytes differ"
            );
            // f16 keeps 11 significant bits: a relative error of at most 2^-11, plus the
            // subnormal step near zero.
            let error = (&stored - &fresh).abs();
            let bound = fresh.abs() * (2f64.powi(-11)) + 6e-8;
            let excess = (error - bound).max().double_value(&[]);
            assert!(
                excess <= 0.0,
                "item {index}: off by more than f16 rounding ({excess})"
            );

            // The crops replay, and the latent crop tracks the encoding of the pixel crop.
            assert_eq!(item.crop, second.items[index].crop);
            let (latent_width, latent_height) = first.latent_size();
            let crop = item.crop;
            let latent_crop = fresh
                .narrow(0, 0, 4)
                .narrow(1, i64::from(crop.y), i64::from(latent_height))
                .narrow(2, i64::from(crop.x), i64::from(latent_width));
            let pixel_crop =
                image
                    .narrow(2, i64::from(crop.y * 8), 64)
                    .narrow(3, i64::from(crop.x * 8), 64);
            let of_crop = tch::no_grad(|| model.vae.encode(&pixel_crop))
                .mean
                .squeeze_dim(0);
            let relative_rms = |left: &Tensor, right: &Tensor| {
                let difference = (left - right).square().mean(Kind::Float).sqrt();
                difference.double_value(&[])
                    / right.square().mean(Kind::Float).sqrt().double_value(&[])
            };
            let interior = |latent: &Tensor| {
                latent.narrow(1, 1, i64::from(latent_height) - 2).narrow(
                    2,
                    1,
                    i64::from(latent_width) - 2,
                )
            };
            let whole = relative_rms(&latent_crop, &of_crop);
            let inside = relative_rms(&interior(&latent_crop), &interior(&of_crop));
            // For scale: the crop one latent pixel to the side (along the axis with room)
            // against the same encoding.
            let (latent_x, latent_y) = (fresh.size()[2], fresh.size()[1]);
            let step = |offset: u32, room: i64| {
                if offset > 0 {
                    i64::from(offset) - 1
                } else if room > 0 {
                    1
                } else {
                    0
                }
            };
            let shifted = fresh
                .narrow(0, 0, 4)
                .narrow(
                    1,
                    if latent_x > i64::from(latent_width) {
                        i64::from(crop.y)
                    } else {
                        step(crop.y, latent_y - i64::from(latent_height))
                    },
                    i64::from(latent_height),
                )
                .narrow(
                    2,
                    if latent_x > i64::from(latent_width) {
                        step(crop.x, latent_x - i64::from(latent_width))
                    } else {
                        i64::from(crop.x)
                    },
                    i64::from(latent_width),
                );
            let shifted = relative_rms(&shifted, &of_crop);
            eprintln!(
                "item {index}: latent crop vs encoding of the pixel crop: relative RMS {whole:.4} (interior {inside:.4}; shifted by one latent pixel {shifted:.4}) latent {:?}",
                fresh.size()
            );
            // Border effects of the VAE's receptive field: on the tiny model's 8x8 latents they
            // reach most of the crop, and still the latent crop is about three times closer to
            // the encoding of the pixel crop than a crop one latent pixel away is.
            assert!(whole < 0.45, "item {index}: relative RMS {whole}");
            assert!(
                whole <= 0.5 * shifted || shifted == 0.0,
                "item {index}: {whole} vs {shifted}"
            );
        }
        // Other epochs crop elsewhere.
        let offsets: std::collections::HashSet<_> = (0..8)
            .map(|epoch| fixture.load(&reader, (64, 64), epoch, &digest).items[1].crop)
            .collect();
        assert!(offsets.len() > 1, "{offsets:?}");
    }

    #[test]
    fn a_changed_image_bucket_or_vae_invalidates_exactly_its_entries() {
        let fixture = Fixture::new();
        let model = tiny_training_model();
        let digest = vae_digest(&model.vae_store).unwrap();
        let cache = fixture.cache();
        let first = fixture.load(&cache, (64, 64), 0, &digest);
        fixture.fill(&model, &cache, &first);
        assert_eq!(
            cached_count(&fixture.load(&cache, (64, 64), 1, &digest)),
            SIZES.len()
        );
        // One image rewritten with other pixels: only it misses.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_image(&fixture.data.join("1.png"), SIZES[1].0, SIZES[1].1, 77);
        let changed = fixture.load(&cache, (64, 64), 1, &digest);
        assert_eq!(cached_count(&changed), SIZES.len() - 1);
        assert!(matches!(
            changed.items[1].source,
            LatentSource::Encode { .. }
        ));
        // Another bucket or another VAE: every item misses.
        assert_eq!(cached_count(&fixture.load(&cache, (64, 96), 1, &digest)), 0);
        assert_eq!(
            cached_count(&fixture.load(&cache, (64, 64), 1, "another-vae")),
            0
        );
        // The digest follows the VAE's weights.
        let other = tiny_training_model();
        tch::no_grad(|| {
            let mut variables = other.vae_store.variables();
            let (_, first_tensor) = variables.iter_mut().next().unwrap();
            let _ = first_tensor.g_add_scalar_(1e-3);
        });
        assert_ne!(vae_digest(&other.vae_store).unwrap(), digest);
        assert_eq!(vae_digest(&model.vae_store).unwrap(), digest);
    }
}
