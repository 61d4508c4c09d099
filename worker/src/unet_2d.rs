//! diffusers' `UNet2DConditionModel` in the SD1 topology, every dimension read from the unet's
//! `config.json`. Variable paths are diffusers' state-dict names, so a diffusers
//! `diffusion_pytorch_model.safetensors` loads by name.

use std::path::Path;

use serde::Deserialize;
use tch::{nn, nn::Module, Tensor};

use crate::attention::{AttentionLayerInfo, KvContextTransform, LayerPlacement, UNetBlockPosition};
use crate::embeddings::{TimestepEmbedding, TimestepProjection};
use crate::error::{Result, WorkerError};
use crate::unet_blocks::{BlockSettings, DownBlock, MidBlockCrossAttn, UpBlock};

/// A down block of the supported topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownBlockType {
    CrossAttnDownBlock2D,
    DownBlock2D,
}

/// An up block of the supported topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpBlockType {
    CrossAttnUpBlock2D,
    UpBlock2D,
}

/// The validated, per-block-resolved configuration of a UNet2DConditionModel.
#[derive(Debug, Clone, PartialEq)]
pub struct UNet2DConditionConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<DownBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    pub block_out_channels: Vec<i64>,
    /// Resnets per down block (up blocks have one more), per block.
    pub layers_per_block: Vec<i64>,
    pub downsample_padding: i64,
    pub mid_block_scale_factor: f64,
    pub norm_num_groups: i64,
    pub norm_eps: f64,
    /// Context width of the cross-attention, per down block.
    pub cross_attention_dim: Vec<i64>,
    pub transformer_layers_per_block: Vec<i64>,
    /// Attention heads per down block (diffusers' `num_attention_heads`, which falls back to the
    /// misnamed `attention_head_dim`).
    pub attention_heads: Vec<i64>,
    pub use_linear_projection: bool,
    pub time_embedding_dim: i64,
}

/// An int or a per-block list, as diffusers' config.json writes them.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    fn expand(&self, blocks: usize, field: &str, source: &Path) -> Result<Vec<T>> {
        match self {
            PerBlock::One(value) => Ok(vec![value.clone(); blocks]),
            PerBlock::Each(values) if values.len() == blocks => Ok(values.clone()),
            PerBlock::Each(values) => Err(config_error(
                source,
                field,
                format!(
                    "has {} entries but the model has {blocks} blocks",
                    values.len()
                ),
            )),
        }
    }
}

fn config_error(source: &Path, field: &str, message: impl Into<String>) -> WorkerError {
    WorkerError::Config {
        path: source.to_path_buf(),
        field: field.to_string(),
        message: message.into(),
    }
}

fn default_sd1_down_blocks() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}

fn default_sd1_up_blocks() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}

/// diffusers' unet config.json as written by `save_pretrained`, with diffusers' defaults.
/// Unknown keys are ignored on purpose: this is an upstream format that grows keys over
/// releases. Every key that changes the computation is either used or checked to hold the value
/// the SD1 topology implies.
#[derive(Debug, Deserialize)]
struct DiffusersUNetConfig {
    #[serde(default = "four")]
    in_channels: i64,
    #[serde(default = "four")]
    out_channels: i64,
    #[serde(default)]
    center_input_sample: bool,
    #[serde(default = "yes")]
    flip_sin_to_cos: bool,
    #[serde(default)]
    freq_shift: f64,
    #[serde(default = "default_sd1_down_blocks")]
    down_block_types: Vec<String>,
    #[serde(default = "default_mid_block_type")]
    mid_block_type: Option<String>,
    #[serde(default = "default_sd1_up_blocks")]
    up_block_types: Vec<String>,
    #[serde(default = "no_per_block")]
    only_cross_attention: PerBlock<bool>,
    #[serde(default = "default_block_out_channels")]
    block_out_channels: Vec<i64>,
    #[serde(default = "two_per_block")]
    layers_per_block: PerBlock<i64>,
    #[serde(default = "one")]
    downsample_padding: i64,
    #[serde(default = "one_f64")]
    mid_block_scale_factor: f64,
    #[serde(default)]
    dropout: f64,
    #[serde(default = "silu")]
    act_fn: String,
    #[serde(default = "thirty_two")]
    norm_num_groups: Option<i64>,
    #[serde(default = "default_norm_eps")]
    norm_eps: f64,
    #[serde(default = "default_cross_attention_dim")]
    cross_attention_dim: PerBlock<i64>,
    #[serde(default = "one_per_block")]
    transformer_layers_per_block: PerBlock<i64>,
    #[serde(default)]
    reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    encoder_hid_dim: Option<i64>,
    #[serde(default = "eight_per_block")]
    attention_head_dim: PerBlock<i64>,
    #[serde(default)]
    num_attention_heads: Option<PerBlock<i64>>,
    #[serde(default)]
    dual_cross_attention: bool,
    #[serde(default)]
    use_linear_projection: bool,
    #[serde(default)]
    class_embed_type: Option<String>,
    #[serde(default)]
    addition_embed_type: Option<String>,
    #[serde(default)]
    num_class_embeds: Option<i64>,
    #[serde(default = "default_string")]
    resnet_time_scale_shift: String,
    #[serde(default)]
    resnet_skip_time_act: bool,
    #[serde(default = "one_f64")]
    resnet_out_scale_factor: f64,
    #[serde(default = "positional")]
    time_embedding_type: String,
    #[serde(default)]
    time_embedding_dim: Option<i64>,
    #[serde(default)]
    time_embedding_act_fn: Option<String>,
    #[serde(default)]
    timestep_post_act: Option<String>,
    #[serde(default)]
    time_cond_proj_dim: Option<i64>,
    #[serde(default = "three")]
    conv_in_kernel: i64,
    #[serde(default = "three")]
    conv_out_kernel: i64,
    #[serde(default = "default_string")]
    attention_type: String,
    #[serde(default)]
    class_embeddings_concat: bool,
    #[serde(default)]
    mid_block_only_cross_attention: Option<bool>,
    #[serde(default)]
    cross_attention_norm: Option<String>,
}

fn one() -> i64 {
    1
}
fn three() -> i64 {
    3
}
fn four() -> i64 {
    4
}
fn one_f64() -> f64 {
    1.0
}
fn yes() -> bool {
    true
}
fn thirty_two() -> Option<i64> {
    Some(32)
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn silu() -> String {
    "silu".to_string()
}
fn positional() -> String {
    "positional".to_string()
}
fn default_string() -> String {
    "default".to_string()
}
fn default_mid_block_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".to_string())
}
fn default_block_out_channels() -> Vec<i64> {
    vec![320, 640, 1280, 1280]
}
fn default_cross_attention_dim() -> PerBlock<i64> {
    PerBlock::One(1280)
}
fn no_per_block() -> PerBlock<bool> {
    PerBlock::One(false)
}
fn one_per_block() -> PerBlock<i64> {
    PerBlock::One(1)
}
fn two_per_block() -> PerBlock<i64> {
    PerBlock::One(2)
}
fn eight_per_block() -> PerBlock<i64> {
    PerBlock::One(8)
}

impl UNet2DConditionConfig {
    /// Reads and validates a diffusers `unet/config.json`.
    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(WorkerError::io(path))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| WorkerError::Json {
                path: path.to_path_buf(),
                source,
            })?;
        Self::from_diffusers_value(&value, path)
    }

    /// Validates a parsed diffusers unet config; `source` names it in errors.
    pub fn from_diffusers_value(value: &serde_json::Value, source: &Path) -> Result<Self> {
        let raw: DiffusersUNetConfig =
            serde_json::from_value(value.clone()).map_err(|error| WorkerError::Json {
                path: source.to_path_buf(),
                source: error,
            })?;
        Self::from_raw(raw, source)
    }

    fn from_raw(raw: DiffusersUNetConfig, source: &Path) -> Result<Self> {
        let blocks = raw.block_out_channels.len();
        let require = |condition: bool, field: &str, message: &str| {
            if condition {
                Ok(())
            } else {
                Err(config_error(source, field, message))
            }
        };
        require(blocks > 0, "block_out_channels", "must not be empty")?;
        require(
            raw.down_block_types.len() == blocks,
            "down_block_types",
            "must have one entry per block_out_channels entry",
        )?;
        require(
            raw.up_block_types.len() == blocks,
            "up_block_types",
            "must have one entry per block_out_channels entry",
        )?;
        let down_block_types = raw
            .down_block_types
            .iter()
            .map(|name| match name.as_str() {
                "CrossAttnDownBlock2D" => Ok(DownBlockType::CrossAttnDownBlock2D),
                "DownBlock2D" => Ok(DownBlockType::DownBlock2D),
                other => Err(config_error(
                    source,
                    "down_block_types",
                    format!("unsupported block `{other}` (supported: CrossAttnDownBlock2D, DownBlock2D)"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_block_types = raw
            .up_block_types
            .iter()
            .map(|name| match name.as_str() {
                "CrossAttnUpBlock2D" => Ok(UpBlockType::CrossAttnUpBlock2D),
                "UpBlock2D" => Ok(UpBlockType::UpBlock2D),
                other => Err(config_error(
                    source,
                    "up_block_types",
                    format!(
                        "unsupported block `{other}` (supported: CrossAttnUpBlock2D, UpBlock2D)"
                    ),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        require(
            raw.mid_block_type.as_deref() == Some("UNetMidBlock2DCrossAttn"),
            "mid_block_type",
            "only UNetMidBlock2DCrossAttn is supported",
        )?;
        let only_cross = raw
            .only_cross_attention
            .expand(blocks, "only_cross_attention", source)?;
        require(
            only_cross.iter().all(|flag| !flag),
            "only_cross_attention",
            "must be false",
        )?;
        require(raw.act_fn == "silu", "act_fn", "only silu is supported")?;
        require(raw.dropout == 0.0, "dropout", "only 0.0 is supported")?;
        require(
            raw.time_embedding_type == "positional",
            "time_embedding_type",
            "only positional is supported",
        )?;
        require(
            raw.resnet_time_scale_shift == "default",
            "resnet_time_scale_shift",
            "only default is supported",
        )?;
        require(
            !raw.resnet_skip_time_act,
            "resnet_skip_time_act",
            "must be false",
        )?;
        require(
            raw.resnet_out_scale_factor == 1.0,
            "resnet_out_scale_factor",
            "only 1.0 is supported",
        )?;
        require(
            !raw.dual_cross_attention,
            "dual_cross_attention",
            "must be false",
        )?;
        require(
            raw.class_embed_type.is_none(),
            "class_embed_type",
            "must be null",
        )?;
        require(
            raw.num_class_embeds.is_none(),
            "num_class_embeds",
            "must be null",
        )?;
        require(
            !raw.class_embeddings_concat,
            "class_embeddings_concat",
            "must be false",
        )?;
        require(
            raw.addition_embed_type.is_none(),
            "addition_embed_type",
            "must be null",
        )?;
        require(
            raw.encoder_hid_dim.is_none(),
            "encoder_hid_dim",
            "must be null",
        )?;
        require(
            raw.time_cond_proj_dim.is_none(),
            "time_cond_proj_dim",
            "must be null",
        )?;
        require(
            raw.time_embedding_act_fn.is_none(),
            "time_embedding_act_fn",
            "must be null",
        )?;
        require(
            raw.timestep_post_act.is_none(),
            "timestep_post_act",
            "must be null",
        )?;
        require(
            raw.conv_in_kernel == 3,
            "conv_in_kernel",
            "only 3 is supported",
        )?;
        require(
            raw.conv_out_kernel == 3,
            "conv_out_kernel",
            "only 3 is supported",
        )?;
        require(
            raw.attention_type == "default",
            "attention_type",
            "only default is supported",
        )?;
        require(
            raw.cross_attention_norm.is_none(),
            "cross_attention_norm",
            "must be null",
        )?;
        require(
            raw.mid_block_only_cross_attention != Some(true),
            "mid_block_only_cross_attention",
            "must be false or null",
        )?;
        require(
            raw.reverse_transformer_layers_per_block
                .as_ref()
                .is_none_or(|value| value.is_null()),
            "reverse_transformer_layers_per_block",
            "must be null",
        )?;
        let norm_num_groups = raw.norm_num_groups.ok_or_else(|| {
            config_error(
                source,
                "norm_num_groups",
                "must be set (null is not supported)",
            )
        })?;
        let attention_heads = raw
            .num_attention_heads
            .as_ref()
            .unwrap_or(&raw.attention_head_dim)
            .expand(blocks, "attention_head_dim", source)?;
        let config = UNet2DConditionConfig {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            center_input_sample: raw.center_input_sample,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
            down_block_types,
            up_block_types,
            layers_per_block: raw
                .layers_per_block
                .expand(blocks, "layers_per_block", source)?,
            downsample_padding: raw.downsample_padding,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            norm_num_groups,
            norm_eps: raw.norm_eps,
            cross_attention_dim: raw.cross_attention_dim.expand(
                blocks,
                "cross_attention_dim",
                source,
            )?,
            transformer_layers_per_block: raw.transformer_layers_per_block.expand(
                blocks,
                "transformer_layers_per_block",
                source,
            )?,
            attention_heads,
            use_linear_projection: raw.use_linear_projection,
            time_embedding_dim: raw
                .time_embedding_dim
                .unwrap_or(raw.block_out_channels[0] * 4),
            block_out_channels: raw.block_out_channels,
        };
        config.validate(source)?;
        Ok(config)
    }

    /// Stable Diffusion 1.x's UNet (diffusers' defaults with cross_attention_dim 768).
    pub fn sd1() -> Self {
        let value = serde_json::json!({ "cross_attention_dim": 768, "sample_size": 64 });
        Self::from_diffusers_value(&value, Path::new("<sd1 preset>"))
            .expect("the sd1 preset is a valid config")
    }

    /// Checks the dimensions agree (channels divisible by groups and heads, positive sizes).
    pub fn validate(&self, source: &Path) -> Result<()> {
        let blocks = self.block_out_channels.len();
        let positive = |values: &[i64], field: &str| {
            if values.len() == blocks && values.iter().all(|value| *value > 0) {
                Ok(())
            } else {
                Err(config_error(
                    source,
                    field,
                    format!("needs {blocks} positive entries, got {values:?}"),
                ))
            }
        };
        positive(&self.block_out_channels, "block_out_channels")?;
        positive(&self.layers_per_block, "layers_per_block")?;
        positive(&self.cross_attention_dim, "cross_attention_dim")?;
        positive(
            &self.transformer_layers_per_block,
            "transformer_layers_per_block",
        )?;
        positive(&self.attention_heads, "attention_head_dim")?;
        if self.down_block_types.len() != blocks || self.up_block_types.len() != blocks {
            return Err(config_error(
                source,
                "down_block_types",
                "down and up block types need one entry per block",
            ));
        }
        if self.in_channels <= 0 || self.out_channels <= 0 {
            return Err(config_error(
                source,
                "in_channels",
                "channels must be positive",
            ));
        }
        if self.norm_num_groups <= 0 {
            return Err(config_error(source, "norm_num_groups", "must be positive"));
        }
        for (index, channels) in self.block_out_channels.iter().enumerate() {
            if channels % self.norm_num_groups != 0 {
                return Err(config_error(
                    source,
                    "norm_num_groups",
                    format!(
                        "{} does not divide block_out_channels[{index}] = {channels}",
                        self.norm_num_groups
                    ),
                ));
            }
            if channels % self.attention_heads[index] != 0 {
                return Err(config_error(
                    source,
                    "attention_head_dim",
                    format!(
                        "{} heads do not divide block_out_channels[{index}] = {channels}",
                        self.attention_heads[index]
                    ),
                ));
            }
        }
        Ok(())
    }

    fn block_settings(&self, block: usize, temb_channels: i64) -> BlockSettings {
        BlockSettings {
            temb_channels,
            resnet_groups: self.norm_num_groups,
            resnet_eps: self.norm_eps,
            cross_attention_dim: self.cross_attention_dim[block],
            attention_heads: self.attention_heads[block],
            transformer_layers: self.transformer_layers_per_block[block],
            use_linear_projection: self.use_linear_projection,
        }
    }
}

/// diffusers' UNet2DConditionModel (SD1 topology).
#[derive(Debug)]
pub struct UNet2DConditionModel {
    config: UNet2DConditionConfig,
    conv_in: nn::Conv2D,
    time_proj: TimestepProjection,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlockCrossAttn,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl UNet2DConditionModel {
    /// Creates the variables under `vs` with diffusers' state-dict names.
    pub fn new(vs: nn::Path, config: &UNet2DConditionConfig) -> Self {
        let channels = &config.block_out_channels;
        let blocks = channels.len();
        let conv3 = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = nn::conv2d(&vs / "conv_in", config.in_channels, channels[0], 3, conv3);
        let time_proj =
            TimestepProjection::new(channels[0], config.flip_sin_to_cos, config.freq_shift);
        let temb_channels = config.time_embedding_dim;
        let time_embedding =
            TimestepEmbedding::new(&vs / "time_embedding", channels[0], temb_channels);

        let mut down_blocks = Vec::with_capacity(blocks);
        let mut output_channels = channels[0];
        for (index, block_type) in config.down_block_types.iter().enumerate() {
            let input_channels = output_channels;
            output_channels = channels[index];
            down_blocks.push(DownBlock::new(
                &vs / "down_blocks" / index,
                &config.block_settings(index, temb_channels),
                config.layers_per_block[index],
                input_channels,
                output_channels,
                *block_type == DownBlockType::CrossAttnDownBlock2D,
                index + 1 < blocks,
                config.downsample_padding,
                LayerPlacement {
                    position: UNetBlockPosition::Down(index),
                    resolution_level: index,
                },
            ));
        }

        let mid_block = MidBlockCrossAttn::new(
            &vs / "mid_block",
            &config.block_settings(blocks - 1, temb_channels),
            channels[blocks - 1],
            config.mid_block_scale_factor,
            LayerPlacement {
                position: UNetBlockPosition::Mid,
                resolution_level: blocks - 1,
            },
        );

        let mut up_blocks = Vec::with_capacity(blocks);
        let mut output_channels = channels[blocks - 1];
        for (index, block_type) in config.up_block_types.iter().enumerate() {
            let reversed = blocks - 1 - index;
            let prev_output_channels = output_channels;
            output_channels = channels[reversed];
            let input_channels = channels[reversed.saturating_sub(1)];
            up_blocks.push(UpBlock::new(
                &vs / "up_blocks" / index,
                &config.block_settings(reversed, temb_channels),
                config.layers_per_block[reversed] + 1,
                input_channels,
                prev_output_channels,
                output_channels,
                *block_type == UpBlockType::CrossAttnUpBlock2D,
                index + 1 < blocks,
                LayerPlacement {
                    position: UNetBlockPosition::Up(index),
                    resolution_level: reversed,
                },
            ));
        }

        let conv_norm_out = nn::group_norm(
            &vs / "conv_norm_out",
            config.norm_num_groups,
            channels[0],
            nn::GroupNormConfig {
                eps: config.norm_eps,
                ..Default::default()
            },
        );
        let conv_out = nn::conv2d(&vs / "conv_out", channels[0], config.out_channels, 3, conv3);
        Self {
            config: config.clone(),
            conv_in,
            time_proj,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
        }
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// Every attention layer, in forward order (for hypernetwork-style transforms).
    pub fn attention_layers(&self) -> Vec<&AttentionLayerInfo> {
        let mut layers = Vec::new();
        for block in &self.down_blocks {
            layers.extend(block.attention_layers());
        }
        layers.extend(self.mid_block.attention_layers());
        for block in &self.up_blocks {
            layers.extend(block.attention_layers());
        }
        layers
    }

    /// Checks the input shapes and kinds against the config, naming the input at fault.
    pub fn check_inputs(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<()> {
        let input_error = |name: &str, message: String| WorkerError::Input {
            name: name.to_string(),
            message,
        };
        let sample_shape = sample.size();
        if sample_shape.len() != 4 || sample_shape[1] != self.config.in_channels {
            return Err(input_error(
                "sample",
                format!(
                    "expected [B, {}, H, W], got {sample_shape:?}",
                    self.config.in_channels
                ),
            ));
        }
        let batch = sample_shape[0];
        let timesteps_shape = timesteps.size();
        let timesteps_ok =
            timesteps_shape.is_empty() || timesteps_shape == [1] || timesteps_shape == [batch];
        if !timesteps_ok {
            return Err(input_error(
                "timesteps",
                format!("expected a scalar, [1] or [{batch}], got {timesteps_shape:?}"),
            ));
        }
        let context_shape = encoder_hidden_states.size();
        let context_dim = self.config.cross_attention_dim[0];
        if context_shape.len() != 3 || context_shape[0] != batch || context_shape[2] != context_dim
        {
            return Err(input_error(
                "encoder_hidden_states",
                format!("expected [{batch}, L, {context_dim}], got {context_shape:?}"),
            ));
        }
        for (name, tensor) in [
            ("sample", sample),
            ("encoder_hidden_states", encoder_hidden_states),
        ] {
            if !tensor.is_floating_point() {
                return Err(input_error(
                    name,
                    format!("expected a floating-point tensor, got {:?}", tensor.kind()),
                ));
            }
        }
        Ok(())
    }

    /// Checked forward: validates the inputs first.
    pub fn try_forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        kv_transform: Option<&dyn KvContextTransform>,
    ) -> Result<Tensor> {
        self.check_inputs(sample, timesteps, encoder_hidden_states)?;
        Ok(self.forward_with_kv_transform(sample, timesteps, encoder_hidden_states, kv_transform))
    }

    /// Predicts the noise (or v) for `sample` [B, C, H, W] at per-sample `timesteps` ([B], [1]
    /// or a scalar) given `encoder_hidden_states` [B, L, cross_attention_dim].
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Tensor {
        self.forward_with_kv_transform(sample, timesteps, encoder_hidden_states, None)
    }

    /// [`Self::forward`] with an optional transform of every attention layer's k/v context.
    pub fn forward_with_kv_transform(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        kv_transform: Option<&dyn KvContextTransform>,
    ) -> Tensor {
        let batch = sample.size()[0];
        let timesteps = timesteps.reshape([-1]).expand([batch], false);
        let projected = self.time_proj.forward(&timesteps).to_kind(sample.kind());
        let activated_temb = self.time_embedding.forward(&projected).silu();

        let sample = if self.config.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample.shallow_clone()
        };
        let mut hidden = self.conv_in.forward(&sample);
        let mut skips = vec![hidden.shallow_clone()];
        for block in &self.down_blocks {
            let (output, block_skips) = block.forward(
                &hidden,
                &activated_temb,
                encoder_hidden_states,
                kv_transform,
            );
            hidden = output;
            skips.extend(block_skips);
        }
        hidden = self.mid_block.forward(
            &hidden,
            &activated_temb,
            encoder_hidden_states,
            kv_transform,
        );
        for block in &self.up_blocks {
            let remaining = skips.len() - block.num_skips();
            let upsample_size = remaining.checked_sub(1).map(|last| {
                let shape = skips[last].size();
                [shape[2], shape[3]]
            });
            hidden = block.forward(
                &hidden,
                &mut skips,
                &activated_temb,
                encoder_hidden_states,
                kv_transform,
                upsample_size,
            );
        }
        let hidden = self.conv_norm_out.forward(&hidden).silu();
        self.conv_out.forward(&hidden)
    }
}
