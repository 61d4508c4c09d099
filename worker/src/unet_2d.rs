//! diffusers' `UNet2DConditionModel` in the SD1 topology, every dimension read from the unet's
//! `config.json` (worker/src/unet_2d_config.rs). Variable paths are diffusers' state-dict names, so a diffusers
//! `diffusion_pytorch_model.safetensors` loads by name.

use tch::{nn, nn::Module, Tensor};

use crate::attention::{AttentionLayerInfo, KvContextTransform, LayerPlacement, UNetBlockPosition};
use crate::embeddings::{TimestepEmbedding, TimestepProjection};
use crate::error::{Result, WorkerError};
use crate::layer_adapter::{AdaptableLayers, AdaptableSite};
pub use crate::unet_2d_config::{DownBlockType, UNet2DConditionConfig, UpBlockType};
use crate::unet_blocks::{DownBlock, DownBlockConfig, MidBlockCrossAttn, UpBlock, UpBlockConfig};

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
                &DownBlockConfig {
                    num_layers: config.layers_per_block[index],
                    in_channels: input_channels,
                    out_channels: output_channels,
                    with_cross_attention: *block_type == DownBlockType::CrossAttnDownBlock2D,
                    add_downsample: index + 1 < blocks,
                    downsample_padding: config.downsample_padding,
                },
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
                &UpBlockConfig {
                    num_layers: config.layers_per_block[reversed] + 1,
                    in_channels: input_channels,
                    prev_output_channels,
                    out_channels: output_channels,
                    with_cross_attention: *block_type == UpBlockType::CrossAttnUpBlock2D,
                    add_upsample: index + 1 < blocks,
                },
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

impl AdaptableLayers for UNet2DConditionModel {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        self.down_blocks.adaptable_sites(sites);
        self.mid_block.adaptable_sites(sites);
        self.up_blocks.adaptable_sites(sites);
    }
}
