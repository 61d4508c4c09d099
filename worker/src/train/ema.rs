//! An exponential moving average of the trained weights, as diffusers'
//! `diffusers.training_utils.EMAModel` with its defaults (`min_decay=0`, `update_after_step=0`,
//! `use_ema_warmup=False`).
//!
//! The shadow starts as a copy of the parameters. Update number `n` (1-based) uses
//!
//! ```text
//! s     = n − 1
//! decay = 0                               if s == 0
//!       = min(decay, (1 + s) / (10 + s))  otherwise  (diffusers' built-in warmup)
//! shadow -= (1 − decay) · (shadow − param)
//! ```
//!
//! so early updates follow the weights closely and the configured decay takes over after a few
//! hundred steps at 0.999. A parameter that does not require grad is copied, as diffusers does.
//! The shadow tensors live on the parameters' devices, in their kinds.

use std::collections::HashMap;

use tch::Tensor;

use crate::error::{Result, WorkerError};

/// The shadow weights and how many updates they have had.
pub struct Ema {
    shadow: Vec<(String, Tensor)>,
    decay: f64,
    update_count: u64,
}

impl std::fmt::Debug for Ema {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Ema")
            .field("parameters", &self.shadow.len())
            .field("decay", &self.decay)
            .field("update_count", &self.update_count)
            .finish()
    }
}

impl Ema {
    /// A shadow copy of `parameters`, averaged with `decay` (diffusers' `decay`, e.g. 0.9999).
    pub fn new(parameters: &[(String, Tensor)], decay: f64) -> Self {
        let shadow = tch::no_grad(|| {
            parameters
                .iter()
                .map(|(name, parameter)| (name.clone(), parameter.detach().copy()))
                .collect()
        });
        Self {
            shadow,
            decay,
            update_count: 0,
        }
    }

    /// The decay of update number `update_number` (1-based), as `EMAModel.get_decay`.
    pub fn decay_for_update(&self, update_number: u64) -> f64 {
        let step = update_number.saturating_sub(1);
        if step == 0 {
            return 0.0;
        }
        let warmup = (1.0 + step as f64) / (10.0 + step as f64);
        warmup.min(self.decay).max(0.0)
    }

    /// Moves the shadow toward `parameters` (the same names, in the same order, as `new`).
    pub fn update(&mut self, parameters: &[(String, Tensor)]) -> Result<()> {
        if parameters.len() != self.shadow.len() {
            return Err(WorkerError::Training(format!(
                "ema update got {} parameters, the shadow holds {}",
                parameters.len(),
                self.shadow.len()
            )));
        }
        for ((shadow_name, _), (name, _)) in self.shadow.iter().zip(parameters) {
            if shadow_name != name {
                return Err(WorkerError::Training(format!(
                    "ema update got parameter `{name}` where the shadow holds `{shadow_name}`"
                )));
            }
        }
        let decay = self.decay_for_update(self.update_count + 1);
        let one_minus_decay = 1.0 - decay;
        tch::no_grad(|| -> Result<()> {
            for ((name, shadow), (_, parameter)) in self.shadow.iter_mut().zip(parameters) {
                let context = || format!("ema update of `{name}`");
                if !parameter.requires_grad() {
                    shadow
                        .f_copy_(parameter)
                        .map_err(WorkerError::torch(context()))?;
                    continue;
                }
                let step = shadow
                    .f_sub(parameter)
                    .and_then(|difference| difference.f_mul_scalar(one_minus_decay))
                    .map_err(WorkerError::torch(context()))?;
                let _ = shadow
                    .f_sub_(&step)
                    .map_err(WorkerError::torch(context()))?;
            }
            Ok(())
        })?;
        self.update_count += 1;
        Ok(())
    }

    pub fn shadow(&self) -> &[(String, Tensor)] {
        &self.shadow
    }

    pub fn decay(&self) -> f64 {
        self.decay
    }

    /// Copies of the shadow weights under the parameters' names.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        self.shadow
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.copy()))
            .collect()
    }

    /// Restores what [`Ema::state_tensors`] saved. Nothing changes unless every tensor is
    /// present with the right shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, update_count: u64) -> Result<()> {
        let mut restored = Vec::with_capacity(self.shadow.len());
        for (name, shadow) in &self.shadow {
            let Some(tensor) = state.get(name) else {
                return Err(WorkerError::MissingTensor {
                    key: name.clone(),
                    source_name: "ema state".to_string(),
                    expected: shadow.size(),
                });
            };
            if tensor.size() != shadow.size() {
                return Err(WorkerError::TensorShape {
                    key: name.clone(),
                    source_name: "ema state".to_string(),
                    expected: shadow.size(),
                    actual: tensor.size(),
                });
            }
            let copy = tch::no_grad(|| {
                tensor
                    .f_to_device(shadow.device())
                    .and_then(|moved| moved.f_to_kind(shadow.kind()))
                    .and_then(|converted| converted.f_detach_copy())
            })
            .map_err(WorkerError::torch(format!("loading ema state `{name}`")))?;
            restored.push((name.clone(), copy));
        }
        self.shadow = restored;
        self.update_count = update_count;
        Ok(())
    }

    pub fn update_count(&self) -> u64 {
        self.update_count
    }
}
