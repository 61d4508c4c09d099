//! What happens after a micro-batch's backward pass (docs/architecture.md §4 "Loop", §5): on
//! the final micro-step of a gradient-accumulation window the gradients are averaged across the group in
//! ~25 MiB buckets in reverse parameter order (skipped without a group, i.e. world size 1), their
//! global L2 norm is clipped, AdamW steps at the scheduled learning rate, the EMA follows, and
//! the gradients are zeroed for the next window. On the other micro-steps nothing happens: the
//! gradients keep accumulating locally and no collective runs, as DDP's `no_sync`.
//!
//! The caller divides each micro-batch's loss by `grad_accum` before its backward, so the
//! accumulated gradient is the mean over the window; with the mean over ranks on top, `W` ranks
//! with `grad_accum` micro-batches of `b` samples give the gradient of one batch of
//! `W · grad_accum · b` samples.
//!
//! Overlap: when the caller announces the final micro-step's backward pass
//! ([`DistributedStep::before_backward`]), the averaging runs during that pass instead, through
//! c10d's Reducer ([`arbor_c10d::GradientReducer`], DDP's engine: the same buckets, each
//! all-reduced from an autograd hook as soon as its gradients are ready, unused parameters
//! handled as DDP's `find_unused_parameters`), and the after-backward step only clips and steps.
//! Without the announcement the bucketed all-reduce below runs after the pass.
//!
//! Parameters without a gradient: torch's AdamW skips a parameter whose gradient is `None` (one
//! the loss never reached). Ranks must still agree on what they all-reduce, so with a group every
//! rank first sums a small mask of which parameters have a gradient. Parameters that have none on
//! any rank stay without one (and AdamW skips them, as with one rank); a parameter with a gradient
//! on some rank gets a zero gradient on the others before the average. The buckets are planned
//! over the parameters that take part, and re-planned only when that set changes.

use arbor_c10d::{
    is_final_micro_step, GradientBuckets, GradientReducer, ProcessGroup, DEFAULT_BUCKET_CAP_BYTES,
};
use tch::{Device, Kind, Tensor};

use crate::error::{Result, WorkerError};
use crate::train::adamw::AdamW;
use crate::train::ema::Ema;
use crate::train::grad_clip::clip_grad_norm_on_device;

/// The part of the schedule the optimizer step needs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSettings {
    /// Micro-batches per optimizer step (0 is treated as 1).
    pub grad_accum: u32,
    /// The global gradient norm is clipped to this; 0 (or less) only measures it.
    pub max_grad_norm: f64,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The global L2 norm of the averaged gradients, before clipping (may be non-finite; the
    /// step is taken anyway, as torch's `clip_grad_norm_` with `error_if_nonfinite=False`).
    pub grad_norm: f64,
    /// The optimizer's step count after this step.
    pub optimizer_steps: u64,
}

/// [`StepReport`] before anything is read back from the device.
#[derive(Debug)]
pub struct DeviceStepReport {
    /// The global L2 norm of the averaged gradients before clipping, a 0-dim tensor.
    pub grad_norm: Tensor,
    /// The optimizer's step count after this step.
    pub optimizer_steps: u64,
}

/// The bucket plan for the parameters that currently take part in the all-reduce.
struct BucketPlan {
    participating: Vec<bool>,
    indices: Vec<usize>,
    buckets: GradientBuckets,
}

/// The post-backward half of a training step, for one rank.
pub struct DistributedStep {
    parameters: Vec<(String, Tensor)>,
    settings: StepSettings,
    bucket_cap_bytes: usize,
    plan: Option<BucketPlan>,
    /// The reducer of the group (by store prefix) that overlaps the all-reduce with backward.
    reducer: Option<(String, GradientReducer)>,
    /// Whether the backward pass just run was armed: its gradients are already averaged.
    reduced_during_backward: bool,
    /// Per group (store prefix): whether every parameter had a gradient on some rank at the
    /// last post-backward average. The reducer is built after one such average, and looks for
    /// unused parameters (an extra graph traversal per step) only when some were.
    every_parameter_used: Option<(String, bool)>,
}

impl std::fmt::Debug for DistributedStep {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DistributedStep")
            .field("parameters", &self.parameters.len())
            .field("settings", &self.settings)
            .field("bucket_cap_bytes", &self.bucket_cap_bytes)
            .finish()
    }
}

impl DistributedStep {
    /// `parameters` are the trainable variables in model order (the same list, by name and
    /// order, that the optimizer and the EMA were built from). Buckets hold 25 MiB.
    pub fn new(parameters: &[(String, Tensor)], settings: StepSettings) -> Self {
        Self::with_bucket_cap(parameters, settings, DEFAULT_BUCKET_CAP_BYTES)
    }

    /// As [`DistributedStep::new`] with another bucket size (tests use small ones to get many
    /// buckets).
    pub fn with_bucket_cap(
        parameters: &[(String, Tensor)],
        settings: StepSettings,
        bucket_cap_bytes: usize,
    ) -> Self {
        let parameters: Vec<(String, Tensor)> = parameters
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.shallow_clone()))
            .collect();
        let mut step = Self {
            parameters,
            settings,
            bucket_cap_bytes,
            plan: None,
            reducer: None,
            reduced_during_backward: false,
            every_parameter_used: None,
        };
        // Plan for every parameter up front; re-planned only if some never get a gradient.
        let everything = vec![true; step.parameters.len()];
        step.plan = Some(step.plan_for(everything));
        step
    }

    /// Call before a micro-batch's backward pass from `loss`, with whether it closes the
    /// accumulation window (the same on every rank). On a closing pass of a group of more than
    /// one rank, the gradients are averaged during the pass (see the module docs), and
    /// [`DistributedStep::after_backward_closing`] skips its own all-reduce.
    pub fn before_backward(
        &mut self,
        group: Option<&mut ProcessGroup>,
        loss: &Tensor,
        closes_window: bool,
    ) -> Result<()> {
        self.reduced_during_backward = false;
        let Some(group) = group else {
            return Ok(());
        };
        if !closes_window || group.world_size() < 2 {
            return Ok(());
        }
        let current = self
            .reducer
            .as_ref()
            .is_some_and(|(prefix, _)| prefix == group.prefix());
        let Some(every_parameter_used) = self
            .every_parameter_used
            .as_ref()
            .filter(|(prefix, _)| prefix == group.prefix())
            .map(|(_, used)| *used)
        else {
            // The group's first window averages after the pass and learns which are used.
            return Ok(());
        };
        if !current {
            let tensors: Vec<Tensor> = self
                .parameters
                .iter()
                .map(|(_, tensor)| tensor.shallow_clone())
                .collect();
            let find_unused = !every_parameter_used;
            let reducer =
                GradientReducer::new(group, &tensors, self.bucket_cap_bytes, find_unused)?;
            tracing::info!(
                rank = group.rank(),
                world_size = group.world_size(),
                parameters = tensors.len(),
                find_unused,
                "gradient averaging now overlaps the backward pass (c10d Reducer)"
            );
            self.reducer = Some((group.prefix().to_string(), reducer));
        }
        if let Some((_, reducer)) = self.reducer.as_mut() {
            reducer.prepare_for_backward(std::slice::from_ref(loss))?;
            self.reduced_during_backward = true;
        }
        Ok(())
    }

    /// Whether the gradient averaging now runs during the closing backward passes (a reducer
    /// exists for the group).
    pub fn reduces_during_backward(&self) -> bool {
        self.reducer.is_some()
    }

    pub fn settings(&self) -> StepSettings {
        self.settings
    }

    /// The micro-batches per optimizer step (at least 1).
    pub fn grad_accum(&self) -> u64 {
        u64::from(self.settings.grad_accum.max(1))
    }

    /// Parameter indices per bucket, in all-reduce order, of the current plan.
    pub fn buckets(&self) -> Vec<Vec<usize>> {
        let Some(plan) = &self.plan else {
            return Vec::new();
        };
        plan.buckets
            .buckets()
            .iter()
            .map(|bucket| bucket.iter().map(|&local| plan.indices[local]).collect())
            .collect()
    }

    fn plan_for(&self, participating: Vec<bool>) -> BucketPlan {
        let indices: Vec<usize> = participating
            .iter()
            .enumerate()
            .filter_map(|(index, takes_part)| takes_part.then_some(index))
            .collect();
        let tensors: Vec<Tensor> = indices
            .iter()
            .map(|&index| self.parameters[index].1.shallow_clone())
            .collect();
        BucketPlan {
            buckets: GradientBuckets::plan(&tensors, self.bucket_cap_bytes),
            participating,
            indices,
        }
    }

    /// Call after every micro-batch's backward. `micro_step` counts the micro-batches done
    /// before this one in the run (globally, across optimizer steps and epochs). On the final
    /// micro-step of an accumulation window: all-reduce (mean) the gradients when `group` has more
    /// than one rank, clip, step the optimizer at `learning_rate`, update the EMA, zero the
    /// gradients, and return the report; otherwise return `None` and leave the gradients be.
    /// A collective error (a dead or stalled peer) is returned, never waited on forever: the
    /// group's timeout bounds it.
    pub fn after_backward(
        &mut self,
        group: Option<&mut ProcessGroup>,
        optimizer: &mut AdamW,
        ema: Option<&mut Ema>,
        learning_rate: f64,
        micro_step: u64,
    ) -> Result<Option<StepReport>> {
        let window = self.grad_accum();
        let Ok(micro_step_index) = usize::try_from(micro_step) else {
            return Err(WorkerError::Input {
                name: "micro_step".to_string(),
                message: format!("{micro_step} does not fit this platform's usize"),
            });
        };
        let closes_window = is_final_micro_step(micro_step_index, window as usize);
        self.after_backward_closing(group, optimizer, ema, learning_rate, closes_window)
    }

    /// [`DistributedStep::after_backward`] with the window's end decided by the caller: the
    /// trainer closes a window every `grad_accum` batches of an epoch and at the epoch's last
    /// batch (`arbor_runtime::trainer::Batch::closes_window`). `closes_window` must be the same
    /// on every rank.
    pub fn after_backward_closing(
        &mut self,
        group: Option<&mut ProcessGroup>,
        optimizer: &mut AdamW,
        ema: Option<&mut Ema>,
        learning_rate: f64,
        closes_window: bool,
    ) -> Result<Option<StepReport>> {
        if !closes_window {
            return Ok(None);
        }
        self.reduce_closing(group)?;
        let report = self.step_closing(optimizer, ema, learning_rate)?;
        let grad_norm = report
            .grad_norm
            .f_double_value(&[])
            .map_err(WorkerError::torch("measuring the gradient norm"))?;
        Ok(Some(StepReport {
            grad_norm,
            optimizer_steps: report.optimizer_steps,
        }))
    }

    /// The all-reduce of a closing micro-batch: averages the gradients over the group, unless
    /// they were averaged during the backward pass. The first half of
    /// [`DistributedStep::after_backward_closing`], for callers that time the two halves.
    pub fn reduce_closing(&mut self, group: Option<&mut ProcessGroup>) -> Result<()> {
        let reduced = std::mem::take(&mut self.reduced_during_backward);
        if let Some(group) = group {
            if group.world_size() > 1 && !reduced {
                self.average_gradients(group)?;
            }
        }
        Ok(())
    }

    /// The optimizer step of a closing micro-batch, after [`DistributedStep::reduce_closing`]:
    /// clip, AdamW, EMA and zeroing the gradients. Nothing waits for the device: the gradient
    /// norm comes back as a 0-dim tensor.
    pub fn step_closing(
        &mut self,
        optimizer: &mut AdamW,
        ema: Option<&mut Ema>,
        learning_rate: f64,
    ) -> Result<DeviceStepReport> {
        let tensors: Vec<Tensor> = self
            .parameters
            .iter()
            .map(|(_, tensor)| tensor.shallow_clone())
            .collect();
        let grad_norm = clip_grad_norm_on_device(&tensors, self.settings.max_grad_norm)?;
        optimizer.step(learning_rate)?;
        if let Some(ema) = ema {
            ema.update(&self.parameters)?;
        }
        optimizer.zero_grad()?;
        tracing::debug!(
            optimizer_steps = optimizer.step_count(),
            learning_rate,
            "optimizer step"
        );
        Ok(DeviceStepReport {
            grad_norm,
            optimizer_steps: optimizer.step_count(),
        })
    }

    /// Replaces every gradient by its mean over the group, bucket by bucket: first the ranks
    /// agree on which parameters have a gradient (see the module docs), then one all-reduce per
    /// bucket. [`DistributedStep::after_backward`] calls it on final micro-steps; every rank must
    /// call it at the same point.
    pub fn average_gradients(&mut self, group: &mut ProcessGroup) -> Result<()> {
        let local: Vec<bool> = self
            .parameters
            .iter()
            .map(|(_, parameter)| parameter.grad().defined())
            .collect();
        // Every rank joins the mask all-reduce, also when it has every gradient itself.
        let participating = self.agreed_mask(group, &local)?;
        self.every_parameter_used = Some((
            group.prefix().to_string(),
            participating.iter().all(|&takes_part| takes_part),
        ));
        self.define_zero_gradients(&local, &participating)?;
        let replan = self
            .plan
            .as_ref()
            .is_none_or(|plan| plan.participating != participating);
        if replan {
            tracing::info!(
                participating = participating
                    .iter()
                    .filter(|&&takes_part| takes_part)
                    .count(),
                parameters = participating.len(),
                "re-planning gradient buckets"
            );
            self.plan = Some(self.plan_for(participating));
        }
        let Some(plan) = &self.plan else {
            return Ok(());
        };
        let tensors: Vec<Tensor> = plan
            .indices
            .iter()
            .map(|&index| self.parameters[index].1.shallow_clone())
            .collect();
        plan.buckets.average(group, &tensors)?;
        Ok(())
    }

    /// Which parameters have a gradient on at least one rank (a summed 0/1 mask).
    fn agreed_mask(&self, group: &mut ProcessGroup, local: &[bool]) -> Result<Vec<bool>> {
        let flags: Vec<f32> = local
            .iter()
            .map(|&has_gradient| f32::from(u8::from(has_gradient)))
            .collect();
        let device = self
            .parameters
            .first()
            .map_or(Device::Cpu, |(_, parameter)| parameter.device());
        let mask = Tensor::from_slice(&flags).to_device(device);
        let mut mask = [mask];
        group.all_reduce_sum(&mut mask)?;
        let summed: Vec<f32> = Vec::<f32>::try_from(mask[0].to_device(Device::Cpu))
            .map_err(WorkerError::torch("reading the gradient mask"))?;
        Ok(summed.into_iter().map(|count| count > 0.5).collect())
    }

    /// Gives a zero gradient to each parameter that has none here but has one on another rank.
    fn define_zero_gradients(&self, local: &[bool], agreed: &[bool]) -> Result<()> {
        let mut zero_loss: Option<Tensor> = None;
        for (index, (name, parameter)) in self.parameters.iter().enumerate() {
            if local[index] || !agreed[index] {
                continue;
            }
            if !parameter.requires_grad() {
                return Err(WorkerError::Training(format!(
                    "parameter `{name}` has a gradient on another rank but does not require grad \
                     here"
                )));
            }
            let term = parameter.sum(Kind::Float) * 0.0;
            zero_loss = Some(match zero_loss {
                Some(total) => total + term,
                None => term,
            });
        }
        if let Some(zero_loss) = zero_loss {
            zero_loss.f_backward().map_err(WorkerError::torch(
                "giving unused parameters zero gradients",
            ))?;
        }
        Ok(())
    }
}
