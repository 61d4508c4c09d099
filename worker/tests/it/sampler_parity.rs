//! DDIM and Euler sampling with classifier-free guidance against diffusers' schedulers driving
//! the same UNet (goldens from make_sampler_fixtures.py).

use crate::model_fixtures::{assert_close, fixtures_dir, get, sampler_goldens};
use arbor_worker::ddpm::{DdpmSchedule, SchedulerConfig};
use arbor_worker::diffusion_samplers::{sample, GuidedPrompt, Sampler, SamplerKind};
use arbor_worker::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use arbor_worker::WorkerError;
use tch::{nn, Device, Tensor};

fn load() -> (nn::VarStore, UNet2DConditionModel, DdpmSchedule) {
    let unet_dir = fixtures_dir().join("model/unet");
    let config = UNet2DConditionConfig::from_diffusers_json(&unet_dir.join("config.json")).unwrap();
    let mut vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &config);
    vs.load(unet_dir.join("diffusion_pytorch_model.safetensors"))
        .unwrap();
    let schedule = DdpmSchedule::new(
        &SchedulerConfig::from_diffusers_json(
            &fixtures_dir().join("model/scheduler/scheduler_config.json"),
        )
        .unwrap(),
    );
    (vs, unet, schedule)
}

fn check(kind: SamplerKind, prefix: &str) {
    let (_vs, unet, schedule) = load();
    let goldens = sampler_goldens();
    let sampler = Sampler::new(kind, &schedule, 4).unwrap();
    let timesteps = Tensor::from_slice(
        &sampler
            .timesteps()
            .iter()
            .map(|t| *t as f32)
            .collect::<Vec<_>>(),
    );
    assert_eq!(timesteps, *get(&goldens, &format!("{prefix}.timesteps")));
    let prompt = GuidedPrompt {
        context: get(&goldens, "context"),
        uncond_context: get(&goldens, "uncond_context"),
        guidance_scale: 7.5,
    };
    let latents = sample(
        &unet,
        &schedule,
        &sampler,
        &prompt,
        get(&goldens, "noise"),
        None,
    )
    .unwrap();
    assert_close(
        &latents,
        get(&goldens, &format!("{prefix}.latents")),
        &format!("{prefix}.latents"),
    );
}

#[test]
fn ddim_with_guidance_matches_diffusers() {
    check(SamplerKind::Ddim, "ddim");
}

#[test]
fn euler_with_guidance_matches_diffusers() {
    check(SamplerKind::Euler, "euler");
}

#[test]
fn mismatched_uncond_and_bad_step_counts_are_errors() {
    let (_vs, unet, schedule) = load();
    let sampler = Sampler::new(SamplerKind::Ddim, &schedule, 2).unwrap();
    let noise = Tensor::zeros([1, 4, 8, 8], (tch::Kind::Float, Device::Cpu));
    let context = Tensor::zeros([1, 154, 48], (tch::Kind::Float, Device::Cpu));
    let uncond = Tensor::zeros([1, 77, 48], (tch::Kind::Float, Device::Cpu));
    let prompt = GuidedPrompt {
        context: &context,
        uncond_context: &uncond,
        guidance_scale: 7.0,
    };
    let error = sample(&unet, &schedule, &sampler, &prompt, &noise, None).unwrap_err();
    assert!(
        matches!(&error, WorkerError::Input { name, .. } if name == "uncond_context"),
        "{error}"
    );
    for steps in [0, 1001] {
        let error = Sampler::new(SamplerKind::Euler, &schedule, steps).unwrap_err();
        assert!(
            matches!(&error, WorkerError::Input { name, .. } if name == "steps"),
            "{error}"
        );
    }
}

#[test]
fn guidance_scale_one_is_the_conditional_prediction() {
    let (_vs, unet, schedule) = load();
    let sampler = Sampler::new(SamplerKind::Ddim, &schedule, 1).unwrap();
    let noise = Tensor::randn([1, 4, 8, 8], (tch::Kind::Float, Device::Cpu));
    let context = Tensor::randn([1, 77, 48], (tch::Kind::Float, Device::Cpu));
    let uncond = Tensor::randn([1, 77, 48], (tch::Kind::Float, Device::Cpu));
    let guided = sample(
        &unet,
        &schedule,
        &sampler,
        &GuidedPrompt {
            context: &context,
            uncond_context: &uncond,
            guidance_scale: 1.0,
        },
        &noise,
        None,
    )
    .unwrap();
    let conditional = sample(
        &unet,
        &schedule,
        &sampler,
        &GuidedPrompt {
            context: &context,
            uncond_context: &context,
            guidance_scale: 1.0,
        },
        &noise,
        None,
    )
    .unwrap();
    let difference = (&guided - &conditional).abs().max().double_value(&[]);
    assert!(difference < 1e-5, "{difference}");
}
