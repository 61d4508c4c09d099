//! Prometheus metrics and the health endpoint, served over HTTP on `cluster.metrics_listen`.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TokensLabel {
    pub tokens: String,
}

/// Every metric the coordinator exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub workers: Gauge,
    pub world_size: Gauge,
    pub generation: Gauge,
    pub epoch: Gauge,
    pub step: Gauge,
    pub batches_done: Gauge,
    pub items_per_second: Gauge<f64, AtomicU64>,
    pub regroups: Counter,
    pub refused_requests: Family<ReasonLabel, Counter>,
    pub shard_items_streamed: Counter,
    pub learning_rate: Gauge<f64, AtomicU64>,
    pub validation_loss: Gauge<f64, AtomicU64>,
    pub prompts: Family<TokensLabel, Counter>,
    pub non_finite_losses: Counter,
    pub planned_steps: Gauge,
    pub progress_ratio: Gauge<f64, AtomicU64>,
    pub eta_seconds: Gauge<f64, AtomicU64>,
    pub epoch_batches_done: Gauge,
    pub epoch_batches: Gauge,
    pub seconds_since_checkpoint: Gauge<f64, AtomicU64>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("arbor");
        let metrics = Self {
            registry: Arc::new(Registry::default()),
            workers: Gauge::default(),
            world_size: Gauge::default(),
            generation: Gauge::default(),
            epoch: Gauge::default(),
            step: Gauge::default(),
            batches_done: Gauge::default(),
            items_per_second: Gauge::default(),
            regroups: Counter::default(),
            refused_requests: Family::default(),
            shard_items_streamed: Counter::default(),
            learning_rate: Gauge::default(),
            validation_loss: Gauge::default(),
            prompts: Family::default(),
            non_finite_losses: Counter::default(),
            planned_steps: Gauge::default(),
            progress_ratio: Gauge::default(),
            eta_seconds: Gauge::default(),
            epoch_batches_done: Gauge::default(),
            epoch_batches: Gauge::default(),
            seconds_since_checkpoint: Gauge::default(),
        };
        registry.register(
            "workers",
            "Workers known to the coordinator",
            metrics.workers.clone(),
        );
        registry.register(
            "world_size",
            "Ranks in the current group",
            metrics.world_size.clone(),
        );
        registry.register(
            "generation",
            "Current group generation",
            metrics.generation.clone(),
        );
        registry.register("epoch", "Current epoch", metrics.epoch.clone());
        registry.register(
            "step",
            "Optimizer steps at the last complete checkpoint",
            metrics.step.clone(),
        );
        registry.register(
            "batches_done",
            "Batches of the current plan done, summed over ranks",
            metrics.batches_done.clone(),
        );
        registry.register(
            "items_per_second",
            "Items per second, summed over ranks",
            metrics.items_per_second.clone(),
        );
        registry.register(
            "regroups",
            "Regroups since the coordinator started",
            metrics.regroups.clone(),
        );
        registry.register(
            "refused_requests",
            "Requests refused, by reason",
            metrics.refused_requests.clone(),
        );
        registry.register(
            "shard_items_streamed",
            "Shard items streamed to workers",
            metrics.shard_items_streamed.clone(),
        );
        registry.register(
            "learning_rate",
            "Learning rate of rank 0's latest batch",
            metrics.learning_rate.clone(),
        );
        registry.register(
            "validation_loss",
            "Mean loss on the validation items at fixed timesteps and noise, latest measured",
            metrics.validation_loss.clone(),
        );
        registry.register(
            "prompts",
            "Prompts encoded, by token count (without BOS/EOS): up_to_75, 76_to_150, 151_to_225, over_225 (truncated)",
            metrics.prompts.clone(),
        );
        registry.register(
            "non_finite_losses",
            "Heartbeats that reported a NaN or infinite loss (diverged steps)",
            metrics.non_finite_losses.clone(),
        );
        registry.register(
            "planned_steps",
            "Optimizer steps the job is planned to train",
            metrics.planned_steps.clone(),
        );
        registry.register(
            "progress_ratio",
            "Fraction of the planned optimizer steps done",
            metrics.progress_ratio.clone(),
        );
        registry.register(
            "eta_seconds",
            "Seconds to the end of the job at the recent step rate (-1 while unknown)",
            metrics.eta_seconds.clone(),
        );
        registry.register(
            "epoch_batches_done",
            "Batches of the current epoch's plan done by the slowest rank",
            metrics.epoch_batches_done.clone(),
        );
        registry.register(
            "epoch_batches",
            "Batches per rank in the current epoch's plan",
            metrics.epoch_batches.clone(),
        );
        registry.register(
            "seconds_since_checkpoint",
            "Seconds since the last complete checkpoint",
            metrics.seconds_since_checkpoint.clone(),
        );
        Self {
            registry: Arc::new(registry),
            ..metrics
        }
    }

    pub fn refuse(&self, reason: &str) {
        self.refused_requests
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn prompts(&self, tokens: &str, count: u64) {
        self.prompts
            .get_or_create(&TokensLabel {
                tokens: tokens.to_string(),
            })
            .inc_by(count);
    }

    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
