//! A sample's UNet output and loss gradient must not depend on the other samples of its batch:
//! data parallelism and gradient accumulation split batches and rely on it.

use crate::training_support::{build_tiny_model, gradients, max_abs_diff, step_batch, TrainMode};
use anyhow::Result;
use arbor_worker::attention::KvContextTransform;
use tch::Kind;

fn max_abs(tensor: &tch::Tensor) -> f64 {
    tensor.abs().max().to_kind(Kind::Double).double_value(&[])
}

fn check_unet_rows(mode: TrainMode) -> Result<()> {
    let model = build_tiny_model(mode, 11);
    let batch = step_batch(0, 4);
    let kv_transform = model
        .hypernetwork
        .as_ref()
        .map(|hypernetwork| hypernetwork as &dyn KvContextTransform);
    let whole = tch::no_grad(|| {
        model.unet.forward_with_kv_transform(
            &batch.latents,
            &batch.timesteps,
            &batch.context,
            kv_transform,
        )
    });
    let half = batch.rows(0, 2);
    let part = tch::no_grad(|| {
        model.unet.forward_with_kv_transform(
            &half.latents,
            &half.timesteps,
            &half.context,
            kv_transform,
        )
    });
    let difference = max_abs(&(whole.narrow(0, 0, 2) - &part));
    let scale = max_abs(&part);
    anyhow::ensure!(
        difference <= 1e-5 * scale.max(1.0),
        "{}: rows 0..2 of a 4-sample forward differ from a 2-sample forward by {difference:e} (scale {scale:e})",
        mode.name()
    );
    Ok(())
}

#[test]
fn unet_rows_do_not_depend_on_the_rest_of_the_batch_in_finetune_mode() -> Result<()> {
    check_unet_rows(TrainMode::Finetune)
}

#[test]
fn unet_rows_do_not_depend_on_the_rest_of_the_batch_under_a_hypernetwork() -> Result<()> {
    check_unet_rows(TrainMode::Hypernetwork)
}

/// The gradient of the whole batch's mean loss equals the mean of its halves' gradients.
fn check_split_gradient(mode: TrainMode) -> Result<()> {
    let model = build_tiny_model(mode, 11);
    let parameters = model.trainable();
    let batch = step_batch(0, 4);
    model.backward(&batch, 1.0)?;
    let whole = gradients(&parameters);
    for (_, parameter) in &parameters {
        let mut parameter = parameter.shallow_clone();
        parameter.zero_grad();
    }
    model.backward(&batch.rows(0, 2), 2.0)?;
    model.backward(&batch.rows(2, 2), 2.0)?;
    let split = gradients(&parameters);
    let (difference, scale) = max_abs_diff(&split, &whole)?;
    anyhow::ensure!(
        difference <= 1e-4 * scale,
        "{}: two half-batch gradients differ from the whole batch's by {difference:e} (largest gradient {scale:e})",
        mode.name()
    );
    Ok(())
}

#[test]
fn split_gradients_add_up_to_the_whole_batch_in_finetune_mode() -> Result<()> {
    check_split_gradient(TrainMode::Finetune)
}

#[test]
fn split_gradients_add_up_to_the_whole_batch_under_a_hypernetwork() -> Result<()> {
    check_split_gradient(TrainMode::Hypernetwork)
}
