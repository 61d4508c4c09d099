//! Training-step parity against diffusers + PyTorch autograd: noised latents, the
//! epsilon-prediction MSE loss and the gradient of every UNet parameter.

use crate::model_fixtures::{
    assert_close, fixtures_dir, get, goldens, inputs, max_abs_diff, GRAD_RTOL, GRAD_SCALE_FLOOR,
};
use arbor_worker::ddpm::DdpmSchedule;
use arbor_worker::train::train_step::{adamw, loss_and_gradients, optimizer_step, DiffusionBatch};
use arbor_worker::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use arbor_worker::WorkerError;
use tch::{nn, Device, Tensor};

fn load_unet() -> (nn::VarStore, UNet2DConditionModel) {
    let unet_dir = fixtures_dir().join("model/unet");
    let config = UNet2DConditionConfig::from_diffusers_json(&unet_dir.join("config.json")).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &config);
    vs.load(unet_dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    (vs, unet)
}

#[test]
fn loss_and_every_gradient_match_pytorch() {
    let (vs, unet) = load_unet();
    let schedule = DdpmSchedule::sd1();
    let inputs = inputs();
    let goldens = goldens();
    let batch = DiffusionBatch {
        latents: get(&inputs, "train.latents"),
        noise: get(&inputs, "train.noise"),
        timesteps: get(&inputs, "train.timesteps"),
        encoder_hidden_states: get(&inputs, "train.encoder_hidden_states"),
    };
    let result = loss_and_gradients(&vs, &unet, &schedule, &batch, None).unwrap();
    assert_close(&result.noisy, get(&goldens, "train.noisy"), "train.noisy");
    let expected_loss = get(&goldens, "train.loss").double_value(&[]);
    println!("train.loss: {} vs {expected_loss}", result.loss);
    assert!((result.loss - expected_loss).abs() <= 1e-5 * expected_loss.abs().max(1.0));

    let mut expected_names: Vec<&str> = goldens
        .keys()
        .filter_map(|name| name.strip_prefix("train.grad."))
        .collect();
    expected_names.sort_unstable();
    let names: Vec<&str> = result
        .gradients
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(
        names, expected_names,
        "one gradient per diffusers parameter"
    );

    let mut worst = (0.0f64, String::new());
    for (name, gradient) in &result.gradients {
        let expected = get(&goldens, &format!("train.grad.{name}"));
        let scale = expected.abs().max().double_value(&[]).max(GRAD_SCALE_FLOOR);
        let relative = max_abs_diff(gradient, expected, name) / scale;
        if relative > worst.0 {
            worst = (relative, name.clone());
        }
        assert!(
            relative <= GRAD_RTOL,
            "train.grad.{name}: relative error {relative:e}"
        );
    }
    println!(
        "worst gradient relative error {:.3e} at {}",
        worst.0, worst.1
    );
}

#[test]
fn an_adamw_step_lowers_the_loss_on_a_repeated_batch() {
    let (vs, unet) = load_unet();
    let schedule = DdpmSchedule::sd1();
    let inputs = inputs();
    let batch = DiffusionBatch {
        latents: get(&inputs, "train.latents"),
        noise: get(&inputs, "train.noise"),
        timesteps: get(&inputs, "train.timesteps"),
        encoder_hidden_states: get(&inputs, "train.encoder_hidden_states"),
    };
    let mut optimizer = adamw(&vs, 0.01);
    let first = optimizer_step(&mut optimizer, 1e-3, &unet, &schedule, &batch, None).unwrap();
    let mut last = first;
    for _ in 0..4 {
        last = optimizer_step(&mut optimizer, 1e-3, &unet, &schedule, &batch, None).unwrap();
    }
    assert!(last < first * 0.95, "loss went from {first} to {last}");
}

#[test]
fn mismatched_batch_is_an_error_naming_the_input() {
    let (vs, unet) = load_unet();
    let schedule = DdpmSchedule::sd1();
    let latents = Tensor::zeros([2, 4, 8, 8], (tch::Kind::Float, Device::Cpu));
    let noise = Tensor::zeros([2, 4, 8, 4], (tch::Kind::Float, Device::Cpu));
    let context = Tensor::zeros([2, 77, 48], (tch::Kind::Float, Device::Cpu));
    let timesteps = Tensor::from_slice(&[1i64, 2]);
    let batch = DiffusionBatch {
        latents: &latents,
        noise: &noise,
        timesteps: &timesteps,
        encoder_hidden_states: &context,
    };
    let error = loss_and_gradients(&vs, &unet, &schedule, &batch, None).unwrap_err();
    assert!(
        matches!(&error, WorkerError::Input { name, .. } if name == "noise"),
        "{error}"
    );
    let out_of_range = Tensor::from_slice(&[1i64, 1000]);
    let batch = DiffusionBatch {
        noise: &latents,
        timesteps: &out_of_range,
        ..batch
    };
    let error = loss_and_gradients(&vs, &unet, &schedule, &batch, None).unwrap_err();
    assert!(
        matches!(&error, WorkerError::Input { name, .. } if name == "timesteps"),
        "{error}"
    );
}
