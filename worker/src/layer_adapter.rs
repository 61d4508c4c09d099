//! The hook point for low-rank adapters (LoRA, LoCon): the UNet's and the text encoder's linear
//! and convolution layers that an adapter network may extend, and the walk that lists them.
//!
//! A layer built as an [`AdaptableLayer`] computes `base(x)` until an adapter is attached, then
//! `base(x) + adapter.delta(x)`. The models list their layers through [`AdaptableLayers`]
//! with the layer's diffusers module path, its role (what `lora.targets` selects by) and its
//! shape, so an adapter network (worker/src/lora/) attaches itself without the models knowing
//! about it — the interface lives here, the implementation there.

use std::cell::OnceCell;

use tch::{nn, nn::Module, Tensor};

/// What an adapter adds to a layer's output.
pub trait LayerAdapter: std::fmt::Debug + Send {
    /// The addition to the layer's output for `input` (the layer's own input).
    fn delta(&self, input: &Tensor) -> Tensor;
}

/// What a layer does in the model, which `lora.targets` selects by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerRole {
    /// A UNet attention layer's `to_q`, `to_k`, `to_v` or `to_out.0`.
    AttentionProjection,
    /// A UNet transformer block's GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`).
    FeedForward,
    /// A UNet transformer's `proj_in` / `proj_out` (a 1x1 conv in SD1, linear in SD2).
    TransformerProjection,
    /// A 3x3 convolution of a UNet ResNet block, downsampler or upsampler (LoCon).
    ResnetConv,
    /// A CLIP encoder layer's `q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1` or `fc2`.
    TextEncoder,
}

/// The shape of an adaptable layer, which an adapter's own weights follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerShape {
    Linear {
        in_features: i64,
        out_features: i64,
    },
    /// A square-kernel convolution.
    Conv2d {
        in_channels: i64,
        out_channels: i64,
        kernel: i64,
        stride: i64,
        padding: i64,
    },
}

/// A linear or convolution layer that an adapter can be attached to, once.
#[derive(Debug)]
pub struct AdaptableLayer<M> {
    base: M,
    /// The module's path in its component's state dict (`down_blocks.0.attentions.0.proj_in`).
    name: String,
    role: LayerRole,
    shape: LayerShape,
    adapter: OnceCell<Box<dyn LayerAdapter>>,
}

pub type AdaptableLinear = AdaptableLayer<nn::Linear>;
pub type AdaptableConv2d = AdaptableLayer<nn::Conv2D>;

/// The dotted path of a VarStore path (`down_blocks.0.resnets.1.conv1`).
pub fn module_path(vs: &nn::Path) -> String {
    vs.components().collect::<Vec<_>>().join(".")
}

/// `nn::linear` under `vs`, adaptable.
pub fn adaptable_linear(
    vs: &nn::Path,
    role: LayerRole,
    in_features: i64,
    out_features: i64,
    config: nn::LinearConfig,
) -> AdaptableLinear {
    AdaptableLayer {
        base: nn::linear(vs, in_features, out_features, config),
        name: module_path(vs),
        role,
        shape: LayerShape::Linear {
            in_features,
            out_features,
        },
        adapter: OnceCell::new(),
    }
}

/// `nn::conv2d` under `vs` (square kernel, no dilation, one group), adaptable.
pub fn adaptable_conv2d(
    vs: &nn::Path,
    role: LayerRole,
    in_channels: i64,
    out_channels: i64,
    kernel: i64,
    config: nn::ConvConfig,
) -> AdaptableConv2d {
    assert!(
        config.dilation == 1 && config.groups == 1,
        "adaptable convolutions have no dilation and one group"
    );
    AdaptableLayer {
        base: nn::conv2d(vs, in_channels, out_channels, kernel, config),
        name: module_path(vs),
        role,
        shape: LayerShape::Conv2d {
            in_channels,
            out_channels,
            kernel,
            stride: config.stride,
            padding: config.padding,
        },
        adapter: OnceCell::new(),
    }
}

impl<M: Module> Module for AdaptableLayer<M> {
    fn forward(&self, input: &Tensor) -> Tensor {
        let output = self.base.forward(input);
        match self.adapter.get() {
            Some(adapter) => output + adapter.delta(input),
            None => output,
        }
    }
}

impl<M> AdaptableLayer<M> {
    /// This layer as a site of the walk.
    pub fn site(&self) -> AdaptableSite<'_> {
        AdaptableSite {
            name: &self.name,
            role: self.role,
            shape: self.shape,
            adapter: &self.adapter,
        }
    }
}

/// One adaptable layer, as the walk hands it out.
#[derive(Debug)]
pub struct AdaptableSite<'a> {
    pub name: &'a str,
    pub role: LayerRole,
    pub shape: LayerShape,
    adapter: &'a OnceCell<Box<dyn LayerAdapter>>,
}

/// An adapter was attached to a layer that already has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlreadyAdapted(pub String);

impl AdaptableSite<'_> {
    /// Attaches `adapter`; a layer takes one adapter for its lifetime.
    pub fn attach(&self, adapter: Box<dyn LayerAdapter>) -> Result<(), AlreadyAdapted> {
        self.adapter
            .set(adapter)
            .map_err(|_| AlreadyAdapted(self.name.to_string()))
    }

    pub fn is_adapted(&self) -> bool {
        self.adapter.get().is_some()
    }
}

/// A model part that holds adaptable layers.
pub trait AdaptableLayers {
    /// Appends this part's adaptable layers, in a fixed order (construction order).
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>);

    /// Every adaptable layer of this part, in order.
    fn all_adaptable_sites(&self) -> Vec<AdaptableSite<'_>> {
        let mut sites = Vec::new();
        self.adaptable_sites(&mut sites);
        sites
    }
}

impl<T: AdaptableLayers> AdaptableLayers for [T] {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        for part in self {
            part.adaptable_sites(sites);
        }
    }
}

impl<T: AdaptableLayers> AdaptableLayers for Option<T> {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        if let Some(part) = self {
            part.adaptable_sites(sites);
        }
    }
}
