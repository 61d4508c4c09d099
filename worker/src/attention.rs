//! The UNet's attention: diffusers' `Transformer2DModel` (GroupNorm, proj_in, a stack of
//! `BasicTransformerBlock`s, proj_out, residual), `BasicTransformerBlock` (self-attention,
//! cross-attention, GEGLU feed-forward, each pre-LayerNorm with a residual) and `Attention`
//! through libtorch's scaled_dot_product_attention. Also the VAE mid-block's single-head
//! self-attention over pixels (`GroupNormSelfAttention`).
//!
//! Hook point: every `Attention` feeds `to_k` and `to_v` from its context (the normalised hidden
//! states for self-attention, the text encoder states for cross-attention) through an optional
//! [`KvContextTransform`], so hypernetworks (picked by the context width, AUTOMATIC1111-style)
//! plug in without touching the model.

use tch::{nn, nn::Module, Tensor};

use crate::layer_adapter::{
    adaptable_conv2d, adaptable_linear, module_path, AdaptableConv2d, AdaptableLayers,
    AdaptableLinear, AdaptableSite, LayerRole,
};

/// Where an attention layer sits in the UNet, for transforms that weight layers by depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UNetBlockPosition {
    Down(usize),
    Mid,
    Up(usize),
}

/// Static description of one `Attention` layer, handed to a [`KvContextTransform`].
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionLayerInfo {
    /// The layer's diffusers name, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2`.
    pub name: String,
    /// Width of the hidden states (queries).
    pub query_dim: i64,
    /// Width of the context feeding to_k and to_v (= query_dim for self-attention).
    pub context_dim: i64,
    pub is_cross_attention: bool,
    pub heads: i64,
    pub position: UNetBlockPosition,
    /// 0 for the highest resolution (down_blocks.0 and the last up block), one more per
    /// downsampling; the mid block has the deepest level.
    pub resolution_level: usize,
}

/// An optional transform of the context that feeds an attention layer's to_k and to_v
/// (AUTOMATIC1111's hypernetwork hook). Returns (context for to_k, context for to_v); both must
/// keep the context's shape. Implementations pick their module by `layer.context_dim` and return
/// the context unchanged (two shallow clones) for widths they do not cover.
pub trait KvContextTransform {
    fn transform(&self, context: &Tensor, layer: &AttentionLayerInfo) -> (Tensor, Tensor);
}

/// Position of a transformer inside the UNet, passed down while building it.
#[derive(Debug, Clone, Copy)]
pub struct LayerPlacement {
    pub position: UNetBlockPosition,
    pub resolution_level: usize,
}

/// diffusers' `Attention` (AttnProcessor2_0) without biases on q/k/v and with a biased `to_out.0`.
#[derive(Debug)]
pub struct Attention {
    to_q: AdaptableLinear,
    to_k: AdaptableLinear,
    to_v: AdaptableLinear,
    to_out: AdaptableLinear,
    info: AttentionLayerInfo,
}

impl Attention {
    /// `context_dim` is `None` for self-attention.
    pub fn new(
        vs: nn::Path,
        query_dim: i64,
        context_dim: Option<i64>,
        heads: i64,
        head_dim: i64,
        placement: LayerPlacement,
    ) -> Self {
        let inner_dim = heads * head_dim;
        let no_bias = nn::LinearConfig {
            bias: false,
            ..Default::default()
        };
        let key_value_dim = context_dim.unwrap_or(query_dim);
        let projection = |path: &nn::Path, from: i64, to: i64, config: nn::LinearConfig| {
            adaptable_linear(path, LayerRole::AttentionProjection, from, to, config)
        };
        let to_q = projection(&(&vs / "to_q"), query_dim, inner_dim, no_bias);
        let to_k = projection(&(&vs / "to_k"), key_value_dim, inner_dim, no_bias);
        let to_v = projection(&(&vs / "to_v"), key_value_dim, inner_dim, no_bias);
        let to_out = projection(
            &(&vs / "to_out" / 0),
            inner_dim,
            query_dim,
            Default::default(),
        );
        let info = AttentionLayerInfo {
            name: module_path(&vs),
            query_dim,
            context_dim: key_value_dim,
            is_cross_attention: context_dim.is_some(),
            heads,
            position: placement.position,
            resolution_level: placement.resolution_level,
        };
        Self {
            to_q,
            to_k,
            to_v,
            to_out,
            info,
        }
    }

    pub fn info(&self) -> &AttentionLayerInfo {
        &self.info
    }

    /// `hidden` [B, N, query_dim]; `context` [B, M, context_dim] or `None` for self-attention.
    pub fn forward(
        &self,
        hidden: &Tensor,
        context: Option<&Tensor>,
        kv_transform: Option<&dyn KvContextTransform>,
    ) -> Tensor {
        let context = context.unwrap_or(hidden);
        let query = self.to_q.forward(hidden);
        let (key, value) = match kv_transform {
            Some(transform) => {
                let (key_context, value_context) = transform.transform(context, &self.info);
                (
                    self.to_k.forward(&key_context),
                    self.to_v.forward(&value_context),
                )
            }
            None => (self.to_k.forward(context), self.to_v.forward(context)),
        };
        let attended = multi_head_attention(&query, &key, &value, self.info.heads);
        self.to_out.forward(&attended)
    }
}

impl AdaptableLayers for Attention {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        for layer in [&self.to_q, &self.to_k, &self.to_v, &self.to_out] {
            sites.push(layer.site());
        }
    }
}

/// Splits [B, N, H·D] into heads, runs scaled_dot_product_attention, merges back.
fn multi_head_attention(query: &Tensor, key: &Tensor, value: &Tensor, heads: i64) -> Tensor {
    let (batch, query_len, inner_dim) = query.size3().expect("attention query is [B, N, C]");
    let head_dim = inner_dim / heads;
    let split = |tensor: &Tensor| tensor.view([batch, -1, heads, head_dim]).transpose(1, 2);
    let attended = Tensor::scaled_dot_product_attention(
        &split(query),
        &split(key),
        &split(value),
        None::<Tensor>,
        0.0,
        false,
        None,
        false,
    );
    attended
        .transpose(1, 2)
        .reshape([batch, query_len, inner_dim])
}

/// diffusers' `FeedForward` with `activation_fn="geglu"`: net.0 (GEGLU proj to 2·inner),
/// hidden · GELU(gate), net.2 back to dim.
#[derive(Debug)]
pub struct GegluFeedForward {
    proj: AdaptableLinear,
    out: AdaptableLinear,
}

impl GegluFeedForward {
    pub fn new(vs: nn::Path, dim: i64, mult: i64) -> Self {
        let inner_dim = dim * mult;
        let linear = |path: &nn::Path, from: i64, to: i64| {
            adaptable_linear(path, LayerRole::FeedForward, from, to, Default::default())
        };
        let proj = linear(&(&vs / "net" / 0 / "proj"), dim, inner_dim * 2);
        let out = linear(&(&vs / "net" / 2), inner_dim, dim);
        Self { proj, out }
    }

    pub fn forward(&self, input: &Tensor) -> Tensor {
        let projected = self.proj.forward(input);
        let halves = projected.chunk(2, -1);
        let gated = &halves[0] * halves[1].gelu("none");
        self.out.forward(&gated)
    }
}

impl AdaptableLayers for GegluFeedForward {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        sites.push(self.proj.site());
        sites.push(self.out.site());
    }
}

/// diffusers' `BasicTransformerBlock` (norm_type "layer_norm", not only-cross-attention).
#[derive(Debug)]
pub struct BasicTransformerBlock {
    norm1: nn::LayerNorm,
    attn1: Attention,
    norm2: nn::LayerNorm,
    attn2: Attention,
    norm3: nn::LayerNorm,
    ff: GegluFeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vs: nn::Path,
        dim: i64,
        heads: i64,
        head_dim: i64,
        cross_attention_dim: i64,
        placement: LayerPlacement,
    ) -> Self {
        let layer_norm = |name: &str| nn::layer_norm(&vs / name, vec![dim], Default::default());
        Self {
            norm1: layer_norm("norm1"),
            attn1: Attention::new(&vs / "attn1", dim, None, heads, head_dim, placement),
            norm2: layer_norm("norm2"),
            attn2: Attention::new(
                &vs / "attn2",
                dim,
                Some(cross_attention_dim),
                heads,
                head_dim,
                placement,
            ),
            norm3: layer_norm("norm3"),
            ff: GegluFeedForward::new(&vs / "ff", dim, 4),
        }
    }

    pub fn forward(
        &self,
        hidden: &Tensor,
        context: &Tensor,
        kv_transform: Option<&dyn KvContextTransform>,
    ) -> Tensor {
        let hidden = self
            .attn1
            .forward(&self.norm1.forward(hidden), None, kv_transform)
            + hidden;
        let hidden = self
            .attn2
            .forward(&self.norm2.forward(&hidden), Some(context), kv_transform)
            + hidden;
        self.ff.forward(&self.norm3.forward(&hidden)) + hidden
    }

    pub fn attention_layers(&self) -> [&AttentionLayerInfo; 2] {
        [self.attn1.info(), self.attn2.info()]
    }
}

impl AdaptableLayers for BasicTransformerBlock {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        self.attn1.adaptable_sites(sites);
        self.attn2.adaptable_sites(sites);
        self.ff.adaptable_sites(sites);
    }
}

/// Settings of one `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct Transformer2DConfig {
    pub in_channels: i64,
    pub heads: i64,
    pub head_dim: i64,
    pub num_layers: i64,
    pub cross_attention_dim: i64,
    pub norm_num_groups: i64,
    pub use_linear_projection: bool,
}

#[derive(Debug)]
enum Projection {
    Conv(AdaptableConv2d),
    Linear(AdaptableLinear),
}

impl Projection {
    fn site(&self) -> AdaptableSite<'_> {
        match self {
            Projection::Conv(conv) => conv.site(),
            Projection::Linear(linear) => linear.site(),
        }
    }
}

/// diffusers' `Transformer2DModel` for continuous inputs.
#[derive(Debug)]
pub struct Transformer2DModel {
    norm: nn::GroupNorm,
    proj_in: Projection,
    transformer_blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2DModel {
    pub fn new(vs: nn::Path, config: &Transformer2DConfig, placement: LayerPlacement) -> Self {
        let inner_dim = config.heads * config.head_dim;
        let norm = nn::group_norm(
            &vs / "norm",
            config.norm_num_groups,
            config.in_channels,
            nn::GroupNormConfig {
                eps: 1e-6,
                ..Default::default()
            },
        );
        let projection = |name: &str, from: i64, to: i64| {
            let path = &vs / name;
            let role = LayerRole::TransformerProjection;
            if config.use_linear_projection {
                Projection::Linear(adaptable_linear(&path, role, from, to, Default::default()))
            } else {
                Projection::Conv(adaptable_conv2d(
                    &path,
                    role,
                    from,
                    to,
                    1,
                    Default::default(),
                ))
            }
        };
        let proj_in = projection("proj_in", config.in_channels, inner_dim);
        let transformer_blocks = (0..config.num_layers)
            .map(|index| {
                BasicTransformerBlock::new(
                    &vs / "transformer_blocks" / index,
                    inner_dim,
                    config.heads,
                    config.head_dim,
                    config.cross_attention_dim,
                    placement,
                )
            })
            .collect();
        let proj_out = projection("proj_out", inner_dim, config.in_channels);
        Self {
            norm,
            proj_in,
            transformer_blocks,
            proj_out,
        }
    }

    /// `hidden` [B, C, H, W]; `context` [B, M, cross_attention_dim].
    pub fn forward(
        &self,
        hidden: &Tensor,
        context: &Tensor,
        kv_transform: Option<&dyn KvContextTransform>,
    ) -> Tensor {
        let (batch, _channels, height, width) = hidden.size4().expect("transformer input is 4-D");
        let normed = self.norm.forward(hidden);
        let to_tokens = |tensor: Tensor| {
            let inner = tensor.size()[1];
            tensor
                .permute([0, 2, 3, 1])
                .reshape([batch, height * width, inner])
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(&normed)),
            Projection::Linear(linear) => linear.forward(&to_tokens(normed)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context, kv_transform);
        }
        let to_image = |tensor: Tensor| {
            let inner = tensor.size()[2];
            tensor
                .reshape([batch, height, width, inner])
                .permute([0, 3, 1, 2])
        };
        let output = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(tokens).contiguous()),
            Projection::Linear(linear) => to_image(linear.forward(&tokens)),
        };
        output + hidden
    }

    pub fn attention_layers(&self) -> Vec<&AttentionLayerInfo> {
        self.transformer_blocks
            .iter()
            .flat_map(|block| block.attention_layers())
            .collect()
    }
}

impl AdaptableLayers for Transformer2DModel {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        sites.push(self.proj_in.site());
        self.transformer_blocks.adaptable_sites(sites);
        sites.push(self.proj_out.site());
    }
}

/// The VAE mid-block's attention (diffusers' `Attention` built from a deprecated attention
/// block): GroupNorm, single-head self-attention over pixels with biased q/k/v, residual.
#[derive(Debug)]
pub struct GroupNormSelfAttention {
    group_norm: nn::GroupNorm,
    to_q: nn::Linear,
    to_k: nn::Linear,
    to_v: nn::Linear,
    to_out: nn::Linear,
    heads: i64,
}

impl GroupNormSelfAttention {
    pub fn new(vs: nn::Path, channels: i64, head_dim: i64, groups: i64, eps: f64) -> Self {
        let linear = |name: &nn::Path| nn::linear(name, channels, channels, Default::default());
        Self {
            group_norm: nn::group_norm(
                &vs / "group_norm",
                groups,
                channels,
                nn::GroupNormConfig {
                    eps,
                    ..Default::default()
                },
            ),
            to_q: linear(&(&vs / "to_q")),
            to_k: linear(&(&vs / "to_k")),
            to_v: linear(&(&vs / "to_v")),
            to_out: linear(&(&vs / "to_out" / 0)),
            heads: (channels / head_dim).max(1),
        }
    }

    pub fn forward(&self, hidden: &Tensor) -> Tensor {
        let (batch, channels, height, width) = hidden.size4().expect("attention input is 4-D");
        let tokens = self
            .group_norm
            .forward(hidden)
            .view([batch, channels, height * width])
            .transpose(1, 2);
        let attended = multi_head_attention(
            &self.to_q.forward(&tokens),
            &self.to_k.forward(&tokens),
            &self.to_v.forward(&tokens),
            self.heads,
        );
        let output = self
            .to_out
            .forward(&attended)
            .transpose(1, 2)
            .reshape([batch, channels, height, width]);
        output + hidden
    }
}
