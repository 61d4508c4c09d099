//! Gradient averaging as DDP does it: parameters are grouped, in reverse order (the order backward
//! produces their gradients), into buckets of about 25 MiB; each bucket's gradients are flattened
//! into one buffer, all-reduced once, divided by the world size and copied back. With gradient
//! accumulation only the final micro-step of each optimizer step all-reduces.

use tch::{Device, Kind, Tensor};

use crate::error::C10dError;
use crate::process_group::ProcessGroup;

/// DDP's default `bucket_cap_mb`.
pub const DEFAULT_BUCKET_CAP_BYTES: usize = 25 * 1024 * 1024;

/// The shape of one parameter that a bucket plan was made for.
#[derive(Debug, Clone, PartialEq)]
struct PlannedParameter {
    numel: usize,
    kind: Kind,
    device: Device,
}

/// A fixed assignment of parameters (by index in the model's parameter list) to buckets.
#[derive(Debug, Clone)]
pub struct GradientBuckets {
    buckets: Vec<Vec<usize>>,
    parameters: Vec<PlannedParameter>,
    bucket_cap_bytes: usize,
}

impl GradientBuckets {
    /// Plans buckets for `parameters` (the model's order): walking them in reverse, a bucket is
    /// closed when the next gradient would take it past `bucket_cap_bytes` or has another dtype or
    /// device. A parameter larger than the cap gets a bucket of its own.
    pub fn plan(parameters: &[Tensor], bucket_cap_bytes: usize) -> Self {
        let planned: Vec<PlannedParameter> = parameters
            .iter()
            .map(|parameter| PlannedParameter {
                numel: parameter.numel(),
                kind: parameter.kind(),
                device: parameter.device(),
            })
            .collect();
        let sizes: Vec<(usize, (Kind, Device))> = planned
            .iter()
            .map(|parameter| {
                let bytes = parameter.numel * parameter.kind.elt_size_in_bytes();
                (bytes, (parameter.kind, parameter.device))
            })
            .collect();
        Self {
            buckets: plan_reverse_buckets(&sizes, bucket_cap_bytes),
            parameters: planned,
            bucket_cap_bytes,
        }
    }

    /// Parameter indices per bucket, in all-reduce order (the last parameters first).
    pub fn buckets(&self) -> &[Vec<usize>] {
        &self.buckets
    }

    pub fn bucket_cap_bytes(&self) -> usize {
        self.bucket_cap_bytes
    }

    /// Replaces every parameter's gradient by its mean across the group: one all-reduce per
    /// bucket. Every rank must call this with the same parameters (each with a gradient).
    pub fn average(
        &self,
        group: &mut ProcessGroup,
        parameters: &[Tensor],
    ) -> Result<(), C10dError> {
        if parameters.len() != self.parameters.len() {
            return Err(C10dError::ParameterMismatch {
                parameter_index: parameters.len().min(self.parameters.len()),
                reason: format!("a list of {} parameters", parameters.len()),
                expected: format!("{} parameters", self.parameters.len()),
            });
        }
        for bucket in &self.buckets {
            let mut gradients = Vec::with_capacity(bucket.len());
            for &parameter_index in bucket {
                gradients.push(self.gradient_of(parameters, parameter_index)?);
            }
            group.all_reduce_mean(&mut gradients)?;
        }
        Ok(())
    }

    /// Averages the gradients only on the final micro-step of an accumulation window
    /// (`micro_step` counts from 0 within the optimizer step or globally; `accumulation_steps` of
    /// 0 or 1 means every step). Returns whether it all-reduced.
    pub fn average_after_micro_step(
        &self,
        group: &mut ProcessGroup,
        parameters: &[Tensor],
        micro_step: usize,
        accumulation_steps: usize,
    ) -> Result<bool, C10dError> {
        if !is_final_micro_step(micro_step, accumulation_steps) {
            return Ok(false);
        }
        self.average(group, parameters)?;
        Ok(true)
    }

    fn gradient_of(
        &self,
        parameters: &[Tensor],
        parameter_index: usize,
    ) -> Result<Tensor, C10dError> {
        let planned = &self.parameters[parameter_index];
        let gradient = parameters[parameter_index].grad();
        if !gradient.defined() {
            return Err(C10dError::MissingGradient { parameter_index });
        }
        let actual = PlannedParameter {
            numel: gradient.numel(),
            kind: gradient.kind(),
            device: gradient.device(),
        };
        if actual != *planned {
            return Err(C10dError::ParameterMismatch {
                parameter_index,
                reason: format!(
                    "a gradient of {} {:?} elements on {:?}",
                    actual.numel, actual.kind, actual.device
                ),
                expected: format!(
                    "{} {:?} elements on {:?}",
                    planned.numel, planned.kind, planned.device
                ),
            });
        }
        Ok(gradient)
    }
}

/// Whether micro-step `micro_step` (from 0) ends an accumulation window of `accumulation_steps`.
pub fn is_final_micro_step(micro_step: usize, accumulation_steps: usize) -> bool {
    accumulation_steps <= 1 || (micro_step + 1) % accumulation_steps == 0
}

/// The bucket plan over (bytes, group key) per parameter: reverse order, a new bucket when the cap
/// would be exceeded or the key (dtype, device) changes.
fn plan_reverse_buckets<K: PartialEq>(
    sizes: &[(usize, K)],
    bucket_cap_bytes: usize,
) -> Vec<Vec<usize>> {
    let mut buckets: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_bytes = 0usize;
    for index in (0..sizes.len()).rev() {
        let (bytes, key) = &sizes[index];
        let same_key = current.first().is_none_or(|&first| sizes[first].1 == *key);
        let fits = current.is_empty() || current_bytes + bytes <= bucket_cap_bytes;
        if !(same_key && fits) {
            buckets.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
        current.push(index);
        current_bytes += bytes;
    }
    if !current.is_empty() {
        buckets.push(current);
    }
    buckets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_walk_parameters_in_reverse_under_the_cap() {
        let sizes = [(10, 'f'), (10, 'f'), (10, 'f'), (10, 'f'), (10, 'f')];
        assert_eq!(
            plan_reverse_buckets(&sizes, 20),
            vec![vec![4, 3], vec![2, 1], vec![0]]
        );
        assert_eq!(plan_reverse_buckets(&sizes, 50), vec![vec![4, 3, 2, 1, 0]]);
    }

    #[test]
    fn an_oversized_parameter_gets_its_own_bucket() {
        let sizes = [(5, 'f'), (100, 'f'), (5, 'f')];
        assert_eq!(
            plan_reverse_buckets(&sizes, 20),
            vec![vec![2], vec![1], vec![0]]
        );
    }

    #[test]
    fn a_dtype_change_closes_the_bucket() {
        let sizes = [(4, 'f'), (4, 'h'), (4, 'h'), (4, 'f')];
        assert_eq!(
            plan_reverse_buckets(&sizes, 1000),
            vec![vec![3], vec![2, 1], vec![0]]
        );
    }

    #[test]
    fn plans_25_mib_buckets_from_tensors() {
        // 4 parameters of 10 MiB (f32) each: 25 MiB holds two of them.
        let parameters: Vec<Tensor> = (0..4)
            .map(|_| Tensor::zeros([10 * 1024 * 1024 / 4], (Kind::Float, Device::Cpu)))
            .collect();
        let plan = GradientBuckets::plan(&parameters, DEFAULT_BUCKET_CAP_BYTES);
        assert_eq!(plan.buckets(), &[vec![3, 2], vec![1, 0]]);
    }

    #[test]
    fn only_the_final_micro_step_all_reduces() {
        let finals: Vec<bool> = (0..6).map(|step| is_final_micro_step(step, 3)).collect();
        assert_eq!(finals, [false, false, true, false, false, true]);
        assert!(is_final_micro_step(0, 1));
        assert!(is_final_micro_step(7, 0));
    }
}
