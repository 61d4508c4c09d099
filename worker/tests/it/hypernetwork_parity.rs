//! Hypernetwork parity with the committed Python reference (A1111's HypernetworkModule applied
//! inside diffusers' attention, make_hypernetwork_fixtures.py): the UNet output, the loss and the
//! gradient of every module parameter, for hypernetworks read from `.pt` files written by
//! `torch.save` (torch 2.13: with `byteorder`, `.format_version` and `.data/serialization_id`).

use crate::hypernetwork_fixtures::{
    fixtures_dir, get, load_unet, max_abs_diff, read_tensors, ACTIVATIONS, CASES, FORWARD_ATOL,
    GRAD_RTOL, GRAD_SCALE_FLOOR,
};
use arbor_worker::hypernetwork::module::{HypernetworkModule, HypernetworkStructure};
use arbor_worker::hypernetwork::Hypernetwork;
use tch::{nn, Device, Reduction};

#[test]
fn torch_saved_hypernetworks_match_diffusers_forward_and_gradients() {
    let (_unet_vars, unet) = load_unet();
    for case in CASES {
        let hypernetwork =
            Hypernetwork::load_pt(&fixtures_dir().join(format!("{case}.pt")), Device::Cpu)
                .unwrap_or_else(|error| panic!("{case}: {error}"));
        let tensors = read_tensors(&fixtures_dir().join(format!("{case}.safetensors")));
        let output = unet
            .try_forward(
                get(&tensors, "hn.sample"),
                get(&tensors, "hn.timesteps"),
                get(&tensors, "hn.encoder_hidden_states"),
                Some(&hypernetwork),
            )
            .unwrap();
        let expected_output = get(&tensors, "hn.unet_out");
        let forward_error = max_abs_diff(&output, expected_output, "hn.unet_out");
        let effect = max_abs_diff(
            expected_output,
            get(&tensors, "hn.unet_out_without"),
            "effect",
        );
        println!("{case}: hn.unet_out max abs error {forward_error:.3e} (hypernetwork effect {effect:.3e})");
        assert!(
            forward_error <= FORWARD_ATOL,
            "{case}: hn.unet_out error {forward_error:e}"
        );
        assert!(
            effect > 100.0 * FORWARD_ATOL,
            "{case}: the hypernetwork must change the output"
        );

        let loss = output.mse_loss(get(&tensors, "hn.target"), Reduction::Mean);
        let expected_loss = get(&tensors, "hn.loss").double_value(&[]);
        let loss_value = loss.double_value(&[]);
        assert!(
            (loss_value - expected_loss).abs() <= 1e-5 * expected_loss.abs().max(1.0),
            "{case}: loss {loss_value} vs {expected_loss}"
        );
        hypernetwork.zero_grad();
        loss.backward();
        let gradients = hypernetwork.gradients();
        let expected_count = tensors
            .keys()
            .filter(|name| name.starts_with("hn.grad."))
            .count();
        assert_eq!(
            gradients.len(),
            expected_count,
            "{case}: one gradient per module parameter"
        );
        let mut worst = (0.0f64, String::new());
        for (name, gradient) in &gradients {
            let expected = get(&tensors, &format!("hn.grad.{name}"));
            let magnitude = expected.abs().max().double_value(&[]);
            assert!(magnitude > 0.0, "{case}: golden hn.grad.{name} is zero");
            let scale = magnitude.max(GRAD_SCALE_FLOOR);
            let relative = max_abs_diff(gradient, expected, name) / scale;
            if relative > worst.0 {
                worst = (relative, name.clone());
            }
            assert!(
                relative <= GRAD_RTOL,
                "{case}: hn.grad.{name} relative error {relative:e}"
            );
        }
        println!(
            "{case}: worst gradient relative error {:.3e} at {}",
            worst.0, worst.1
        );
    }
}

#[test]
fn every_activation_matches_the_a1111_module() {
    let tensors = read_tensors(&fixtures_dir().join("activations.safetensors"));
    for &activation in ACTIVATIONS {
        let name = activation.as_str();
        let structure = HypernetworkStructure {
            layer_structure: vec![1.0, 2.0, 1.0],
            activation,
            activate_output: true,
            ..Default::default()
        };
        let var_store = nn::VarStore::new(Device::Cpu);
        let module = HypernetworkModule::new(var_store.root(), 16, &structure);
        let prefix = format!("{name}.");
        let state: Vec<(String, tch::Tensor)> = tensors
            .iter()
            .filter_map(|(key, tensor)| {
                let key = key.strip_prefix(&prefix)?;
                key.starts_with("linear.")
                    .then(|| (key.to_string(), tensor.shallow_clone()))
            })
            .collect();
        module.load_state_dict(&state, name).unwrap();
        let output = module.forward(get(&tensors, &format!("{name}.x")), 1.0, false);
        let error = max_abs_diff(&output, get(&tensors, &format!("{name}.out")), name);
        println!("{name}: max abs error {error:.3e}");
        assert!(error <= 1e-5, "{name}: error {error:e}");
    }
}
