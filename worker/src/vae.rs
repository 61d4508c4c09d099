//! diffusers' `AutoencoderKL` (the SD VAE): encoder to a diagonal Gaussian posterior over
//! latents, decoder back to pixels, and the latent scaling factor from the config (0.18215 for
//! SD1). Variable paths are diffusers' state-dict names.

use std::path::Path;

use serde::Deserialize;
use tch::{nn, nn::Module, Tensor};

use crate::attention::GroupNormSelfAttention;
use crate::diffusers_config::{config_error, load_diffusers_config, parse_diffusers_config};
use crate::error::{Result, WorkerError};
use crate::resnet::{ResnetBlock2D, ResnetBlock2DConfig};
use crate::unet_blocks::{Downsample2D, Upsample2D};

/// The VAE's eps for every GroupNorm (hard-coded in diffusers' Encoder/Decoder).
const VAE_NORM_EPS: f64 = 1e-6;

/// The validated configuration of an AutoencoderKL.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoencoderKLConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    pub block_out_channels: Vec<i64>,
    pub layers_per_block: i64,
    pub latent_channels: i64,
    pub norm_num_groups: i64,
    pub scaling_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

/// diffusers' vae config.json (worker/src/diffusers_config.rs). Unknown keys are ignored on
/// purpose (an upstream format that grows keys); the keys that change the computation are used
/// or checked.
#[derive(Debug, Deserialize)]
#[serde(default)]
struct DiffusersVaeConfig {
    in_channels: i64,
    out_channels: i64,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    block_out_channels: Vec<i64>,
    layers_per_block: i64,
    act_fn: String,
    latent_channels: i64,
    norm_num_groups: i64,
    scaling_factor: f64,
    shift_factor: Option<f64>,
    use_quant_conv: bool,
    use_post_quant_conv: bool,
    mid_block_add_attention: bool,
}

/// The defaults of `AutoencoderKL.__init__`
/// (<https://github.com/huggingface/diffusers/blob/main/src/diffusers/models/autoencoders/autoencoder_kl.py>).
impl Default for DiffusersVaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".to_string()],
            up_block_types: vec!["UpDecoderBlock2D".to_string()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".to_string(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// Reads and validates a diffusers `vae/config.json`.
    pub fn from_diffusers_json(path: &Path) -> Result<Self> {
        Self::from_raw(load_diffusers_config(path)?, path)
    }

    /// Validates a parsed diffusers vae config; `source` names it in errors.
    pub fn from_diffusers_value(value: &serde_json::Value, source: &Path) -> Result<Self> {
        Self::from_raw(parse_diffusers_config(value, source)?, source)
    }

    fn from_raw(raw: DiffusersVaeConfig, source: &Path) -> Result<Self> {
        let blocks = raw.block_out_channels.len();
        if blocks == 0 {
            return Err(config_error(
                source,
                "block_out_channels",
                "must not be empty",
            ));
        }
        if raw.down_block_types.len() != blocks
            || raw
                .down_block_types
                .iter()
                .any(|name| name != "DownEncoderBlock2D")
        {
            return Err(config_error(
                source,
                "down_block_types",
                "needs one DownEncoderBlock2D per block_out_channels entry",
            ));
        }
        if raw.up_block_types.len() != blocks
            || raw
                .up_block_types
                .iter()
                .any(|name| name != "UpDecoderBlock2D")
        {
            return Err(config_error(
                source,
                "up_block_types",
                "needs one UpDecoderBlock2D per block_out_channels entry",
            ));
        }
        if raw.act_fn != "silu" {
            return Err(config_error(source, "act_fn", "only silu is supported"));
        }
        if raw.shift_factor.is_some_and(|shift| shift != 0.0) {
            return Err(config_error(source, "shift_factor", "must be null or 0"));
        }
        if raw.layers_per_block <= 0 || raw.latent_channels <= 0 || raw.norm_num_groups <= 0 {
            return Err(config_error(
                source,
                "layers_per_block",
                "layers_per_block, latent_channels and norm_num_groups must be positive",
            ));
        }
        if let Some(channels) = raw
            .block_out_channels
            .iter()
            .find(|channels| **channels <= 0 || *channels % raw.norm_num_groups != 0)
        {
            return Err(config_error(
                source,
                "block_out_channels",
                format!(
                    "{channels} is not a positive multiple of norm_num_groups {}",
                    raw.norm_num_groups
                ),
            ));
        }
        if !(raw.scaling_factor.is_finite() && raw.scaling_factor > 0.0) {
            return Err(config_error(source, "scaling_factor", "must be positive"));
        }
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels,
            layers_per_block: raw.layers_per_block,
            latent_channels: raw.latent_channels,
            norm_num_groups: raw.norm_num_groups,
            scaling_factor: raw.scaling_factor,
            use_quant_conv: raw.use_quant_conv,
            use_post_quant_conv: raw.use_post_quant_conv,
            mid_block_add_attention: raw.mid_block_add_attention,
        })
    }

    /// Stable Diffusion 1.x's VAE.
    pub fn sd1() -> Self {
        let value = serde_json::json!({
            "block_out_channels": [128, 256, 512, 512],
            "down_block_types": vec!["DownEncoderBlock2D"; 4],
            "up_block_types": vec!["UpDecoderBlock2D"; 4],
            "layers_per_block": 2,
            "sample_size": 512,
        });
        Self::from_diffusers_value(&value, Path::new("<sd1 preset>"))
            .expect("the sd1 preset is a valid config")
    }

    fn resnet(&self, in_channels: i64, out_channels: i64) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            in_channels,
            out_channels,
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: VAE_NORM_EPS,
            output_scale_factor: 1.0,
        }
    }
}

/// The posterior over latents: mean and log-variance (clamped to [-30, 20] as diffusers does).
#[derive(Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// Splits the encoder's [B, 2·C, h, w] moments into mean and log-variance.
    pub fn from_moments(moments: &Tensor) -> Self {
        let halves = moments.chunk(2, 1);
        Self {
            mean: halves[0].shallow_clone(),
            logvar: halves[1].clamp(-30.0, 20.0),
        }
    }

    pub fn std(&self) -> Tensor {
        (&self.logvar * 0.5).exp()
    }

    /// mean + std · ε with ε from libtorch's generator (seed it with `tch::manual_seed`).
    pub fn sample(&self) -> Tensor {
        &self.mean + self.std() * self.mean.randn_like()
    }

    /// mean + std · `noise` (a caller-drawn ε of the mean's shape).
    pub fn sample_with(&self, noise: &Tensor) -> Tensor {
        &self.mean + self.std() * noise
    }
}

/// The VAE mid block (`UNetMidBlock2D`): resnet, optional self-attention, resnet.
#[derive(Debug)]
struct VaeMidBlock {
    first: ResnetBlock2D,
    attention: Option<GroupNormSelfAttention>,
    second: ResnetBlock2D,
}

impl VaeMidBlock {
    fn new(vs: nn::Path, config: &AutoencoderKLConfig, channels: i64) -> Self {
        Self {
            first: ResnetBlock2D::new(&vs / "resnets" / 0, &config.resnet(channels, channels)),
            attention: config.mid_block_add_attention.then(|| {
                GroupNormSelfAttention::new(
                    &vs / "attentions" / 0,
                    channels,
                    channels,
                    config.norm_num_groups,
                    VAE_NORM_EPS,
                )
            }),
            second: ResnetBlock2D::new(&vs / "resnets" / 1, &config.resnet(channels, channels)),
        }
    }

    fn forward(&self, input: &Tensor) -> Tensor {
        let mut hidden = self.first.forward(input, None);
        if let Some(attention) = &self.attention {
            hidden = attention.forward(&hidden);
        }
        self.second.forward(&hidden, None)
    }
}

/// `DownEncoderBlock2D` / `UpDecoderBlock2D`: resnets then an optional resampler.
#[derive(Debug)]
struct VaeBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
    upsampler: Option<Upsample2D>,
}

impl VaeBlock {
    fn forward(&self, input: &Tensor) -> Tensor {
        let mut hidden = input.shallow_clone();
        for resnet in &self.resnets {
            hidden = resnet.forward(&hidden, None);
        }
        if let Some(downsampler) = &self.downsampler {
            hidden = downsampler.forward(&hidden);
        }
        if let Some(upsampler) = &self.upsampler {
            hidden = upsampler.forward(&hidden, None);
        }
        hidden
    }
}

fn conv3(vs: nn::Path, from: i64, to: i64) -> nn::Conv2D {
    nn::conv2d(
        vs,
        from,
        to,
        3,
        nn::ConvConfig {
            padding: 1,
            ..Default::default()
        },
    )
}

/// diffusers' `Encoder` with double_z.
#[derive(Debug)]
struct VaeEncoder {
    conv_in: nn::Conv2D,
    down_blocks: Vec<VaeBlock>,
    mid_block: VaeMidBlock,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl VaeEncoder {
    fn new(vs: nn::Path, config: &AutoencoderKLConfig) -> Self {
        let channels = &config.block_out_channels;
        let blocks = channels.len();
        let mut output_channels = channels[0];
        let down_blocks = (0..blocks)
            .map(|index| {
                let input_channels = output_channels;
                output_channels = channels[index];
                let block_vs = &vs / "down_blocks" / index;
                let resnets = (0..config.layers_per_block)
                    .map(|layer| {
                        let from = if layer == 0 {
                            input_channels
                        } else {
                            output_channels
                        };
                        ResnetBlock2D::new(
                            &block_vs / "resnets" / layer,
                            &config.resnet(from, output_channels),
                        )
                    })
                    .collect();
                let downsampler = (index + 1 < blocks)
                    .then(|| Downsample2D::new(&block_vs / "downsamplers" / 0, output_channels, 0));
                VaeBlock {
                    resnets,
                    downsampler,
                    upsampler: None,
                }
            })
            .collect();
        let last = channels[blocks - 1];
        Self {
            conv_in: conv3(&vs / "conv_in", config.in_channels, channels[0]),
            down_blocks,
            mid_block: VaeMidBlock::new(&vs / "mid_block", config, last),
            conv_norm_out: nn::group_norm(
                &vs / "conv_norm_out",
                config.norm_num_groups,
                last,
                nn::GroupNormConfig {
                    eps: VAE_NORM_EPS,
                    ..Default::default()
                },
            ),
            conv_out: conv3(&vs / "conv_out", last, 2 * config.latent_channels),
        }
    }

    fn forward(&self, image: &Tensor) -> Tensor {
        let mut hidden = self.conv_in.forward(image);
        for block in &self.down_blocks {
            hidden = block.forward(&hidden);
        }
        let hidden = self.mid_block.forward(&hidden);
        self.conv_out
            .forward(&self.conv_norm_out.forward(&hidden).silu())
    }
}

/// diffusers' `Decoder`.
#[derive(Debug)]
struct VaeDecoder {
    conv_in: nn::Conv2D,
    mid_block: VaeMidBlock,
    up_blocks: Vec<VaeBlock>,
    conv_norm_out: nn::GroupNorm,
    conv_out: nn::Conv2D,
}

impl VaeDecoder {
    fn new(vs: nn::Path, config: &AutoencoderKLConfig) -> Self {
        let channels = &config.block_out_channels;
        let blocks = channels.len();
        let mut output_channels = channels[blocks - 1];
        let up_blocks = (0..blocks)
            .map(|index| {
                let reversed = blocks - 1 - index;
                let prev_output_channels = output_channels;
                output_channels = channels[reversed];
                let block_vs = &vs / "up_blocks" / index;
                let resnets = (0..=config.layers_per_block)
                    .map(|layer| {
                        let from = if layer == 0 {
                            prev_output_channels
                        } else {
                            output_channels
                        };
                        ResnetBlock2D::new(
                            &block_vs / "resnets" / layer,
                            &config.resnet(from, output_channels),
                        )
                    })
                    .collect();
                let upsampler = (index + 1 < blocks)
                    .then(|| Upsample2D::new(&block_vs / "upsamplers" / 0, output_channels));
                VaeBlock {
                    resnets,
                    downsampler: None,
                    upsampler,
                }
            })
            .collect();
        let last = channels[blocks - 1];
        Self {
            conv_in: conv3(&vs / "conv_in", config.latent_channels, last),
            mid_block: VaeMidBlock::new(&vs / "mid_block", config, last),
            up_blocks,
            conv_norm_out: nn::group_norm(
                &vs / "conv_norm_out",
                config.norm_num_groups,
                channels[0],
                nn::GroupNormConfig {
                    eps: VAE_NORM_EPS,
                    ..Default::default()
                },
            ),
            conv_out: conv3(&vs / "conv_out", channels[0], config.out_channels),
        }
    }

    fn forward(&self, latents: &Tensor) -> Tensor {
        let mut hidden = self.mid_block.forward(&self.conv_in.forward(latents));
        for block in &self.up_blocks {
            hidden = block.forward(&hidden);
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&hidden).silu())
    }
}

/// diffusers' AutoencoderKL.
#[derive(Debug)]
pub struct AutoencoderKL {
    config: AutoencoderKLConfig,
    encoder: VaeEncoder,
    decoder: VaeDecoder,
    quant_conv: Option<nn::Conv2D>,
    post_quant_conv: Option<nn::Conv2D>,
}

impl AutoencoderKL {
    /// Creates the variables under `vs` with diffusers' state-dict names.
    pub fn new(vs: nn::Path, config: &AutoencoderKLConfig) -> Self {
        let latent = config.latent_channels;
        Self {
            config: config.clone(),
            encoder: VaeEncoder::new(&vs / "encoder", config),
            decoder: VaeDecoder::new(&vs / "decoder", config),
            quant_conv: config.use_quant_conv.then(|| {
                nn::conv2d(
                    &vs / "quant_conv",
                    2 * latent,
                    2 * latent,
                    1,
                    Default::default(),
                )
            }),
            post_quant_conv: config.use_post_quant_conv.then(|| {
                nn::conv2d(
                    &vs / "post_quant_conv",
                    latent,
                    latent,
                    1,
                    Default::default(),
                )
            }),
        }
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// The factor latents are multiplied by before the UNet sees them (0.18215 for SD1).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Checks an image batch is [B, in_channels, H, W] floating point, H and W divisible by the
    /// VAE's downsampling factor.
    pub fn check_image(&self, image: &Tensor) -> Result<()> {
        let shape = image.size();
        let factor = 1i64 << (self.config.block_out_channels.len() - 1);
        let ok = shape.len() == 4
            && shape[1] == self.config.in_channels
            && shape[2] % factor == 0
            && shape[3] % factor == 0
            && image.is_floating_point();
        if ok {
            return Ok(());
        }
        Err(WorkerError::Input {
            name: "image".to_string(),
            message: format!(
                "expected floating-point [B, {}, H, W] with H and W multiples of {factor}, got {shape:?} {:?}",
                self.config.in_channels,
                image.kind()
            ),
        })
    }

    /// Encodes images in [-1, 1] ([B, 3, H, W]) to the latent posterior.
    pub fn encode(&self, image: &Tensor) -> DiagonalGaussian {
        let moments = self.encoder.forward(image);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(&moments),
            None => moments,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Decodes (unscaled) latents to images in about [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> Tensor {
        let latents = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents),
            None => latents.shallow_clone(),
        };
        self.decoder.forward(&latents)
    }
}
