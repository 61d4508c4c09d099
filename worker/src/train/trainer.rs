//! [`TchTrainer`]: the training loop of `arbor-worker train` (docs/architecture.md §4, §5), driven
//! batch by batch by the worker runtime (`arbor_runtime::runtime::run_worker`) through the
//! [`Trainer`] trait.
//!
//! - `start` (after every formation of the group): the first call loads the model once
//!   ([`TrainingModel`]) and builds AdamW, the EMA, the LR schedule, the batch loader and the
//!   run directory; every call (re)builds the c10d process group of (rank, world size, store
//!   address, generation prefix) — reusing this process's TCPStore when the address is unchanged
//!   — and then either resumes from the coordinator's checkpoint or resets to the initial
//!   weights, so survivors of a failure roll back to the same state as a restarted process.
//! - `train_batch`: load and crop the images at the bucket resolution (arbor-data; failed items
//!   are reported, never fatal), augment and encode the captions, VAE-encode, noise at
//!   per-sample timesteps drawn from a stream seeded by (job seed, epoch, batch, rank), the
//!   diffusion loss, backward, and [`DistributedStep`] (all-reduce, clip, AdamW, EMA) on the
//!   final micro-step of each accumulation window; then metrics, logs, and on rank 0 the
//!   metrics.jsonl and TensorBoard records (`RunLogs`), and the sample grid and loss curve
//!   every `samples.every` steps.
//! - `checkpoint`: this rank's part of `checkpoints/step-<N>/` (rank 0 writes the tensors).
//! - `finish`: rank 0 writes the exports, the final loss curve, the metrics and TensorBoard.
//!
//! Errors come back as strings: a collective error makes the runtime report it to the
//! coordinator, which regroups.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arbor_c10d::aten_ops::cuda_max_memory_allocated;
use arbor_c10d::{Backend, ProcessGroup, Store, StoreAddress};
use arbor_common::assign::{Assigner, BucketedItems};
use arbor_common::buckets::BucketTable;
use arbor_common::config::{JobConfig, LrScheduler};
use arbor_data::batch_loader::{BatchLoader, LoaderOptions};
use arbor_data::latent_cache::LatentCache;
use arbor_data::store::DatasetStore;
use arbor_runtime::batch_fetch::{BatchFetcher, Fetched};
use arbor_runtime::trainer::{Batch, BatchOutcome, GroupInfo, Trainer, ValidationItem};
use tch::{Device, Kind, Tensor};
use tracing::{info, warn};

use crate::error::{Result, WorkerError};
use crate::train::adamw::{AdamW, AdamWConfig};
use crate::train::batch_inputs::{batch_seed, BatchImages, BatchInputs};
use crate::train::cache_fill::CacheFiller;
use crate::train::cached_latents::{cached_latents, log_cache_totals, vae_digest};
use crate::train::caption_augment::CaptionAugment;
use crate::train::checkpoint::{
    copy_tensors_by_name, read_checkpoint, write_checkpoint_part, CheckpointContents,
    CheckpointPosition,
};
use crate::train::distributed_step::{DeviceStepReport, DistributedStep, StepSettings};
use crate::train::ema::Ema;
use crate::train::lr_schedule::LrSchedule;
use crate::train::metrics_log::{MetricsLog, StepMetrics, TokenLengthHistogram};
use crate::train::phase_clock::{Phase, PhaseClock, PhaseSeconds};
use crate::train::run_dir::RunDir;
use crate::train::run_exports::{
    step_exports_prefix, write_exports, TrainingRecord, EXPORTS_PREFIX,
};
use crate::train::sampling::{write_loss_curve, write_samples, SampleSettings};
use crate::train::tensorboard::{tags, TensorBoardLog};
use crate::train::training_model::{TrainingMode, TrainingModel};
use crate::train::validation::rank_validation_sums;

/// Optimizer steps between rewrites of `metrics.jsonl` and flushes of the TensorBoard log (both
/// are also flushed at checkpoints, samples and the end).
const METRICS_FLUSH_EVERY: u64 = 10;
/// Optimizer steps between `step` log lines (the first few steps are always logged), and between
/// the read-backs of the steps' losses: no other step makes the host wait for the device.
const LOG_EVERY: u64 = 10;
/// How long `start` keeps retrying to form the process group before failing.
const GROUP_FORMATION_DEADLINE: Duration = Duration::from_secs(300);

/// How the trainer runs, from the command line.
#[derive(Debug, Clone)]
pub struct TrainerOptions {
    /// The device this rank computes on ([`crate::device::DeviceChoice::resolve`] maps
    /// `--device` and the local rank to it).
    pub device: Device,
    /// `--data-root`: overrides `data.root` and the manifest's folder.
    pub data_root: Option<PathBuf>,
    /// Bound on the group rendezvous and on every collective; `None`: four heartbeat timeouts,
    /// at least 30 s.
    pub collective_timeout: Option<Duration>,
}

impl Default for TrainerOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            data_root: None,
            collective_timeout: None,
        }
    }
}

/// What the process loads once and keeps across regroups.
struct Session {
    config: JobConfig,
    model: TrainingModel,
    trainable: Vec<(String, Tensor)>,
    /// CPU copies of the trainable tensors as first built: a start without a checkpoint
    /// resets to them.
    initial: Vec<(String, Tensor)>,
    optimizer: AdamW,
    ema: Option<Ema>,
    step_driver: DistributedStep,
    lr_schedule: LrSchedule,
    run_dir: RunDir,
    /// Rank 0's metrics.jsonl and TensorBoard log.
    logs: Option<RunLogs>,
    /// Loads the batches, those the runtime announces ahead in the background.
    fetcher: BatchFetcher,
    augment: CaptionAugment,
    samples: SampleSettings,
}

/// Rank 0's logs of the steps: `metrics.jsonl` and the session's TensorBoard event file, appended
/// and flushed together.
struct RunLogs {
    metrics: MetricsLog,
    tensorboard: TensorBoardLog,
}

impl RunLogs {
    /// Opens both for a session resuming at `resume_step` (records after it are dropped from
    /// metrics.jsonl; TensorBoard drops them on the new file's session start).
    fn open(run_dir: &RunDir, resume_step: u64) -> Result<Self> {
        let metrics = MetricsLog::open(run_dir, resume_step)?;
        let history = metrics.records().map(|record| record.loss);
        let tensorboard = TensorBoardLog::open(run_dir, resume_step, history)?;
        Ok(Self {
            metrics,
            tensorboard,
        })
    }

    fn append(&mut self, record: StepMetrics) -> Result<()> {
        self.tensorboard.append_step(&record);
        self.metrics.append(record)
    }

    fn flush(&mut self) -> Result<()> {
        self.metrics.flush()?;
        self.tensorboard.flush()
    }
}

/// The statistics of the accumulation window in progress.
#[derive(Default)]
struct Window {
    micro_batches: u64,
    /// The sum of the micro-batches' losses, on the device (read back with the step's record).
    loss_sum: Option<Tensor>,
    images: u64,
    data_wait_seconds: f64,
    seconds: f64,
    failed_items: u32,
    histogram: TokenLengthHistogram,
    /// The timed phases, when this window's step is timed.
    phases: Option<PhaseSeconds>,
}

/// Optimizer steps whose loss and gradient norm are still on the device: their records are
/// written when the values are read back together, every [`LOG_EVERY`] steps (and at the
/// first steps, checkpoints and sample steps), so the host never waits for the device on the
/// other steps.
#[derive(Default)]
struct PendingSteps {
    /// Each step's record, with `loss` and `grad_norm` still to fill in.
    records: Vec<StepMetrics>,
    /// Each step's mean loss on this rank and its global gradient norm, 0-dim tensors.
    losses: Vec<Tensor>,
    grad_norms: Vec<Tensor>,
    /// Time inside `train` and images trained (this rank) since the last read-back.
    seconds: f64,
    data_wait_seconds: f64,
    images: u64,
}

/// The group as this process is part of it now.
#[derive(Debug, Clone, Default)]
struct RankPosition {
    rank: u32,
    world_size: u32,
    generation: u64,
}

/// The libtorch trainer of `arbor-worker train`.
pub struct TchTrainer {
    options: TrainerOptions,
    session: Option<Session>,
    group: Option<ProcessGroup>,
    /// The TCPStore this process holds (hosts on rank 0), reused across regroups while the
    /// store address stays the same.
    store: Option<Arc<Store>>,
    position: RankPosition,
    /// Optimizer steps done.
    step: u64,
    /// Epochs begun (the 0-based epoch of the last batch trained, plus one).
    epochs_begun: u64,
    /// This rank's share of the validation items (from the coordinator's shard header).
    validation_items: Vec<ValidationItem>,
    /// The latest validation loss and its step, not yet reported in a batch outcome.
    last_validation: Option<(f64, u64)>,
    window: Window,
    pending: PendingSteps,
    last_sampled_step: Option<u64>,
    /// A checkpoint read by `check_checkpoint`, for the `start` that resumes from it.
    checked_checkpoint: Option<(String, CheckpointContents)>,
    /// Set by `start` for a job that only fills the latent cache (`train.fill_cache_only`):
    /// every call goes to it, and nothing else is loaded.
    filler: Option<CacheFiller>,
}

impl std::fmt::Debug for TchTrainer {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("TchTrainer")
            .field("options", &self.options)
            .field("position", &self.position)
            .field("step", &self.step)
            .field("loaded", &self.session.is_some())
            .finish()
    }
}

/// Copies `source` into `destination` tensor by tensor (same order), without autograd.
fn copy_in_place(destination: &[(String, Tensor)], source: &[(String, Tensor)]) {
    tch::no_grad(|| {
        for ((_, target), (_, value)) in destination.iter().zip(source) {
            let mut target = target.shallow_clone();
            target.copy_(value);
        }
    });
}

/// The same tensors (shared storage) under the same names.
fn shallow_clones(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(name, tensor)| (name.clone(), tensor.shallow_clone()))
        .collect()
}

/// Detached CPU copies.
fn cpu_copies(tensors: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
    tensors
        .iter()
        .map(|(name, tensor)| (name.clone(), tensor.detach().to_device(Device::Cpu).copy()))
        .collect()
}

/// Optimizer steps of the whole run: `schedule.max_steps`, else epochs × ⌈batches per rank /
/// grad_accum⌉ computed from a local manifest (bucket assignment and trim as the coordinator
/// plans them); `None` when neither is known (a remote manifest).
pub fn planned_optimizer_steps(config: &JobConfig, world_size: u32) -> Option<u64> {
    let schedule = &config.schedule;
    if let Some(max_steps) = schedule.max_steps {
        return Some(max_steps);
    }
    let file = std::fs::File::open(&config.data.manifest).ok()?;
    let manifest = arbor_common::manifest::read_manifest(std::io::BufReader::new(file)).ok()?;
    let table = BucketTable::new(config.buckets.bucket_params()).ok()?;
    let assigner = Assigner::new(table, config.buckets.assign_params()).ok()?;
    let items = BucketedItems::assign_all(
        &assigner,
        manifest
            .records
            .iter()
            .map(|record| (record.id, record.width, record.height)),
    )
    .ok()?;
    let global_batch = u64::from(world_size.max(1)) * u64::from(schedule.bsz.max(1));
    let batches_per_rank = items.len() as u64 / global_batch;
    // Each epoch's last accumulation window may be short; it still steps the optimizer.
    Some(schedule.epochs * batches_per_rank.div_ceil(u64::from(schedule.grad_accum.max(1))))
}

impl TchTrainer {
    pub fn new(options: TrainerOptions) -> Self {
        Self {
            options,
            session: None,
            group: None,
            store: None,
            position: RankPosition::default(),
            step: 0,
            epochs_begun: 0,
            validation_items: Vec::new(),
            last_validation: None,
            window: Window::default(),
            pending: PendingSteps::default(),
            last_sampled_step: None,
            checked_checkpoint: None,
            filler: None,
        }
    }

    /// Optimizer steps done.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The trainable tensors by (prefixed) name, once started.
    pub fn trainable(&self) -> Option<&[(String, Tensor)]> {
        self.session
            .as_ref()
            .map(|session| session.trainable.as_slice())
    }

    /// The loaded model, once started.
    pub fn model(&self) -> Option<&TrainingModel> {
        self.session.as_ref().map(|session| &session.model)
    }

    fn collective_timeout(&self, config: &JobConfig) -> Duration {
        self.options.collective_timeout.unwrap_or_else(|| {
            Duration::from_secs_f64((4.0 * config.cluster.heartbeat_timeout_s).max(30.0))
        })
    }

    fn load_session(&self, config: &JobConfig) -> Result<Session> {
        let model = TrainingModel::load(config, self.options.device)?;
        let trainable = model.trainable();
        if trainable.is_empty() {
            return Err(WorkerError::Training(format!(
                "mode `{}` has no trainable tensors",
                model.mode.as_str()
            )));
        }
        let initial = cpu_copies(&trainable);
        let optimizer = AdamW::new(shallow_clones(&trainable), adamw_config(config));
        let ema =
            (config.train.ema_decay > 0.0).then(|| Ema::new(&trainable, config.train.ema_decay));
        let step_driver = DistributedStep::new(&trainable, step_settings(config));
        let lr_schedule = lr_schedule(config, 1)?;
        let run_dir = RunDir::open(&config.job.run_dir)?;
        // `--data-root` wins over the job's `data.root` (else the manifest's folder).
        let root = match &self.options.data_root {
            Some(root) => root.display().to_string(),
            None => config.data.dataset_root(),
        };
        let store = DatasetStore::open(&root)?;
        let loader = BatchLoader::new(store, LoaderOptions::default())?;
        let mut fetcher = BatchFetcher::new(loader, config.job.seed)?;
        if config.train.cache_latents {
            let location = config.data.latent_cache_location(&config.job.run_dir);
            let digest = vae_digest(&model.vae_store)?;
            fetcher.use_latent_cache(LatentCache::open(&location)?, &digest);
            info!(cache = %location, vae_digest = %&digest[..16], "latent cache on");
        }
        info!(dataset = %root, run_dir = run_dir.location(), "training session ready");
        Ok(Session {
            config: config.clone(),
            model,
            trainable,
            initial,
            optimizer,
            ema,
            step_driver,
            lr_schedule,
            run_dir,
            logs: None,
            fetcher,
            augment: CaptionAugment::from_config(&config.data),
            samples: SampleSettings::from_config(config)?,
        })
    }

    /// (Re)builds the process group of `group`, retrying until [`GROUP_FORMATION_DEADLINE`].
    fn form_group(&mut self, group: &GroupInfo, device: Device, timeout: Duration) -> Result<()> {
        // Drop the old group first; keep its store for reuse.
        if let Some(old) = self.group.take() {
            self.store = Some(old.store().clone());
        }
        if group.world_size <= 1 {
            return Ok(());
        }
        let backend = collective_backend(device);
        if device.is_cuda() && backend == Backend::Gloo {
            warn!(
                rank = group.rank,
                "arbor-worker was built without the nccl feature: gradients go through Gloo \
                 on the CPU, far slower than NCCL between GPUs; rebuild with --features nccl"
            );
        }
        let address = StoreAddress::parse(&group.store_address)?;
        let rank = group.rank as usize;
        let world_size = group.world_size as usize;
        let deadline = Instant::now() + GROUP_FORMATION_DEADLINE.max(timeout);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let reusable = self.store.take().filter(|store| {
                store.address() == &address && store.is_host() == (group.rank == 0)
            });
            let reused = reusable.is_some();
            let store = match reusable {
                Some(store) => Ok(store),
                None => Store::connect(&address, rank, world_size, timeout).map(Arc::new),
            };
            let formed = store.and_then(|store| {
                let formed = ProcessGroup::with_store(
                    store.clone(),
                    backend,
                    rank,
                    world_size,
                    &group.store_prefix,
                    timeout,
                );
                if formed.is_err() && store.is_host() {
                    // Keep hosting: the other ranks may still be on their way.
                    self.store = Some(store);
                }
                formed
            });
            match formed {
                Ok(process_group) => {
                    info!(
                        rank = group.rank,
                        world_size = group.world_size,
                        generation = group.generation,
                        backend = backend.name(),
                        store = %address,
                        reused_store = reused,
                        attempt,
                        "process group formed"
                    );
                    self.group = Some(process_group);
                    return Ok(());
                }
                Err(error) if Instant::now() < deadline => {
                    warn!(rank = group.rank, attempt, %error, "forming the process group failed; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Loads the checkpoint the coordinator named, or resets to the initial weights.
    fn restore(&mut self, group: &GroupInfo) -> Result<()> {
        let session = self.session.as_mut().ok_or_else(not_started)?;
        let config = &session.config;
        if group.resume_checkpoint.is_empty() {
            copy_in_place(&session.trainable, &session.initial);
            session.optimizer =
                AdamW::new(shallow_clones(&session.trainable), adamw_config(config));
            session.ema = (config.train.ema_decay > 0.0)
                .then(|| Ema::new(&session.trainable, config.train.ema_decay));
            self.step = 0;
            info!(rank = group.rank, "starting from the initial weights");
        } else {
            let key = group.resume_checkpoint.as_str();
            let contents = match self.checked_checkpoint.take() {
                Some((checked, contents)) if checked == key => contents,
                _ => read_checkpoint(&session.run_dir, key)?,
            };
            copy_tensors_by_name(&contents.trainable, &session.trainable, key)?;
            let optimizer_state: HashMap<String, Tensor> = contents.optimizer.into_iter().collect();
            session.optimizer =
                AdamW::new(shallow_clones(&session.trainable), adamw_config(config));
            session
                .optimizer
                .load_state(&optimizer_state, contents.optimizer_steps)?;
            session.ema = match (config.train.ema_decay > 0.0, contents.ema) {
                (false, _) => None,
                (true, Some(shadow)) => {
                    let mut ema = Ema::new(&session.trainable, config.train.ema_decay);
                    let shadow: HashMap<String, Tensor> = shadow.into_iter().collect();
                    ema.load_state(&shadow, contents.ema_updates)?;
                    Some(ema)
                }
                (true, None) => {
                    warn!(
                        checkpoint = key,
                        "the checkpoint has no ema; ema restarts from its weights"
                    );
                    Some(Ema::new(&session.trainable, config.train.ema_decay))
                }
            };
            self.step = contents.position.step;
            if contents.position.step != group.resume_step {
                warn!(
                    checkpoint = key,
                    checkpoint_step = contents.position.step,
                    coordinator_step = group.resume_step,
                    "the checkpoint's step differs from the coordinator's resume step; using the checkpoint's"
                );
            }
            info!(
                rank = group.rank,
                checkpoint = key,
                step = self.step,
                "resumed from checkpoint"
            );
        }
        session.optimizer.zero_grad()?;
        session.step_driver = DistributedStep::new(&session.trainable, step_settings(config));
        self.window = Window::default();
        // Steps not yet read back belong to the abandoned group and are rolled back.
        self.pending = PendingSteps::default();
        if let Some(hypernetwork) = session.model.hypernetwork.as_mut() {
            hypernetwork.info.step = self.step as i64;
        }
        Ok(())
    }

    fn start_group(&mut self, group: &GroupInfo, config: &JobConfig) -> Result<()> {
        if self.session.is_none() {
            let session = self.load_session(config)?;
            self.session = Some(session);
        }
        if let Some(session) = self.session.as_mut() {
            // A new group may plan other items under the same batch numbers.
            session.fetcher.restart(config.job.seed);
            // The coordinator resolves the config once; a regroup hands the same one.
            session.config = config.clone();
            session.lr_schedule = lr_schedule(config, group.world_size)?;
            session.samples = SampleSettings::from_config(config)?;
        }
        self.position = RankPosition {
            rank: group.rank,
            world_size: group.world_size.max(1),
            generation: group.generation,
        };
        let device = self.session.as_ref().ok_or_else(not_started)?.model.device;
        let timeout = self.collective_timeout(config);
        self.form_group(group, device, timeout)?;
        self.restore(group)?;
        let session = self.session.as_mut().ok_or_else(not_started)?;
        session.logs = if group.rank == 0 {
            Some(RunLogs::open(&session.run_dir, self.step)?)
        } else {
            None
        };
        info!(
            rank = group.rank,
            world_size = group.world_size,
            generation = group.generation,
            step = self.step,
            mode = session.model.mode.as_str(),
            "trainer started"
        );
        Ok(())
    }

    fn train(&mut self, batch: &Batch) -> Result<BatchOutcome> {
        let started = Instant::now();
        let rank = self.position.rank;
        let session = self.session.as_mut().ok_or_else(not_started)?;
        let device = session.model.device;
        let time_phases_every = session.config.train.time_phases_every;
        // Every micro-batch of a timed step's window is timed.
        let timed = time_phases_every > 0 && (self.step + 1) % time_phases_every == 0;
        let mut clock = PhaseClock::start(device, timed);
        let seed = session.config.job.seed;
        let fetched = session.fetcher.load(batch)?;
        let data_wait_seconds = started.elapsed().as_secs_f64();
        clock.lap(Phase::DataWait);
        let failures = fetched.failures().to_vec();
        for failure in &failures {
            warn!(rank, item = failure.id, key = %failure.key, reason = %failure.reason, "item failed to load; its slot repeats another item");
        }
        let inputs = match fetched {
            Fetched::Pixels(loaded) => BatchInputs::build(
                &loaded,
                &batch.items,
                &session.augment,
                seed,
                batch.epoch,
                device,
            )?,
            Fetched::Latents(loaded) => BatchInputs::from_latents(
                loaded,
                &batch.items,
                &session.augment,
                seed,
                batch.epoch,
            )?,
        };
        tch::manual_seed(batch_seed(seed, batch.epoch, batch.index, rank));
        self.epochs_begun = batch.epoch + 1;
        let model = &session.model;
        let mut token_lengths = TokenLengthHistogram::default();
        let context = model.encode_prompts(&inputs.captions, Some(&mut token_lengths))?;
        self.window.histogram.merge(&token_lengths);
        let latents = match &inputs.images {
            BatchImages::Pixels(pixels) => model.encode_images(pixels),
            BatchImages::Latents(loaded) => {
                let cached = cached_latents(model, loaded)?;
                let pack_name = format!(
                    "e{}-r{rank}-b{}-{}",
                    batch.epoch,
                    batch.index,
                    unique_suffix()
                );
                session.fetcher.store_latents(pack_name, cached.new_entries);
                cached.latents
            }
        };
        clock.lap(Phase::Encode);
        let noise = model.training_noise(&latents);
        let batch_size = latents.size()[0];
        let timesteps = Tensor::randint(
            model.schedule.num_train_timesteps(),
            [batch_size],
            (Kind::Int64, device),
        );
        let loss = model.loss(&latents, &noise, &timesteps, &context)?;
        clock.lap(Phase::Forward);
        // Each micro-batch weighs 1 / (its window's length), so a window's gradient is the
        // mean over its micro-batches, the epoch's last (shorter) window included.
        let window_len = batch.window_len(session.config.schedule.grad_accum);
        let weight = if inputs.all_failed {
            warn!(
                rank,
                batch = batch.index,
                "every item of the batch failed to load; it does not train"
            );
            0.0
        } else {
            1.0 / window_len as f64
        };
        let detached_loss = loss.detach();
        let weighted_loss = loss * weight;
        let closes_window = batch.closes_window(session.config.schedule.grad_accum);
        session
            .step_driver
            .before_backward(self.group.as_mut(), &weighted_loss, closes_window)?;
        weighted_loss
            .f_backward()
            .map_err(WorkerError::torch("backpropagating the diffusion loss"))?;
        clock.lap(Phase::Backward);
        let learning_rate = session.lr_schedule.learning_rate(self.step);
        let step_report = if closes_window {
            session.step_driver.reduce_closing(self.group.as_mut())?;
            clock.lap(Phase::AllReduce);
            let report = session.step_driver.step_closing(
                &mut session.optimizer,
                session.ema.as_mut(),
                learning_rate,
            )?;
            clock.lap(Phase::Optimizer);
            Some(report)
        } else {
            None
        };
        let failed_items = failures.len() as u32;
        let window = &mut self.window;
        window.micro_batches += 1;
        window.loss_sum = Some(match window.loss_sum.take() {
            Some(sum) => sum + &detached_loss,
            None => detached_loss,
        });
        window.images += batch.items.len() as u64;
        window.data_wait_seconds += data_wait_seconds;
        window.seconds += started.elapsed().as_secs_f64();
        window.failed_items += failed_items;
        if let Some(phases) = clock.seconds() {
            window
                .phases
                .get_or_insert_with(PhaseSeconds::default)
                .add(&phases);
        }
        let mut loss_value = None;
        if let Some(report) = step_report {
            self.step += 1;
            loss_value = self.after_optimizer_step(batch, report, learning_rate)?;
        }
        Ok(BatchOutcome {
            loss: loss_value,
            data_wait_seconds,
            failures: failures.iter().map(ToString::to_string).collect(),
            learning_rate: Some(learning_rate),
            token_length_counts: token_lengths.counts(),
            validation: self.last_validation.take(),
        })
    }

    /// Books the optimizer step just taken; reads the pending steps back (and logs, writes
    /// their metrics and renders samples) when this step is one to read back. Returns the
    /// group's mean loss of this step when it was read back.
    fn after_optimizer_step(
        &mut self,
        batch: &Batch,
        report: DeviceStepReport,
        learning_rate: f64,
    ) -> Result<Option<f64>> {
        let window = std::mem::take(&mut self.window);
        let session = self.session.as_mut().ok_or_else(not_started)?;
        let RankPosition {
            rank,
            world_size,
            generation,
        } = self.position.clone();
        let step = self.step;
        let loss_sum = window
            .loss_sum
            .unwrap_or_else(|| Tensor::from(0.0f32).to_device(session.model.device));
        let pending = &mut self.pending;
        pending
            .losses
            .push(loss_sum / window.micro_batches.max(1) as f64);
        pending.grad_norms.push(report.grad_norm);
        pending.seconds += window.seconds;
        pending.data_wait_seconds += window.data_wait_seconds;
        pending.images += window.images;
        pending.records.push(StepMetrics {
            step,
            epoch: batch.epoch,
            batch: batch.index,
            rank,
            world_size,
            generation,
            loss: f64::NAN,
            lr: learning_rate,
            grad_norm: f64::NAN,
            images_per_second: 0.0,
            data_wait_fraction: 0.0,
            token_length_histogram: window.histogram,
            failed_items: window.failed_items,
            bucket: format!("{}x{}", batch.resolution.width, batch.resolution.height),
            unix_time: unix_time_now(),
            phase_seconds: window.phases,
            peak_memory_bytes: None,
            validation_loss: None,
        });
        if let Some(hypernetwork) = session.model.hypernetwork.as_mut() {
            hypernetwork.info.step = step as i64;
        }
        let every = session.config.samples.every;
        let samples_due = every > 0 && step % every == 0;
        let validation_every = session.config.samples.validation_every;
        let validation_due = session.config.data.has_validation()
            && validation_every > 0
            && step % validation_every == 0;
        // The same decision on every rank: the read-back all-reduces the losses.
        if !(step <= 5 || step % LOG_EVERY == 0 || samples_due || validation_due) {
            return Ok(None);
        }
        if validation_due {
            let validation_loss = self.measure_validation_loss()?;
            if let Some(record) = self.pending.records.last_mut() {
                record.validation_loss = validation_loss;
            }
            self.last_validation = validation_loss.map(|loss| (loss, step));
        }
        let loss = self.read_back_pending_steps()?;
        if samples_due {
            self.write_samples_and_curve();
        }
        Ok(loss)
    }

    /// The group's mean validation loss: this rank's share measured, then (sum, count)
    /// all-reduced. Every rank of the group calls it at the same steps; `None` when no item was
    /// measured anywhere.
    fn measure_validation_loss(&mut self) -> Result<Option<f64>> {
        let session = self.session.as_mut().ok_or_else(not_started)?;
        let started = Instant::now();
        let seed = session.config.job.seed;
        let (sum, count) = rank_validation_sums(
            &mut session.model,
            &mut session.fetcher,
            &self.validation_items,
            seed,
        )?;
        let mut totals = Tensor::from_slice(&[sum, count as f64]);
        if let Some(group) = self.group.as_mut() {
            let device = if group.backend() == Backend::Nccl {
                session.model.device
            } else {
                Device::Cpu
            };
            let mut tensors = [totals.to_device(device)];
            group.all_reduce_sum(&mut tensors)?;
            let [reduced] = tensors;
            totals = reduced.to_device(Device::Cpu);
        }
        let totals = Vec::<f64>::try_from(&totals)
            .map_err(WorkerError::torch("reading the validation loss back"))?;
        let (sum, count) = (totals[0], totals[1]);
        if count < 1.0 {
            warn!(step = self.step, "no validation item could be measured");
            return Ok(None);
        }
        let loss = sum / count;
        info!(
            rank = self.position.rank,
            step = self.step,
            validation_loss = loss,
            items = count as u64,
            seconds = started.elapsed().as_secs_f64(),
            "validation loss"
        );
        Ok(Some(loss))
    }

    /// Reads the pending steps' losses (averaged over the group) and gradient norms back in one
    /// transfer, logs the last step, and appends their records to the metrics on rank 0. Every
    /// rank of the group calls it at the same steps. Returns the last step's loss.
    fn read_back_pending_steps(&mut self) -> Result<Option<f64>> {
        let pending = std::mem::take(&mut self.pending);
        let count = pending.records.len();
        if count == 0 {
            return Ok(None);
        }
        let session = self.session.as_mut().ok_or_else(not_started)?;
        let device = session.model.device;
        let losses = Tensor::f_stack(&pending.losses, 0)
            .and_then(|losses| losses.f_to_kind(Kind::Double))
            .map_err(WorkerError::torch("gathering the steps' losses"))?;
        let mut losses = match self.group.as_mut() {
            // The group's mean loss, so the curve does not depend on rank 0's batches alone.
            Some(group) => {
                let group_device = if group.backend() == Backend::Nccl {
                    device
                } else {
                    Device::Cpu
                };
                let mut tensors = [losses.to_device(group_device)];
                group.all_reduce_mean(&mut tensors)?;
                let [losses] = tensors;
                losses
            }
            None => losses,
        };
        // Gradient norms are the same on every rank (computed from the averaged gradients).
        let grad_norms = Tensor::f_stack(
            &pending
                .grad_norms
                .iter()
                .map(|norm| norm.to_device(losses.device()).to_kind(Kind::Double))
                .collect::<Vec<_>>(),
            0,
        )
        .map_err(WorkerError::torch("gathering the steps' gradient norms"))?;
        losses = Tensor::cat(&[losses, grad_norms], 0);
        let values = Vec::<f64>::try_from(losses.to_device(Device::Cpu))
            .map_err(WorkerError::torch("reading the steps' losses back"))?;
        let peak_memory_bytes = match device {
            Device::Cuda(index) => cuda_max_memory_allocated(index).ok(),
            _ => None,
        };
        let RankPosition {
            rank, world_size, ..
        } = self.position.clone();
        let seconds = pending.seconds.max(1e-9);
        // Ranks step in lockstep: the group's throughput is this rank's times the world size.
        // The rate covers the whole stretch: single steps are not timed on an asynchronous device.
        let images_per_second = pending.images as f64 / seconds * f64::from(world_size);
        let data_wait_fraction = (pending.data_wait_seconds / seconds).clamp(0.0, 1.0);
        let mut records = pending.records;
        for (index, record) in records.iter_mut().enumerate() {
            record.loss = values[index];
            record.grad_norm = values[count + index];
            record.images_per_second = images_per_second;
            record.data_wait_fraction = data_wait_fraction;
        }
        if let Some(last) = records.last_mut() {
            last.peak_memory_bytes = peak_memory_bytes;
            info!(
                rank,
                step = last.step,
                epoch = last.epoch,
                batch = last.batch,
                loss = last.loss,
                lr = last.lr,
                grad_norm = last.grad_norm,
                images_per_second,
                data_wait_fraction,
                bucket = %last.bucket,
                "step"
            );
        }
        for record in &records {
            if !record.loss.is_finite() {
                warn!(
                    rank,
                    step = record.step,
                    loss = record.loss,
                    "the loss is not finite"
                );
            }
        }
        let last_loss = records.last().map(|record| record.loss);
        if let Some(logs) = session.logs.as_mut() {
            for record in records {
                let step = record.step;
                logs.append(record)?;
                if step % METRICS_FLUSH_EVERY == 0 {
                    logs.flush()?;
                }
            }
        }
        Ok(last_loss)
    }

    /// Rank 0: the sample grid of the current step and the loss curve. Failures are logged,
    /// never fatal to training.
    fn write_samples_and_curve(&mut self) {
        let step = self.step;
        let Some(session) = self.session.as_mut() else {
            return;
        };
        let Some(logs) = session.logs.as_mut() else {
            return;
        };
        if let Err(error) = logs.flush() {
            warn!(step, %error, "writing metrics.jsonl or the tensorboard log failed");
        }
        let history = logs.metrics.loss_history();
        let validation = logs.metrics.validation_history();
        if let Err(error) = write_loss_curve(&session.run_dir, &history, &validation) {
            warn!(step, %error, "writing loss.png failed");
        }
        let started = Instant::now();
        match write_samples(&session.run_dir, &mut session.model, &session.samples, step) {
            Ok(Some((key, png))) => {
                info!(step, key = %key, seconds = started.elapsed().as_secs_f64(), "samples written");
                let tensorboard = &mut logs.tensorboard;
                if let Err(error) = tensorboard
                    .append_png(step, tags::SAMPLES, &png)
                    .and_then(|()| tensorboard.flush())
                {
                    warn!(step, %error, "writing the samples to the tensorboard log failed");
                }
            }
            Ok(None) => {}
            Err(error) => warn!(step, %error, "rendering samples failed"),
        }
        self.last_sampled_step = Some(step);
    }

    fn write_checkpoint(&mut self, step: u64, epoch: u64, batch: u64) -> Result<()> {
        // Every rank checkpoints at the same batch: the metrics up to it are read back first.
        self.read_back_pending_steps()?;
        let RankPosition {
            rank,
            world_size,
            generation,
        } = self.position.clone();
        let session = self.session.as_mut().ok_or_else(not_started)?;
        if step != self.step {
            warn!(
                rank,
                runtime_step = step,
                trainer_step = self.step,
                "checkpoint step differs from the trainer's"
            );
        }
        if self.window.micro_batches > 0 {
            warn!(
                rank,
                step,
                pending_micro_batches = self.window.micro_batches,
                "checkpoint inside an accumulation window: its pending gradients are not saved"
            );
        }
        let is_writer = rank == 0;
        let contents = CheckpointContents {
            position: CheckpointPosition {
                step,
                epoch,
                // The runtime does not hand the trainer the plan segment; the coordinator's own
                // record of the checkpoint holds it.
                segment: 0,
                batch,
                generation,
                world_size,
                rank,
                mode: session.model.mode.as_str().to_string(),
            },
            trainable: if is_writer {
                cpu_copies(&session.trainable)
            } else {
                Vec::new()
            },
            optimizer: if is_writer {
                session.optimizer.state_tensors()
            } else {
                Vec::new()
            },
            optimizer_steps: session.optimizer.step_count(),
            ema: session
                .ema
                .as_ref()
                .filter(|_| is_writer)
                .map(Ema::state_tensors),
            ema_updates: session.ema.as_ref().map_or(0, Ema::update_count),
        };
        write_checkpoint_part(&session.run_dir, &contents)?;
        // The latents encoded so far are in the cache before the checkpoint counts as taken,
        // so a job resumed from it does not encode them again.
        session.fetcher.flush_latent_writes();
        log_cache_totals(&session.fetcher, rank, step);
        if let Some(logs) = session.logs.as_mut() {
            logs.flush()?;
        }
        Ok(())
    }

    fn finish_run(&mut self) -> Result<()> {
        self.group = None;
        self.store = None;
        if let Some(session) = self.session.as_mut() {
            session.fetcher.flush_latent_writes();
        }
        // The run's last step is a checkpoint, so this is normally empty; without the group, a
        // remainder is booked with this rank's losses.
        self.read_back_pending_steps()?;
        let step = self.step;
        if self.position.rank != 0 {
            return Ok(());
        }
        let needs_samples = self.last_sampled_step != Some(step) && step > 0;
        if needs_samples {
            self.write_samples_and_curve();
        }
        let Some(session) = self.session.as_mut() else {
            return Ok(());
        };
        if let Some(logs) = session.logs.as_mut() {
            logs.flush()?;
            write_loss_curve(
                &session.run_dir,
                &logs.metrics.loss_history(),
                &logs.metrics.validation_history(),
            )?;
        }
        let record = training_record(session, step, self.epochs_begun, self.position.world_size);
        let keys = write_session_exports(session, EXPORTS_PREFIX, &record)?;
        info!(step, exports = ?keys, run_dir = session.run_dir.location(), "training finished");
        Ok(())
    }
}

/// The session's exports under `folder`, with the EMA weights when EMA is on.
fn write_session_exports(
    session: &Session,
    folder: &str,
    record: &TrainingRecord<'_>,
) -> Result<Vec<String>> {
    let ema_shadow = session.ema.as_ref().map(|ema| shallow_clones(ema.shadow()));
    write_exports(
        &session.run_dir,
        folder,
        &session.model,
        ema_shadow.as_deref(),
        record,
    )
}

/// What the exports record about a run's training so far.
fn training_record<'a>(
    session: &'a Session,
    step: u64,
    epochs_begun: u64,
    world_size: u32,
) -> TrainingRecord<'a> {
    let wants_tags = session.model.mode == TrainingMode::Lora;
    TrainingRecord {
        config: &session.config,
        step,
        epoch: epochs_begun,
        tag_frequency: wants_tags
            .then(|| dataset_tag_frequency(&session.config))
            .flatten(),
        world_size: world_size.max(1),
    }
}

/// The largest manifest whose tags a LoRA export counts (about 10^6 items); the tag frequency of
/// a larger dataset is left out rather than slowing every export down.
const TAG_FREQUENCY_MAX_MANIFEST_BYTES: u64 = 256 << 20;

/// How often each comma-separated tag occurs in the captions of a manifest readable from here;
/// `None` for a remote, unreadable or very large manifest.
fn dataset_tag_frequency(config: &JobConfig) -> Option<BTreeMap<String, u64>> {
    let file = std::fs::File::open(&config.data.manifest).ok()?;
    if file.metadata().ok()?.len() > TAG_FREQUENCY_MAX_MANIFEST_BYTES {
        info!(
            manifest = %config.data.manifest,
            "the manifest is too large to count its tags for the lora metadata"
        );
        return None;
    }
    let manifest = arbor_common::manifest::read_manifest(std::io::BufReader::new(file)).ok()?;
    let mut frequency = BTreeMap::new();
    for record in &manifest.records {
        for tag in record.caption.split(',') {
            let tag = tag.trim();
            if !tag.is_empty() {
                *frequency.entry(tag.to_string()).or_insert(0) += 1;
            }
        }
    }
    Some(frequency)
}

/// A suffix that makes a latent cache pack's name unique across processes and jobs writing to
/// the same cache: the process id and the time in nanoseconds.
fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!("{}-{nanos}", std::process::id())
}

fn unix_time_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// NCCL for CUDA tensors when this build has it, else Gloo.
fn collective_backend(device: Device) -> Backend {
    if device.is_cuda() && Backend::Nccl.is_available() {
        Backend::Nccl
    } else {
        Backend::Gloo
    }
}

fn not_started() -> WorkerError {
    WorkerError::Training("the trainer has not been started".to_string())
}

fn adamw_config(config: &JobConfig) -> AdamWConfig {
    AdamWConfig {
        weight_decay: config.train.weight_decay,
        ..AdamWConfig::default()
    }
}

fn step_settings(config: &JobConfig) -> StepSettings {
    StepSettings {
        grad_accum: config.schedule.grad_accum,
        max_grad_norm: config.train.max_grad_norm,
    }
}

fn lr_schedule(config: &JobConfig, world_size: u32) -> Result<LrSchedule> {
    let total_steps = match planned_optimizer_steps(config, world_size) {
        Some(steps) => steps,
        None => {
            if config.train.lr_scheduler == LrScheduler::Cosine {
                warn!(
                    manifest = %config.data.manifest,
                    "the run's step count is unknown (set schedule.max_steps); the cosine schedule assumes 1000 steps"
                );
            }
            1000
        }
    };
    LrSchedule::from_config(
        &config.train.lr,
        config.train.lr_scheduler,
        config.train.lr_warmup_steps,
        total_steps.max(1),
    )
}

impl Trainer for TchTrainer {
    fn start(&mut self, group: &GroupInfo, config: &JobConfig) -> std::result::Result<(), String> {
        if config.train.fill_cache_only {
            if self.filler.is_none() {
                let filler =
                    CacheFiller::open(config, self.options.device, self.options.data_root.as_ref())
                        .map_err(|error| format!("starting rank {}: {error}", group.rank))?;
                self.filler = Some(filler);
            }
            if let Some(filler) = self.filler.as_mut() {
                filler.start(group, config);
            }
            return Ok(());
        }
        self.start_group(group, config)
            .map_err(|error| format!("starting rank {}: {error}", group.rank))
    }

    fn check_checkpoint(
        &mut self,
        config: &JobConfig,
        checkpoint: &str,
    ) -> std::result::Result<(), String> {
        // A fill resumes from positions only: its work is in the cache.
        if config.train.fill_cache_only {
            return Ok(());
        }
        self.checked_checkpoint = None;
        let run_dir = RunDir::open(&config.job.run_dir).map_err(|error| error.to_string())?;
        let contents = read_checkpoint(&run_dir, checkpoint).map_err(|error| error.to_string())?;
        self.checked_checkpoint = Some((checkpoint.to_string(), contents));
        Ok(())
    }

    fn upcoming(&mut self, batches: &[Batch]) {
        if let Some(filler) = self.filler.as_mut() {
            filler.announce(batches);
        }
        if let Some(session) = self.session.as_mut() {
            session.fetcher.announce(batches);
        }
    }

    fn validation_items(&mut self, items: &[ValidationItem]) {
        self.validation_items = items.to_vec();
    }

    fn train_batch(&mut self, batch: &Batch) -> std::result::Result<BatchOutcome, String> {
        let outcome = match self.filler.as_mut() {
            Some(filler) => filler.fill(batch),
            None => self.train(batch),
        };
        outcome.map_err(|error| {
            format!(
                "rank {} epoch {} batch {}: {error}",
                self.position.rank, batch.epoch, batch.index
            )
        })
    }

    fn checkpoint(&mut self, step: u64, epoch: u64, batch: u64) -> std::result::Result<(), String> {
        if let Some(filler) = self.filler.as_mut() {
            filler.flush(step);
            return Ok(());
        }
        self.write_checkpoint(step, epoch, batch)
            .map_err(|error| format!("checkpoint at step {step}: {error}"))
    }

    fn export(&mut self, step: u64) -> std::result::Result<(), String> {
        if self.filler.is_some() {
            info!(
                step,
                "export requested while filling the latent cache (nothing to export)"
            );
            return Ok(());
        }
        if self.position.rank != 0 {
            return Ok(());
        }
        let session = self
            .session
            .as_ref()
            .ok_or_else(|| not_started().to_string())?;
        let folder = step_exports_prefix(step);
        let record = training_record(session, step, self.epochs_begun, self.position.world_size);
        let keys = write_session_exports(session, &folder, &record)
            .map_err(|error| format!("exporting at step {step}: {error}"))?;
        info!(step, exports = ?keys, run_dir = session.run_dir.location(), "exports written on request");
        Ok(())
    }

    fn finish(&mut self) -> std::result::Result<(), String> {
        if let Some(filler) = self.filler.as_mut() {
            filler.flush(0);
            return Ok(());
        }
        self.finish_run()
            .map_err(|error| format!("finishing the run: {error}"))
    }

    /// NCCL groups re-form by restarting the process: a communicator whose peer died cannot be
    /// relied on to abort in-process. Gloo re-forms under a new store prefix.
    fn regroups_in_process(&self) -> bool {
        collective_backend(self.options.device) == Backend::Gloo
    }
}
