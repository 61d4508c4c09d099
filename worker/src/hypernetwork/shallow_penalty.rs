//! NovelAI's shallow-layer penalty for hypernetwork training. The k/v modules of one size are
//! shared by every attention layer of that width, and the shallow (highest-resolution) layers
//! overfit first, so each layer's contribution to the shared modules' gradient is weighted by
//! depth:
//!
//! `f_l = a_l·f(x) + (1 − a_l)·stopgrad(f(x))`
//!
//! which leaves the forward pass unchanged (f_l = f(x) in value) and scales the gradient that flows
//! from layer l into the module's weights by a_l. `stopgrad` stops the gradient into the module's
//! parameters only (f is evaluated a second time with detached parameters and the same dropout
//! masks): detaching f(x) whole would also cut the gradient to the context x, and so change the
//! gradients every earlier layer receives, not just this layer's contribution. `a_l` is `level_weights[level]`, where the level
//! is the attention layer's resolution level (0 = `down_blocks.0` and the last up block, one more
//! per downsampling; levels past the list take its last entry).
//!
//! Defaults: `[0.25, 0.5, 1.0]` (`shallow_penalty` in job.toml, docs/architecture.md §7): the
//! 64×64-latent layers (SD1 level 0, where the modules see the most tokens and overfit fastest)
//! count a quarter, the 32×32 layers half, and 16×16 and deeper (incl. the mid block) fully. Only
//! the relative weights change where the modules learn from; the learning rate scales the rest.
//!
//! Optionally a depth-weighted L2 penalty `strength · Σ_l w_l · mean(f_l(x)²)` is collected
//! (default off; `l2_level_weights` default `[1.0, 0.5, 0.25]`, the shallowest layers most), to
//! be added to the loss with [`super::Hypernetwork::take_l2_penalty`].

use tch::Tensor;

use crate::error::{Result, WorkerError};

#[derive(Debug, Clone, PartialEq)]
pub struct ShallowPenalty {
    /// a_l per resolution level, shallowest first; each in [0, 1].
    pub level_weights: Vec<f64>,
    /// Strength of the optional L2 penalty on f(x) (0 = off).
    pub l2_strength: f64,
    /// w_l of the L2 penalty per resolution level, shallowest first.
    pub l2_level_weights: Vec<f64>,
}

impl Default for ShallowPenalty {
    fn default() -> Self {
        Self {
            level_weights: vec![0.25, 0.5, 1.0],
            l2_strength: 0.0,
            l2_level_weights: vec![1.0, 0.5, 0.25],
        }
    }
}

fn at_level(weights: &[f64], level: usize) -> f64 {
    weights
        .get(level)
        .or(weights.last())
        .copied()
        .unwrap_or(1.0)
}

impl ShallowPenalty {
    /// Checks the weights once, at the edge.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, message: String| {
            Err(WorkerError::Hypernetwork {
                item: format!("shallow_penalty.{field}"),
                message,
            })
        };
        if self.level_weights.is_empty()
            || self
                .level_weights
                .iter()
                .any(|weight| !(0.0..=1.0).contains(weight))
        {
            return invalid(
                "level_weights",
                format!(
                    "{:?} must be non-empty weights in [0, 1]",
                    self.level_weights
                ),
            );
        }
        if !self.l2_strength.is_finite() || self.l2_strength < 0.0 {
            return invalid("l2_strength", format!("{} must be >= 0", self.l2_strength));
        }
        if self
            .l2_level_weights
            .iter()
            .any(|weight| !weight.is_finite() || *weight < 0.0)
        {
            return invalid(
                "l2_level_weights",
                format!("{:?} must be >= 0", self.l2_level_weights),
            );
        }
        Ok(())
    }

    /// a_l of a resolution level.
    pub fn gradient_weight(&self, level: usize) -> f64 {
        at_level(&self.level_weights, level)
    }

    /// `a·f + (1 − a)·stopgrad(f)` where `stopgrad(f)` is `parameter_detached`, f computed
    /// with the module's parameters detached: same value, the parameters' gradient from this
    /// layer scaled by a, and the gradient to the context (and so to earlier layers) unchanged.
    /// Computed as `stopgrad(f) + a·(f − stopgrad(f))`, which gives exactly f's value in floating
    /// point (`f − stopgrad(f)` is exactly zero).
    pub fn apply(&self, branch: &Tensor, parameter_detached: &Tensor, level: usize) -> Tensor {
        let weight = self.gradient_weight(level);
        if weight == 1.0 {
            return branch.shallow_clone();
        }
        parameter_detached + (branch - parameter_detached) * weight
    }

    /// The layer's L2 term `strength · w_l · mean(f²)`, or `None` when the penalty is off.
    pub fn l2_term(&self, branch: &Tensor, level: usize) -> Option<Tensor> {
        let weight = self.l2_strength * at_level(&self.l2_level_weights, level);
        if weight == 0.0 {
            return None;
        }
        Some(branch.square().mean(branch.kind()) * weight)
    }
}
