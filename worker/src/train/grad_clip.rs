//! Gradient clipping by global L2 norm, as `torch.nn.utils.clip_grad_norm_(norm_type=2)`:
//! the total norm is the L2 norm of every defined gradient's L2 norm (computed in the
//! gradients' kind), `coef = max_norm / (total + 1e-6)` clamped to at most 1, and every
//! gradient is multiplied by it in place. Unlike torch, `max_norm <= 0` only measures (the
//! config's "0 turns clipping off"). A non-finite total norm is returned as is, like torch's
//! default `error_if_nonfinite=False`, and then the gradients become non-finite too.

use tch::Tensor;

use crate::error::{Result, WorkerError};

/// Clips the gradients of `parameters` to a total L2 norm of `max_norm`; returns the total
/// norm before clipping (0 when no parameter has a gradient). Reads the norm back to the host:
/// the training loop uses [`clip_grad_norm_on_device`], which does not wait for the device.
pub fn clip_grad_norm(parameters: &[Tensor], max_norm: f64) -> Result<f64> {
    clip_grad_norm_on_device(parameters, max_norm)?
        .f_double_value(&[])
        .map_err(WorkerError::torch("measuring the gradient norm"))
}

/// [`clip_grad_norm`] without a host synchronisation: the total norm stays a 0-dim tensor on the
/// gradients' device (a CPU zero when no parameter has a gradient), and the clip coefficient is
/// applied on the device.
pub fn clip_grad_norm_on_device(parameters: &[Tensor], max_norm: f64) -> Result<Tensor> {
    tch::no_grad(|| {
        let gradients: Vec<Tensor> = parameters
            .iter()
            .map(Tensor::grad)
            .filter(Tensor::defined)
            .collect();
        let Some(first) = gradients.first() else {
            return Ok(Tensor::from(0.0f64));
        };
        let device = first.device();
        let context = "measuring the gradient norm";
        let norms = gradients
            .iter()
            .map(|gradient| gradient.f_norm().and_then(|norm| norm.f_to_device(device)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(WorkerError::torch(context))?;
        let total_norm = Tensor::f_stack(&norms, 0)
            .and_then(|stacked| stacked.f_norm())
            .map_err(WorkerError::torch(context))?;
        if max_norm <= 0.0 {
            return Ok(total_norm);
        }
        let coefficient = total_norm
            .f_add_scalar(1e-6)
            .and_then(|denominator| denominator.f_reciprocal())
            .and_then(|inverse| inverse.f_mul_scalar(max_norm))
            .and_then(|coefficient| coefficient.f_clamp_max(1.0))
            .map_err(WorkerError::torch("computing the clip coefficient"))?;
        for gradient in &gradients {
            let mut gradient = gradient.shallow_clone();
            let _ = coefficient
                .f_to_device(gradient.device())
                .and_then(|coefficient| gradient.f_mul_(&coefficient))
                .map_err(WorkerError::torch("scaling gradients"))?;
        }
        Ok(total_norm)
    })
}
