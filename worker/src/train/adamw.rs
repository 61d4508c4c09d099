//! AdamW as `torch.optim.AdamW` (`amsgrad=False`, `maximize=False`, `capturable=False`), with
//! torch's fused kernel (`fused=True`, the default here: one kernel per parameter through
//! [`arbor_c10d::aten_ops::fused_adamw`]) or operation for operation as its single-tensor path
//! (`foreach=False`, [`AdamWConfig::fused`] false). Both compute the same update; they differ
//! only in floating-point rounding.
//!
//! Per parameter with a defined gradient `g`, at its own step count `t` (after incrementing):
//!
//! ```text
//! param     *= 1 - lr · weight_decay          (decoupled weight decay)
//! exp_avg    = lerp(exp_avg, g, 1 - β1)
//! exp_avg_sq = exp_avg_sq · β2 + (1 - β2) · g · g
//! denom      = sqrt(exp_avg_sq) / sqrt(1 - β2^t) + eps
//! param     -= (lr / (1 - β1^t)) · exp_avg / denom
//! ```
//!
//! Parameters whose gradient is undefined are skipped and their step count does not advance,
//! like torch. The moments live on the parameter's device in its kind. [`AdamW::zero_grad`]
//! resets every gradient to undefined (torch's default `set_to_none=True`), so a parameter that
//! takes no part in the next backward pass is skipped by the next step.
//!
//! Checkpoint state ([`AdamW::state_tensors`]) is `<param>.exp_avg` and `<param>.exp_avg_sq`;
//! a parameter whose own step count differs from the optimizer's (it skipped steps) also gets a
//! scalar `<param>.step`, so a resumed optimizer continues exactly.

use std::collections::HashMap;

use arbor_c10d::aten_ops::{
    fused_adamw, reset_grads, FusedAdamWHyperParameters, FusedAdamWTensors,
};
use tch::{Kind, Tensor};

use crate::error::{Result, WorkerError};

/// AdamW's hyper-parameters besides the learning rate; `Default` is torch's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// torch's fused kernel (`fused=True`); false runs the single-tensor path op by op.
    pub fused: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            fused: true,
        }
    }
}

/// The first and second moment of one parameter and how many updates it has had.
struct ParameterState {
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: u64,
    /// `step` as the float32 scalar the fused kernel reads and increments, on the parameter's
    /// device (as torch keeps it with `fused=True`), so a step copies nothing from the host.
    step_on_device: Tensor,
}

/// The fused kernel's float32 step scalar for `step`, on `parameter`'s device (a fill on the
/// device, no host-to-device copy).
fn step_scalar(parameter: &Tensor, step: u64) -> Tensor {
    Tensor::full([], step as f64, (Kind::Float, parameter.device()))
}

/// The optimizer: the parameters it updates in place and their moments.
pub struct AdamW {
    parameters: Vec<(String, Tensor)>,
    states: Vec<ParameterState>,
    config: AdamWConfig,
    step_count: u64,
}

impl std::fmt::Debug for AdamW {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("AdamW")
            .field("parameters", &self.parameters.len())
            .field("config", &self.config)
            .field("step_count", &self.step_count)
            .finish()
    }
}

impl AdamW {
    /// `parameters` are shallow clones of the trainable leaf variables, with unique names.
    pub fn new(parameters: Vec<(String, Tensor)>, config: AdamWConfig) -> Self {
        let states = tch::no_grad(|| {
            parameters
                .iter()
                .map(|(_, parameter)| ParameterState {
                    exp_avg: parameter.zeros_like(),
                    exp_avg_sq: parameter.zeros_like(),
                    step: 0,
                    step_on_device: step_scalar(parameter, 0),
                })
                .collect()
        });
        Self {
            parameters,
            states,
            config,
            step_count: 0,
        }
    }

    pub fn parameters(&self) -> &[(String, Tensor)] {
        &self.parameters
    }

    pub fn config(&self) -> AdamWConfig {
        self.config
    }

    /// One update of every parameter that has a gradient, at `learning_rate`.
    pub fn step(&mut self, learning_rate: f64) -> Result<()> {
        if !learning_rate.is_finite() || learning_rate < 0.0 {
            return Err(WorkerError::Input {
                name: "learning_rate".to_string(),
                message: format!("must be a finite number >= 0, got {learning_rate}"),
            });
        }
        if self.config.fused {
            self.fused_step(learning_rate)?;
        } else {
            self.single_tensor_step(learning_rate)?;
        }
        self.step_count += 1;
        Ok(())
    }

    fn hyper_parameters(&self, learning_rate: f64) -> FusedAdamWHyperParameters {
        FusedAdamWHyperParameters {
            learning_rate,
            beta1: self.config.beta1,
            beta2: self.config.beta2,
            weight_decay: self.config.weight_decay,
            eps: self.config.eps,
        }
    }

    /// The fused kernel over every parameter with a gradient, in one call.
    fn fused_step(&mut self, learning_rate: f64) -> Result<()> {
        let mut stepped = Vec::with_capacity(self.parameters.len());
        let (mut parameters, mut gradients) = (Vec::new(), Vec::new());
        let (mut exp_avgs, mut exp_avg_sqs, mut steps) = (Vec::new(), Vec::new(), Vec::new());
        for (index, ((_, parameter), state)) in self.parameters.iter().zip(&self.states).enumerate()
        {
            let gradient = parameter.grad();
            if !gradient.defined() {
                continue;
            }
            stepped.push(index);
            parameters.push(parameter.shallow_clone());
            gradients.push(gradient);
            exp_avgs.push(state.exp_avg.shallow_clone());
            exp_avg_sqs.push(state.exp_avg_sq.shallow_clone());
            steps.push(state.step_on_device.shallow_clone());
        }
        if parameters.is_empty() {
            return Ok(());
        }
        // The kernel increments each step scalar, then reads it.
        let tensors = FusedAdamWTensors {
            parameters: &parameters,
            gradients: &gradients,
            exp_avgs: &exp_avgs,
            exp_avg_sqs: &exp_avg_sqs,
            steps: &steps,
        };
        fused_adamw(&tensors, self.hyper_parameters(learning_rate)).map_err(WorkerError::AtenOp)?;
        for index in stepped {
            self.states[index].step += 1;
        }
        Ok(())
    }

    /// torch's single-tensor path, operation for operation.
    fn single_tensor_step(&mut self, learning_rate: f64) -> Result<()> {
        let FusedAdamWHyperParameters {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } = self.hyper_parameters(learning_rate);
        tch::no_grad(|| -> Result<()> {
            for ((name, parameter), state) in self.parameters.iter().zip(self.states.iter_mut()) {
                let gradient = parameter.grad();
                if !gradient.defined() {
                    continue;
                }
                let context = || format!("adamw step of `{name}`");
                let mut parameter = parameter.shallow_clone();
                state.step += 1;
                let _ = state
                    .step_on_device
                    .f_add_scalar_(1.0)
                    .map_err(WorkerError::torch(context()))?;
                if weight_decay != 0.0 {
                    let _ = parameter
                        .f_mul_scalar_(1.0 - learning_rate * weight_decay)
                        .map_err(WorkerError::torch(context()))?;
                }
                let _ = state
                    .exp_avg
                    .f_lerp_(&gradient, 1.0 - beta1)
                    .map_err(WorkerError::torch(context()))?;
                let _ = state
                    .exp_avg_sq
                    .f_mul_scalar_(beta2)
                    .map_err(WorkerError::torch(context()))?;
                // addcmul_(g, g, value=1-β2) computes (value·g)·g.
                let squared = gradient
                    .f_mul_scalar(1.0 - beta2)
                    .and_then(|scaled| scaled.f_mul(&gradient))
                    .map_err(WorkerError::torch(context()))?;
                let _ = state
                    .exp_avg_sq
                    .f_add_(&squared)
                    .map_err(WorkerError::torch(context()))?;
                let step = state.step as f64;
                let bias_correction1 = 1.0 - beta1.powf(step);
                let bias_correction2 = 1.0 - beta2.powf(step);
                let step_size = learning_rate / bias_correction1;
                let denominator = state
                    .exp_avg_sq
                    .f_sqrt()
                    .and_then(|root| root.f_div_scalar(bias_correction2.sqrt()))
                    .and_then(|scaled| scaled.f_add_scalar(eps))
                    .map_err(WorkerError::torch(context()))?;
                // addcdiv_(exp_avg, denom, value=-step_size) computes (value·exp_avg)/denom.
                let update = state
                    .exp_avg
                    .f_mul_scalar(-step_size)
                    .and_then(|scaled| scaled.f_div(&denominator))
                    .map_err(WorkerError::torch(context()))?;
                let _ = parameter
                    .f_add_(&update)
                    .map_err(WorkerError::torch(context()))?;
            }
            Ok(())
        })
    }

    /// Resets every gradient to undefined (`zero_grad(set_to_none=True)`).
    pub fn zero_grad(&self) -> Result<()> {
        let parameters: Vec<Tensor> = self
            .parameters
            .iter()
            .map(|(_, parameter)| parameter.shallow_clone())
            .collect();
        reset_grads(&parameters).map_err(WorkerError::AtenOp)
    }

    /// How many times [`AdamW::step`] ran (or the count given to [`AdamW::load_state`]).
    pub fn step_count(&self) -> u64 {
        self.step_count
    }

    /// Copies of the moments: `<param>.exp_avg`, `<param>.exp_avg_sq`, and `<param>.step`
    /// (a scalar int64) only for a parameter whose step count differs from the optimizer's.
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors = Vec::with_capacity(self.states.len() * 2);
        for ((name, _), state) in self.parameters.iter().zip(&self.states) {
            tensors.push((format!("{name}.exp_avg"), state.exp_avg.copy()));
            tensors.push((format!("{name}.exp_avg_sq"), state.exp_avg_sq.copy()));
            if state.step != self.step_count {
                tensors.push((
                    format!("{name}.step"),
                    Tensor::from(state.step as i64).to_kind(Kind::Int64),
                ));
            }
        }
        tensors
    }

    /// Restores what [`AdamW::state_tensors`] saved; the moments are copied onto each
    /// parameter's device and kind. Nothing changes unless every tensor is present and fits.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step_count: u64) -> Result<()> {
        let mut restored = Vec::with_capacity(self.states.len());
        for (name, parameter) in &self.parameters {
            let moment = |suffix: &str| -> Result<Tensor> {
                let key = format!("{name}.{suffix}");
                let Some(tensor) = state.get(&key) else {
                    return Err(WorkerError::MissingTensor {
                        key,
                        source_name: "adamw state".to_string(),
                        expected: parameter.size(),
                    });
                };
                if tensor.size() != parameter.size() {
                    return Err(WorkerError::TensorShape {
                        key,
                        source_name: "adamw state".to_string(),
                        expected: parameter.size(),
                        actual: tensor.size(),
                    });
                }
                tch::no_grad(|| {
                    tensor
                        .f_to_device(parameter.device())
                        .and_then(|moved| moved.f_to_kind(parameter.kind()))
                        .and_then(|converted| converted.f_detach_copy())
                })
                .map_err(WorkerError::torch(format!("loading adamw state `{key}`")))
            };
            let exp_avg = moment("exp_avg")?;
            let exp_avg_sq = moment("exp_avg_sq")?;
            let step_key = format!("{name}.step");
            let step = match state.get(&step_key) {
                None => step_count,
                Some(tensor) => {
                    let value = tensor
                        .f_int64_value(&[])
                        .map_err(WorkerError::torch(format!("reading `{step_key}`")))?;
                    u64::try_from(value).map_err(|_| WorkerError::Input {
                        name: step_key.clone(),
                        message: format!("step count must be >= 0, got {value}"),
                    })?
                }
            };
            restored.push(ParameterState {
                exp_avg,
                exp_avg_sq,
                step,
                step_on_device: step_scalar(parameter, step),
            });
        }
        self.states = restored;
        self.step_count = step_count;
        Ok(())
    }
}
