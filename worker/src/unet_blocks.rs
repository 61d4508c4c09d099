//! The UNet's blocks, as diffusers builds them: `CrossAttnDownBlock2D` / `DownBlock2D`
//! ([`DownBlock`]), `UNetMidBlock2DCrossAttn` ([`MidBlockCrossAttn`]), `CrossAttnUpBlock2D` /
//! `UpBlock2D` ([`UpBlock`]), and the strided-conv [`Downsample2D`] / nearest+conv
//! [`Upsample2D`] (also used by the VAE).

use tch::{nn, nn::Module, Tensor};

use crate::attention::{
    AttentionLayerInfo, KvContextTransform, LayerPlacement, Transformer2DConfig, Transformer2DModel,
};
use crate::layer_adapter::{
    adaptable_conv2d, AdaptableConv2d, AdaptableLayers, AdaptableSite, LayerRole,
};
use crate::resnet::{ResnetBlock2D, ResnetBlock2DConfig};

/// diffusers' `Downsample2D` with `use_conv=True` (weights under `conv`): a 3x3 stride-2 conv;
/// with padding 0 the input is first padded by one on the right and bottom (the VAE's layout).
#[derive(Debug)]
pub struct Downsample2D {
    conv: AdaptableConv2d,
    pad_right_bottom: bool,
}

impl Downsample2D {
    pub fn new(vs: nn::Path, channels: i64, padding: i64) -> Self {
        let conv = adaptable_conv2d(
            &(&vs / "conv"),
            LayerRole::ResnetConv,
            channels,
            channels,
            3,
            nn::ConvConfig {
                stride: 2,
                padding,
                ..Default::default()
            },
        );
        Self {
            conv,
            pad_right_bottom: padding == 0,
        }
    }

    pub fn forward(&self, input: &Tensor) -> Tensor {
        if self.pad_right_bottom {
            return self.conv.forward(&input.constant_pad_nd([0, 1, 0, 1]));
        }
        self.conv.forward(input)
    }
}

/// diffusers' `Upsample2D` with `use_conv=True`: nearest-neighbour upsampling (to `size`, or 2x)
/// then a 3x3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    conv: AdaptableConv2d,
}

impl Upsample2D {
    pub fn new(vs: nn::Path, channels: i64) -> Self {
        let conv = adaptable_conv2d(
            &(&vs / "conv"),
            LayerRole::ResnetConv,
            channels,
            channels,
            3,
            nn::ConvConfig {
                padding: 1,
                ..Default::default()
            },
        );
        Self { conv }
    }

    pub fn forward(&self, input: &Tensor, size: Option<[i64; 2]>) -> Tensor {
        let size = size.unwrap_or_else(|| {
            let shape = input.size();
            [shape[2] * 2, shape[3] * 2]
        });
        self.conv
            .forward(&input.upsample_nearest2d(size, None, None))
    }
}

impl AdaptableLayers for Downsample2D {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        sites.push(self.conv.site());
    }
}

impl AdaptableLayers for Upsample2D {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        sites.push(self.conv.site());
    }
}

/// Settings shared by the blocks of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct BlockSettings {
    pub temb_channels: i64,
    pub resnet_groups: i64,
    pub resnet_eps: f64,
    pub cross_attention_dim: i64,
    pub attention_heads: i64,
    pub transformer_layers: i64,
    pub use_linear_projection: bool,
}

impl BlockSettings {
    fn resnet(&self, in_channels: i64, out_channels: i64, scale: f64) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.resnet_groups,
            eps: self.resnet_eps,
            output_scale_factor: scale,
        }
    }

    fn transformer(&self, channels: i64) -> Transformer2DConfig {
        Transformer2DConfig {
            in_channels: channels,
            heads: self.attention_heads,
            head_dim: channels / self.attention_heads,
            num_layers: self.transformer_layers,
            cross_attention_dim: self.cross_attention_dim,
            norm_num_groups: self.resnet_groups,
            use_linear_projection: self.use_linear_projection,
        }
    }
}

/// `CrossAttnDownBlock2D` (with attentions) or `DownBlock2D` (without).
#[derive(Debug)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

/// The shape of one down block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DownBlockConfig {
    /// Resnets (and, with cross-attention, transformers).
    pub num_layers: i64,
    pub in_channels: i64,
    pub out_channels: i64,
    /// `CrossAttnDownBlock2D` (a transformer after each resnet) rather than `DownBlock2D`.
    pub with_cross_attention: bool,
    /// Halve the resolution at the end (every block but the last).
    pub add_downsample: bool,
    pub downsample_padding: i64,
}

impl DownBlock {
    pub fn new(
        vs: nn::Path,
        settings: &BlockSettings,
        config: &DownBlockConfig,
        placement: LayerPlacement,
    ) -> Self {
        let DownBlockConfig {
            num_layers,
            in_channels,
            out_channels,
            with_cross_attention,
            add_downsample,
            downsample_padding,
        } = *config;
        let resnets = (0..num_layers)
            .map(|index| {
                let from = if index == 0 {
                    in_channels
                } else {
                    out_channels
                };
                ResnetBlock2D::new(
                    &vs / "resnets" / index,
                    &settings.resnet(from, out_channels, 1.0),
                )
            })
            .collect();
        let attentions = if with_cross_attention {
            (0..num_layers)
                .map(|index| {
                    Transformer2DModel::new(
                        &vs / "attentions" / index,
                        &settings.transformer(out_channels),
                        placement,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        let downsampler = add_downsample
            .then(|| Downsample2D::new(&vs / "downsamplers" / 0, out_channels, downsample_padding));
        Self {
            resnets,
            attentions,
            downsampler,
        }
    }

    /// Returns the block's output and the skip connections it adds (one per resnet, plus the
    /// downsampled output).
    pub fn forward(
        &self,
        input: &Tensor,
        activated_temb: &Tensor,
        context: &Tensor,
        kv_transform: Option<&dyn KvContextTransform>,
    ) -> (Tensor, Vec<Tensor>) {
        let mut hidden = input.shallow_clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (index, resnet) in self.resnets.iter().enumerate() {
            hidden = resnet.forward(&hidden, Some(activated_temb));
            if let Some(attention) = self.attentions.get(index) {
                hidden = attention.forward(&hidden, context, kv_transform);
            }
            skips.push(hidden.shallow_clone());
        }
        if let Some(downsampler) = &self.downsampler {
            hidden = downsampler.forward(&hidden);
            skips.push(hidden.shallow_clone());
        }
        (hidden, skips)
    }

    pub fn attention_layers(&self) -> Vec<&AttentionLayerInfo> {
        self.attentions
            .iter()
            .flat_map(|attention| attention.attention_layers())
            .collect()
    }
}

impl AdaptableLayers for DownBlock {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        self.resnets.adaptable_sites(sites);
        self.attentions.adaptable_sites(sites);
        self.downsampler.adaptable_sites(sites);
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug)]
pub struct MidBlockCrossAttn {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
}

impl MidBlockCrossAttn {
    pub fn new(
        vs: nn::Path,
        settings: &BlockSettings,
        channels: i64,
        output_scale_factor: f64,
        placement: LayerPlacement,
    ) -> Self {
        let num_layers = 1;
        let resnets = (0..=num_layers)
            .map(|index| {
                ResnetBlock2D::new(
                    &vs / "resnets" / index,
                    &settings.resnet(channels, channels, output_scale_factor),
                )
            })
            .collect();
        let attentions = (0..num_layers)
            .map(|index| {
                Transformer2DModel::new(
                    &vs / "attentions" / index,
                    &settings.transformer(channels),
                    placement,
                )
            })
            .collect();
        Self {
            resnets,
            attentions,
        }
    }

    pub fn forward(
        &self,
        input: &Tensor,
        activated_temb: &Tensor,
        context: &Tensor,
        kv_transform: Option<&dyn KvContextTransform>,
    ) -> Tensor {
        let mut hidden = self.resnets[0].forward(input, Some(activated_temb));
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            hidden = attention.forward(&hidden, context, kv_transform);
            hidden = resnet.forward(&hidden, Some(activated_temb));
        }
        hidden
    }

    pub fn attention_layers(&self) -> Vec<&AttentionLayerInfo> {
        self.attentions
            .iter()
            .flat_map(|attention| attention.attention_layers())
            .collect()
    }
}

impl AdaptableLayers for MidBlockCrossAttn {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        self.resnets.adaptable_sites(sites);
        self.attentions.adaptable_sites(sites);
    }
}

/// `CrossAttnUpBlock2D` (with attentions) or `UpBlock2D` (without).
#[derive(Debug)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

/// The shape of one up block.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpBlockConfig {
    /// Resnets (and, with cross-attention, transformers): the mirrored down block's plus one.
    pub num_layers: i64,
    /// The channels of the mirrored down block's input (its last skip connection's width).
    pub in_channels: i64,
    /// The channels coming from the block below.
    pub prev_output_channels: i64,
    pub out_channels: i64,
    /// `CrossAttnUpBlock2D` (a transformer after each resnet) rather than `UpBlock2D`.
    pub with_cross_attention: bool,
    /// Double the resolution at the end (every block but the last).
    pub add_upsample: bool,
}

impl UpBlock {
    pub fn new(
        vs: nn::Path,
        settings: &BlockSettings,
        config: &UpBlockConfig,
        placement: LayerPlacement,
    ) -> Self {
        let UpBlockConfig {
            num_layers,
            in_channels,
            prev_output_channels,
            out_channels,
            with_cross_attention,
            add_upsample,
        } = *config;
        let resnets = (0..num_layers)
            .map(|index| {
                let skip_channels = if index == num_layers - 1 {
                    in_channels
                } else {
                    out_channels
                };
                let resnet_in = if index == 0 {
                    prev_output_channels
                } else {
                    out_channels
                };
                ResnetBlock2D::new(
                    &vs / "resnets" / index,
                    &settings.resnet(resnet_in + skip_channels, out_channels, 1.0),
                )
            })
            .collect();
        let attentions = if with_cross_attention {
            (0..num_layers)
                .map(|index| {
                    Transformer2DModel::new(
                        &vs / "attentions" / index,
                        &settings.transformer(out_channels),
                        placement,
                    )
                })
                .collect()
        } else {
            Vec::new()
        };
        let upsampler = add_upsample.then(|| Upsample2D::new(&vs / "upsamplers" / 0, out_channels));
        Self {
            resnets,
            attentions,
            upsampler,
        }
    }

    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    /// Consumes this block's skip connections from the end of `skips` (last in, first out).
    /// `upsample_size` is the spatial size the upsampler must produce (the next skip's size).
    pub fn forward(
        &self,
        input: &Tensor,
        skips: &mut Vec<Tensor>,
        activated_temb: &Tensor,
        context: &Tensor,
        kv_transform: Option<&dyn KvContextTransform>,
        upsample_size: Option<[i64; 2]>,
    ) -> Tensor {
        let mut hidden = input.shallow_clone();
        for (index, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .expect("the down blocks provide one skip per up-block resnet");
            hidden = resnet.forward(&Tensor::cat(&[hidden, skip], 1), Some(activated_temb));
            if let Some(attention) = self.attentions.get(index) {
                hidden = attention.forward(&hidden, context, kv_transform);
            }
        }
        if let Some(upsampler) = &self.upsampler {
            hidden = upsampler.forward(&hidden, upsample_size);
        }
        hidden
    }

    pub fn attention_layers(&self) -> Vec<&AttentionLayerInfo> {
        self.attentions
            .iter()
            .flat_map(|attention| attention.attention_layers())
            .collect()
    }
}

impl AdaptableLayers for UpBlock {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        self.resnets.adaptable_sites(sites);
        self.attentions.adaptable_sites(sites);
        self.upsampler.adaptable_sites(sites);
    }
}
