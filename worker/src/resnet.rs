//! diffusers' `ResnetBlock2D` (time_embedding_norm "default", SiLU), shared by the UNet
//! (with a time embedding) and the VAE (without one).

use tch::{nn, nn::Module, Tensor};

use crate::layer_adapter::{
    adaptable_conv2d, AdaptableConv2d, AdaptableLayers, AdaptableSite, LayerRole,
};

/// Shape and normalisation settings of one `ResnetBlock2D`.
#[derive(Debug, Clone, Copy)]
pub struct ResnetBlock2DConfig {
    pub in_channels: i64,
    pub out_channels: i64,
    /// Width of the time embedding; `None` builds no `time_emb_proj` (the VAE's resnets).
    pub temb_channels: Option<i64>,
    pub groups: i64,
    pub eps: f64,
    pub output_scale_factor: f64,
}

/// norm1 → SiLU → conv1 (+ projected time embedding) → norm2 → SiLU → conv2, plus the (1x1 conv)
/// shortcut, divided by `output_scale_factor`.
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: nn::GroupNorm,
    conv1: AdaptableConv2d,
    time_emb_proj: Option<nn::Linear>,
    norm2: nn::GroupNorm,
    conv2: AdaptableConv2d,
    conv_shortcut: Option<nn::Conv2D>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vs: nn::Path, config: &ResnetBlock2DConfig) -> Self {
        let norm_config = nn::GroupNormConfig {
            eps: config.eps,
            ..Default::default()
        };
        let conv3 = nn::ConvConfig {
            padding: 1,
            ..Default::default()
        };
        let norm1 = nn::group_norm(
            &vs / "norm1",
            config.groups,
            config.in_channels,
            norm_config,
        );
        let conv1 = adaptable_conv2d(
            &(&vs / "conv1"),
            LayerRole::ResnetConv,
            config.in_channels,
            config.out_channels,
            3,
            conv3,
        );
        let time_emb_proj = config.temb_channels.map(|temb_channels| {
            nn::linear(
                &vs / "time_emb_proj",
                temb_channels,
                config.out_channels,
                Default::default(),
            )
        });
        let norm2 = nn::group_norm(
            &vs / "norm2",
            config.groups,
            config.out_channels,
            norm_config,
        );
        let conv2 = adaptable_conv2d(
            &(&vs / "conv2"),
            LayerRole::ResnetConv,
            config.out_channels,
            config.out_channels,
            3,
            conv3,
        );
        let conv_shortcut = (config.in_channels != config.out_channels).then(|| {
            nn::conv2d(
                &vs / "conv_shortcut",
                config.in_channels,
                config.out_channels,
                1,
                Default::default(),
            )
        });
        Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: config.output_scale_factor,
        }
    }

    /// `activated_temb` is SiLU(time embedding) [B, temb_channels], computed once per UNet
    /// forward; `None` for the VAE.
    pub fn forward(&self, input: &Tensor, activated_temb: Option<&Tensor>) -> Tensor {
        let mut hidden = self.conv1.forward(&self.norm1.forward(input).silu());
        if let (Some(projection), Some(temb)) = (&self.time_emb_proj, activated_temb) {
            hidden += projection.forward(temb).unsqueeze(-1).unsqueeze(-1);
        }
        let hidden = self.conv2.forward(&self.norm2.forward(&hidden).silu());
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(input),
            None => input.shallow_clone(),
        };
        let output = shortcut + hidden;
        if self.output_scale_factor == 1.0 {
            return output;
        }
        output / self.output_scale_factor
    }
}

impl AdaptableLayers for ResnetBlock2D {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        sites.push(self.conv1.site());
        sites.push(self.conv2.site());
    }
}
