//! UNet2DConditionModel forward parity against diffusers (goldens from make_fixtures.py).

use crate::model_fixtures::{assert_close, fixtures_dir, get, goldens, inputs};
use arbor_worker::attention::{AttentionLayerInfo, KvContextTransform, UNetBlockPosition};
use arbor_worker::unet_2d::{UNet2DConditionConfig, UNet2DConditionModel};
use arbor_worker::WorkerError;
use tch::{nn, Device, Tensor};

fn load_unet() -> (nn::VarStore, UNet2DConditionModel) {
    let unet_dir = fixtures_dir().join("model/unet");
    let config = UNet2DConditionConfig::from_diffusers_json(&unet_dir.join("config.json"))
        .expect("fixture unet config");
    let mut vs = nn::VarStore::new(Device::Cpu);
    let unet = UNet2DConditionModel::new(vs.root(), &config);
    vs.load(unet_dir.join("diffusion_pytorch_model.safetensors"))
        .expect("every variable is in the diffusers state dict");
    (vs, unet)
}

#[test]
fn unet_forward_matches_diffusers() {
    let (vs, unet) = load_unet();
    let state_dict = crate::model_fixtures::read_tensors(
        &fixtures_dir().join("model/unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    assert_eq!(
        vs.variables().len(),
        state_dict.len(),
        "the model has exactly diffusers' parameters"
    );
    let inputs = inputs();
    let output = tch::no_grad(|| {
        unet.try_forward(
            get(&inputs, "unet.sample"),
            get(&inputs, "unet.timesteps"),
            get(&inputs, "unet.encoder_hidden_states"),
            None,
        )
        .unwrap()
    });
    assert_close(&output, get(&goldens(), "unet.out"), "unet.out");
}

#[test]
fn config_reads_the_fixture_dimensions() {
    let config =
        UNet2DConditionConfig::from_diffusers_json(&fixtures_dir().join("model/unet/config.json"))
            .unwrap();
    assert_eq!(config.block_out_channels, vec![32, 64, 64]);
    assert_eq!(config.layers_per_block, vec![2, 2, 2]);
    assert_eq!(config.cross_attention_dim, vec![48, 48, 48]);
    assert_eq!(config.attention_heads, vec![8, 8, 8]);
    assert_eq!(config.time_embedding_dim, 128);
}

#[test]
fn unsupported_config_is_an_error_naming_the_field() {
    let mut value: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("model/unet/config.json")).unwrap(),
    )
    .unwrap();
    value["addition_embed_type"] = serde_json::json!("text_time");
    let error =
        UNet2DConditionConfig::from_diffusers_value(&value, std::path::Path::new("unet.json"))
            .unwrap_err();
    assert!(
        matches!(&error, WorkerError::Config { field, .. } if field == "addition_embed_type"),
        "{error}"
    );
    value["addition_embed_type"] = serde_json::Value::Null;
    value["norm_num_groups"] = serde_json::json!(24);
    let error =
        UNet2DConditionConfig::from_diffusers_value(&value, std::path::Path::new("unet.json"))
            .unwrap_err();
    assert!(
        matches!(&error, WorkerError::Config { field, .. } if field == "norm_num_groups"),
        "{error}"
    );
}

#[test]
fn misshaped_inputs_are_errors_naming_the_input() {
    let (_vs, unet) = load_unet();
    let sample = Tensor::zeros([2, 3, 8, 8], (tch::Kind::Float, Device::Cpu));
    let timesteps = Tensor::from_slice(&[1i64, 2]);
    let context = Tensor::zeros([2, 77, 48], (tch::Kind::Float, Device::Cpu));
    let error = unet
        .try_forward(&sample, &timesteps, &context, None)
        .unwrap_err();
    assert!(
        matches!(&error, WorkerError::Input { name, .. } if name == "sample"),
        "{error}"
    );
    let sample = Tensor::zeros([2, 4, 8, 8], (tch::Kind::Float, Device::Cpu));
    let wrong_context = Tensor::zeros([2, 77, 64], (tch::Kind::Float, Device::Cpu));
    let error = unet
        .try_forward(&sample, &timesteps, &wrong_context, None)
        .unwrap_err();
    assert!(
        matches!(&error, WorkerError::Input { name, .. } if name == "encoder_hidden_states"),
        "{error}"
    );
    let wrong_timesteps = Tensor::from_slice(&[1i64, 2, 3]);
    let error = unet
        .try_forward(&sample, &wrong_timesteps, &context, None)
        .unwrap_err();
    assert!(
        matches!(&error, WorkerError::Input { name, .. } if name == "timesteps"),
        "{error}"
    );
}

/// Records the layers it sees and scales the value context of cross-attention by 0 only for
/// the context width 48, so the hook must change the output and see every layer.
struct RecordingTransform {
    seen: std::cell::RefCell<Vec<AttentionLayerInfo>>,
}

impl KvContextTransform for RecordingTransform {
    fn transform(&self, context: &Tensor, layer: &AttentionLayerInfo) -> (Tensor, Tensor) {
        self.seen.borrow_mut().push(layer.clone());
        if layer.context_dim == 48 {
            return (context.shallow_clone(), context * 0.0);
        }
        (context.shallow_clone(), context.shallow_clone())
    }
}

#[test]
fn kv_transform_sees_every_attention_layer_and_changes_the_output() {
    let (_vs, unet) = load_unet();
    let inputs = inputs();
    let transform = RecordingTransform {
        seen: Default::default(),
    };
    let (plain, hooked) = tch::no_grad(|| {
        let run = |hook: Option<&dyn KvContextTransform>| {
            unet.forward_with_kv_transform(
                get(&inputs, "unet.sample"),
                get(&inputs, "unet.timesteps"),
                get(&inputs, "unet.encoder_hidden_states"),
                hook,
            )
        };
        (run(None), run(Some(&transform)))
    });
    let seen = transform.seen.borrow();
    let expected: Vec<AttentionLayerInfo> = unet.attention_layers().into_iter().cloned().collect();
    assert_eq!(*seen, expected);
    // 2 cross-attn down blocks x 2 + mid 1 + 2 cross-attn up blocks x 3, each self + cross
    assert_eq!(seen.len(), (4 + 1 + 6) * 2);
    assert!(seen.iter().any(|layer| layer.name
        == "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
        && layer.is_cross_attention
        && layer.context_dim == 48
        && layer.query_dim == 32
        && layer.position == UNetBlockPosition::Down(0)));
    assert!(seen.iter().any(|layer| layer.name
        == "mid_block.attentions.0.transformer_blocks.0.attn1"
        && !layer.is_cross_attention
        && layer.context_dim == 64
        && layer.resolution_level == 2));
    let difference = (&plain - &hooked).abs().max().double_value(&[]);
    assert!(difference > 1e-3, "the hook changed nothing: {difference}");
}
