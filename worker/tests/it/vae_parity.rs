//! AutoencoderKL parity against diffusers (goldens from make_fixtures.py).

use crate::model_fixtures::{assert_close, fixtures_dir, get, goldens, inputs};
use arbor_worker::vae::{AutoencoderKL, AutoencoderKLConfig};
use arbor_worker::WorkerError;
use tch::{nn, Device, Kind, Tensor};

fn load_vae() -> (nn::VarStore, AutoencoderKL) {
    let vae_dir = fixtures_dir().join("model/vae");
    let config = AutoencoderKLConfig::from_diffusers_json(&vae_dir.join("config.json"))
        .expect("fixture vae config");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let vae = AutoencoderKL::new(vs.root(), &config);
    vs.load(vae_dir.join("diffusion_pytorch_model.safetensors"))
        .expect("every variable is in the diffusers state dict");
    let state_dict =
        crate::model_fixtures::read_tensors(&vae_dir.join("diffusion_pytorch_model.safetensors"))
            .unwrap();
    assert_eq!(
        vs.variables().len(),
        state_dict.len(),
        "exactly diffusers' parameters"
    );
    (vs, vae)
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    let (_vs, vae) = load_vae();
    let inputs = inputs();
    let goldens = goldens();
    let image = get(&inputs, "vae.image");
    vae.check_image(image).unwrap();
    tch::no_grad(|| {
        let posterior = vae.encode(image);
        assert_close(
            &posterior.mean,
            get(&goldens, "vae.posterior_mean"),
            "vae.posterior_mean",
        );
        assert_close(
            &posterior.logvar,
            get(&goldens, "vae.posterior_logvar"),
            "vae.posterior_logvar",
        );
        let scaled = &posterior.mean * vae.scaling_factor();
        assert_close(
            &scaled,
            get(&goldens, "vae.latents_scaled"),
            "vae.latents_scaled",
        );
        let decoded = vae.decode(&posterior.mean);
        assert_close(
            &decoded,
            get(&goldens, "vae.decode_of_mean"),
            "vae.decode_of_mean",
        );
    });
    assert_eq!(vae.scaling_factor(), 0.18215);
}

#[test]
fn misshaped_image_is_an_error_naming_the_input() {
    let (_vs, vae) = load_vae();
    let odd = Tensor::zeros([1, 3, 31, 32], (Kind::Float, Device::Cpu));
    let error = vae.check_image(&odd).unwrap_err();
    assert!(
        matches!(&error, WorkerError::Input { name, .. } if name == "image"),
        "{error}"
    );
    let gray = Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu));
    assert!(vae.check_image(&gray).is_err());
}

#[test]
fn unsupported_vae_config_is_an_error_naming_the_field() {
    let value = serde_json::json!({
        "block_out_channels": [32, 64],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D"],
    });
    let error = AutoencoderKLConfig::from_diffusers_value(&value, std::path::Path::new("vae.json"))
        .unwrap_err();
    assert!(
        matches!(&error, WorkerError::Config { field, .. } if field == "up_block_types"),
        "{error}"
    );
    assert_eq!(AutoencoderKLConfig::sd1().scaling_factor, 0.18215);
}
