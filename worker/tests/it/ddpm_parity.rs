//! DDPM schedule parity against diffusers' DDPMScheduler (goldens from make_fixtures.py).

use crate::model_fixtures::{assert_close, fixtures_dir, get, goldens, inputs};
use arbor_worker::ddpm::{DdpmSchedule, PredictionType, SchedulerConfig};
use arbor_worker::WorkerError;
use tch::Tensor;

#[test]
fn schedule_noise_and_velocity_match_diffusers() {
    let config = SchedulerConfig::from_diffusers_json(
        &fixtures_dir().join("model/scheduler/scheduler_config.json"),
    )
    .unwrap();
    let sd1 = SchedulerConfig::sd1();
    assert_eq!(
        (
            config.beta_start,
            config.beta_end,
            config.num_train_timesteps,
            config.beta_schedule
        ),
        (
            sd1.beta_start,
            sd1.beta_end,
            sd1.num_train_timesteps,
            sd1.beta_schedule
        )
    );
    let schedule = DdpmSchedule::new(&config);
    let inputs = inputs();
    let goldens = goldens();
    let alphas_cumprod = get(&goldens, "ddpm.alphas_cumprod");
    assert_eq!(alphas_cumprod.size(), [1000]);
    assert_close(
        schedule.alphas_cumprod(),
        alphas_cumprod,
        "ddpm.alphas_cumprod",
    );
    let x0 = get(&inputs, "ddpm.x0");
    let noise = get(&inputs, "ddpm.noise");
    let timesteps = get(&inputs, "ddpm.timesteps");
    schedule.check_timesteps(timesteps, x0.size()[0]).unwrap();
    assert_close(
        &schedule.add_noise(x0, noise, timesteps),
        get(&goldens, "ddpm.noisy"),
        "ddpm.noisy",
    );
    assert_close(
        &schedule.velocity(x0, noise, timesteps),
        get(&goldens, "ddpm.velocity"),
        "ddpm.velocity",
    );
}

#[test]
fn each_sample_gets_its_own_timestep() {
    let schedule = DdpmSchedule::sd1();
    let x0 = Tensor::ones([2, 1, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
    let noise = x0.zeros_like();
    let noisy = schedule.add_noise(&x0, &noise, &Tensor::from_slice(&[0i64, 999]));
    let first = noisy.double_value(&[0, 0, 0, 0]);
    let last = noisy.double_value(&[1, 0, 0, 0]);
    assert!((first - schedule.alpha_cumprod_at(0).sqrt()).abs() < 1e-6);
    assert!((last - schedule.alpha_cumprod_at(999).sqrt()).abs() < 1e-6);
    assert!(first > 0.99 && last < 0.1, "{first} {last}");
}

#[test]
fn v_prediction_target_is_the_velocity() {
    let mut config = SchedulerConfig::sd1();
    config.prediction_type = PredictionType::VPrediction;
    let schedule = DdpmSchedule::new(&config);
    let x0 = Tensor::randn([2, 4, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
    let noise = Tensor::randn([2, 4, 2, 2], (tch::Kind::Float, tch::Device::Cpu));
    let timesteps = Tensor::from_slice(&[5i64, 600]);
    let target = schedule.training_target(&x0, &noise, &timesteps);
    let velocity = schedule.velocity(&x0, &noise, &timesteps);
    assert_eq!(target, velocity);
    let epsilon_target = DdpmSchedule::sd1().training_target(&x0, &noise, &timesteps);
    assert_eq!(epsilon_target, noise);
}

#[test]
fn bad_timesteps_and_configs_are_errors_naming_the_field() {
    let schedule = DdpmSchedule::sd1();
    for (timesteps, batch) in [
        (Tensor::from_slice(&[0i64, 1000]), 2),
        (Tensor::from_slice(&[-1i64, 3]), 2),
        (Tensor::from_slice(&[1i64, 2, 3]), 2),
        (Tensor::from_slice(&[1.0f32, 2.0]), 2),
    ] {
        let error = schedule.check_timesteps(&timesteps, batch).unwrap_err();
        assert!(
            matches!(&error, WorkerError::Input { name, .. } if name == "timesteps"),
            "{error}"
        );
    }
    let directory = tempfile::tempdir().unwrap();
    let path = directory.path().join("scheduler_config.json");
    std::fs::write(&path, r#"{"beta_schedule": "squaredcos_cap_v2"}"#).unwrap();
    assert!(SchedulerConfig::from_diffusers_json(&path).is_err());
    std::fs::write(&path, r#"{"trained_betas": [0.1, 0.2]}"#).unwrap();
    let error = SchedulerConfig::from_diffusers_json(&path).unwrap_err();
    assert!(
        matches!(&error, WorkerError::Config { field, .. } if field == "trained_betas"),
        "{error}"
    );
}
