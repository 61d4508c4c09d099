//! The configuration of diffusers' `UNet2DConditionModel` (worker/src/unet_2d.rs): its
//! `unet/config.json` read with diffusers' defaults, checked against the supported SD1 topology
//! and resolved per block.

use std::path::Path;

use serde::Deserialize;

use crate::diffusers_config::{config_error, load_diffusers_config, parse_diffusers_config};
use crate::error::Result;
use crate::unet_blocks::BlockSettings;

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

/// diffusers' unet config.json as written by `save_pretrained`, with diffusers' defaults.
/// Unknown keys are ignored on purpose: this is an upstream format that grows keys over
/// releases. Every key that changes the computation is either used or checked to hold the value
/// the SD1 topology implies.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct DiffusersUNetConfig {
    in_channels: i64,
    out_channels: i64,
    center_input_sample: bool,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    down_block_types: Vec<String>,
    mid_block_type: Option<String>,
    up_block_types: Vec<String>,
    only_cross_attention: PerBlock<bool>,
    block_out_channels: Vec<i64>,
    layers_per_block: PerBlock<i64>,
    downsample_padding: i64,
    mid_block_scale_factor: f64,
    dropout: f64,
    act_fn: String,
    norm_num_groups: Option<i64>,
    norm_eps: f64,
    cross_attention_dim: PerBlock<i64>,
    transformer_layers_per_block: PerBlock<i64>,
    reverse_transformer_layers_per_block: Option<serde_json::Value>,
    encoder_hid_dim: Option<i64>,
    attention_head_dim: PerBlock<i64>,
    num_attention_heads: Option<PerBlock<i64>>,
    dual_cross_attention: bool,
    use_linear_projection: bool,
    class_embed_type: Option<String>,
    addition_embed_type: Option<String>,
    num_class_embeds: Option<i64>,
    resnet_time_scale_shift: String,
    resnet_skip_time_act: bool,
    resnet_out_scale_factor: f64,
    time_embedding_type: String,
    time_embedding_dim: Option<i64>,
    time_embedding_act_fn: Option<String>,
    timestep_post_act: Option<String>,
    time_cond_proj_dim: Option<i64>,
    conv_in_kernel: i64,
    conv_out_kernel: i64,
    attention_type: String,
    class_embeddings_concat: bool,
    mid_block_only_cross_attention: Option<bool>,
    cross_attention_norm: Option<String>,
}

/// The defaults of `UNet2DConditionModel.__init__`
/// (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/unets/unet_2d_condition.py>).
impl Default for DiffusersUNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".to_string()),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: "silu".to_string(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            reverse_transformer_layers_per_block: None,
            encoder_hid_dim: None,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: None,
            addition_embed_type: None,
            num_class_embeds: None,
            resnet_time_scale_shift: "default".to_string(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".to_string(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: "default".to_string(),
            class_embeddings_concat: false,
            mid_block_only_cross_attention: None,
            cross_attention_norm: None,
        }
    }
}

impl UNet2DConditionConfig {
    /// Reads and validates a diffusers `unet/config.json`.
    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        Self::from_raw(load_diffusers_config(path)?, path)
    }

    /// Validates a parsed diffusers unet config; `source` names it in errors.
    pub fn from_diffusers_value(value: &serde_json::Value, source: &Path) -> Result<Self> {
        Self::from_raw(parse_diffusers_config(value, source)?, source)
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

    pub(crate) fn block_settings(&self, block: usize, temb_channels: i64) -> BlockSettings {
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
