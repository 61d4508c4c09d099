//! The diffusers <-> single-file (LDM/CompVis) state-dict key mapping, as one table of rules.
//!
//! Each rule pairs a diffusers key template with an LDM key template. Templates hold
//! placeholders: `{block}` and `{layer}` (diffusers block and layer indices), `{flat}` (the LDM
//! flat index of `input_blocks`/`output_blocks`, computed from block, layer and
//! layers_per_block), `{rev}` (the VAE decoder's reversed block index), `{sub}` (the position of
//! the upsampler inside an LDM output block: 2 after an attention, else 1) and `{rest}` (the
//! remainder of the key, renamed by the rule's [`Inner`] table). Both directions, and the
//! regexes that match each side, come from the same rows.

use std::collections::BTreeSet;
use std::sync::OnceLock;

use regex::Regex;

/// A model component of a Stable Diffusion checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Component {
    TextEncoder,
    Unet,
    Vae,
}

impl Component {
    pub const ALL: [Component; 3] = [Component::TextEncoder, Component::Unet, Component::Vae];

    /// The component's folder in a diffusers model.
    pub fn diffusers_folder(self) -> &'static str {
        match self {
            Component::TextEncoder => "text_encoder",
            Component::Unet => "unet",
            Component::Vae => "vae",
        }
    }

    /// The component's key prefix in a single-file LDM checkpoint.
    pub fn ldm_prefix(self) -> &'static str {
        match self {
            Component::TextEncoder => "cond_stage_model.transformer.",
            Component::Unet => "model.diffusion_model.",
            Component::Vae => "first_stage_model.",
        }
    }
}

/// How a tensor's shape changes between the two layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reshape {
    None,
    /// The VAE mid-block attention's q/k/v/out weights: [C,C] in diffusers, [C,C,1,1] in LDM.
    LinearConv1x1,
}

/// A key mapped to the other layout, with the reshape its tensor needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedKey {
    pub component: Component,
    pub key: String,
    pub reshape: Reshape,
}

/// How the indices of a rule are related.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Index {
    None,
    /// UNet input block of a down block's layer: flat = 1 + block·(L+1) + layer, layer < L.
    DownLayer,
    /// UNet down block's downsampler: flat = 1 + block·(L+1) + L.
    Downsampler,
    /// UNet output block of an up block's layer: flat = block·(L+1) + layer, layer <= L.
    UpLayer,
    /// UNet up block's upsampler: flat = block·(L+1) + L, sub = 2 after an attention, else 1.
    Upsampler,
    /// VAE decoder block: rev = block_count − 1 − block.
    Reversed,
}

/// Renames inside the remainder of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Inner {
    None,
    UnetResnet,
    VaeResnet,
    VaeAttention,
}

struct Rule {
    component: Component,
    diffusers: &'static str,
    ldm: &'static str,
    index: Index,
    inner: Inner,
}

const fn rule(
    component: Component,
    diffusers: &'static str,
    ldm: &'static str,
    index: Index,
    inner: Inner,
) -> Rule {
    Rule {
        component,
        diffusers,
        ldm,
        index,
        inner,
    }
}

use Component::{TextEncoder as Clip, Unet, Vae};

/// THE table. Order matters when reading LDM keys: the first rule whose LDM side matches and
/// whose indices are valid wins, so specific rows come before general ones.
const RULES: &[Rule] = &[
    // CLIP: transformers' names under the prefix (keys without `text_model.` are normalized
    // to it before the table is consulted).
    rule(
        Clip,
        "text_model.{rest}",
        "text_model.{rest}",
        Index::None,
        Inner::None,
    ),
    // UNet
    rule(
        Unet,
        "time_embedding.linear_1.{rest}",
        "time_embed.0.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Unet,
        "time_embedding.linear_2.{rest}",
        "time_embed.2.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Unet,
        "conv_in.{rest}",
        "input_blocks.0.0.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Unet,
        "conv_norm_out.{rest}",
        "out.0.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Unet,
        "conv_out.{rest}",
        "out.2.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Unet,
        "down_blocks.{block}.downsamplers.0.conv.{rest}",
        "input_blocks.{flat}.0.op.{rest}",
        Index::Downsampler,
        Inner::None,
    ),
    rule(
        Unet,
        "down_blocks.{block}.resnets.{layer}.{rest}",
        "input_blocks.{flat}.0.{rest}",
        Index::DownLayer,
        Inner::UnetResnet,
    ),
    rule(
        Unet,
        "down_blocks.{block}.attentions.{layer}.{rest}",
        "input_blocks.{flat}.1.{rest}",
        Index::DownLayer,
        Inner::None,
    ),
    rule(
        Unet,
        "mid_block.resnets.0.{rest}",
        "middle_block.0.{rest}",
        Index::None,
        Inner::UnetResnet,
    ),
    rule(
        Unet,
        "mid_block.attentions.0.{rest}",
        "middle_block.1.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Unet,
        "mid_block.resnets.1.{rest}",
        "middle_block.2.{rest}",
        Index::None,
        Inner::UnetResnet,
    ),
    rule(
        Unet,
        "up_blocks.{block}.upsamplers.0.conv.{rest}",
        "output_blocks.{flat}.{sub}.conv.{rest}",
        Index::Upsampler,
        Inner::None,
    ),
    rule(
        Unet,
        "up_blocks.{block}.resnets.{layer}.{rest}",
        "output_blocks.{flat}.0.{rest}",
        Index::UpLayer,
        Inner::UnetResnet,
    ),
    rule(
        Unet,
        "up_blocks.{block}.attentions.{layer}.{rest}",
        "output_blocks.{flat}.1.{rest}",
        Index::UpLayer,
        Inner::None,
    ),
    // VAE
    rule(
        Vae,
        "quant_conv.{rest}",
        "quant_conv.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Vae,
        "post_quant_conv.{rest}",
        "post_quant_conv.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Vae,
        "encoder.conv_in.{rest}",
        "encoder.conv_in.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Vae,
        "encoder.conv_out.{rest}",
        "encoder.conv_out.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Vae,
        "encoder.conv_norm_out.{rest}",
        "encoder.norm_out.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Vae,
        "encoder.down_blocks.{block}.resnets.{layer}.{rest}",
        "encoder.down.{block}.block.{layer}.{rest}",
        Index::None,
        Inner::VaeResnet,
    ),
    rule(
        Vae,
        "encoder.down_blocks.{block}.downsamplers.0.conv.{rest}",
        "encoder.down.{block}.downsample.conv.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Vae,
        "encoder.mid_block.resnets.0.{rest}",
        "encoder.mid.block_1.{rest}",
        Index::None,
        Inner::VaeResnet,
    ),
    rule(
        Vae,
        "encoder.mid_block.resnets.1.{rest}",
        "encoder.mid.block_2.{rest}",
        Index::None,
        Inner::VaeResnet,
    ),
    rule(
        Vae,
        "encoder.mid_block.attentions.0.{rest}",
        "encoder.mid.attn_1.{rest}",
        Index::None,
        Inner::VaeAttention,
    ),
    rule(
        Vae,
        "decoder.conv_in.{rest}",
        "decoder.conv_in.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Vae,
        "decoder.conv_out.{rest}",
        "decoder.conv_out.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Vae,
        "decoder.conv_norm_out.{rest}",
        "decoder.norm_out.{rest}",
        Index::None,
        Inner::None,
    ),
    rule(
        Vae,
        "decoder.mid_block.resnets.0.{rest}",
        "decoder.mid.block_1.{rest}",
        Index::None,
        Inner::VaeResnet,
    ),
    rule(
        Vae,
        "decoder.mid_block.resnets.1.{rest}",
        "decoder.mid.block_2.{rest}",
        Index::None,
        Inner::VaeResnet,
    ),
    rule(
        Vae,
        "decoder.mid_block.attentions.0.{rest}",
        "decoder.mid.attn_1.{rest}",
        Index::None,
        Inner::VaeAttention,
    ),
    rule(
        Vae,
        "decoder.up_blocks.{block}.resnets.{layer}.{rest}",
        "decoder.up.{rev}.block.{layer}.{rest}",
        Index::Reversed,
        Inner::VaeResnet,
    ),
    rule(
        Vae,
        "decoder.up_blocks.{block}.upsamplers.0.conv.{rest}",
        "decoder.up.{rev}.upsample.conv.{rest}",
        Index::Reversed,
        Inner::None,
    ),
];

/// Renames inside `{rest}`: (diffusers prefix, LDM prefix).
fn inner_renames(inner: Inner) -> &'static [(&'static str, &'static str)] {
    match inner {
        Inner::None => &[],
        Inner::UnetResnet => &[
            ("norm1.", "in_layers.0."),
            ("conv1.", "in_layers.2."),
            ("time_emb_proj.", "emb_layers.1."),
            ("norm2.", "out_layers.0."),
            ("conv2.", "out_layers.3."),
            ("conv_shortcut.", "skip_connection."),
        ],
        Inner::VaeResnet => &[("conv_shortcut.", "nin_shortcut.")],
        Inner::VaeAttention => &[
            ("group_norm.", "norm."),
            ("to_q.", "q."),
            ("to_k.", "k."),
            ("to_v.", "v."),
            ("to_out.0.", "proj_out."),
        ],
    }
}

struct CompiledRule {
    rule: &'static Rule,
    diffusers: Regex,
    ldm: Regex,
}

fn template_regex(template: &str) -> Regex {
    let mut pattern = regex::escape(template);
    for (placeholder, group) in [
        ("block", r"(?P<block>\d+)"),
        ("layer", r"(?P<layer>\d+)"),
        ("flat", r"(?P<flat>\d+)"),
        ("rev", r"(?P<rev>\d+)"),
        ("sub", r"(?P<sub>\d+)"),
        ("rest", r"(?P<rest>.+)"),
    ] {
        pattern = pattern.replace(&regex::escape(&format!("{{{placeholder}}}")), group);
    }
    Regex::new(&format!("^{pattern}$")).expect("key map templates compile")
}

fn compiled_rules() -> &'static [CompiledRule] {
    static COMPILED: OnceLock<Vec<CompiledRule>> = OnceLock::new();
    COMPILED.get_or_init(|| {
        RULES
            .iter()
            .map(|rule| CompiledRule {
                rule,
                diffusers: template_regex(rule.diffusers),
                ldm: template_regex(rule.ldm),
            })
            .collect()
    })
}

/// The model dimensions the index arithmetic needs, read from the key set itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMap {
    /// The UNet's layers_per_block (L): down blocks have L layers, up blocks L+1.
    pub unet_layers_per_block: usize,
    /// Up blocks (diffusers order) that have attentions.
    pub unet_up_blocks_with_attention: BTreeSet<usize>,
    /// The VAE decoder's block count.
    pub vae_block_count: usize,
}

fn captured(captures: &regex::Captures, name: &str) -> Option<usize> {
    captures.name(name)?.as_str().parse().ok()
}

fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut filled = template.to_string();
    for (name, value) in values {
        filled = filled.replace(&format!("{{{name}}}"), value);
    }
    filled
}

/// A CLIP key relative to its component, normalized to start with `text_model.`.
pub fn normalize_clip_key(key: &str) -> String {
    if key.starts_with("text_model.") {
        key.to_string()
    } else {
        format!("text_model.{key}")
    }
}

impl KeyMap {
    /// Reads the dimensions from diffusers-named UNet and VAE keys.
    pub fn from_diffusers_keys<'a>(
        unet_keys: impl IntoIterator<Item = &'a str>,
        vae_keys: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let down_layer = Regex::new(r"^down_blocks\.0\.resnets\.(\d+)\.").expect("regex");
        let up_attention = Regex::new(r"^up_blocks\.(\d+)\.attentions\.").expect("regex");
        let vae_up = Regex::new(r"^decoder\.up_blocks\.(\d+)\.").expect("regex");
        let mut layers = 0;
        let mut with_attention = BTreeSet::new();
        for key in unet_keys {
            if let Some(captures) = down_layer.captures(key) {
                layers = layers.max(captured_index(&captures) + 1);
            }
            if let Some(captures) = up_attention.captures(key) {
                with_attention.insert(captured_index(&captures));
            }
        }
        let mut vae_blocks = 0;
        for key in vae_keys {
            if let Some(captures) = vae_up.captures(key) {
                vae_blocks = vae_blocks.max(captured_index(&captures) + 1);
            }
        }
        Self {
            unet_layers_per_block: layers,
            unet_up_blocks_with_attention: with_attention,
            vae_block_count: vae_blocks,
        }
    }

    /// Reads the dimensions from the keys of a single-file LDM checkpoint.
    pub fn from_ldm_keys<'a>(keys: impl IntoIterator<Item = &'a str>) -> Self {
        let downsample =
            Regex::new(r"^model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.").expect("regex");
        let input_block =
            Regex::new(r"^model\.diffusion_model\.input_blocks\.(\d+)\.").expect("regex");
        let vae_up = Regex::new(r"^first_stage_model\.decoder\.up\.(\d+)\.").expect("regex");
        let mut first_downsample = usize::MAX;
        let mut input_blocks = 0;
        let mut vae_blocks = 0;
        for key in keys {
            if let Some(captures) = downsample.captures(key) {
                first_downsample = first_downsample.min(captured_index(&captures));
            }
            if let Some(captures) = input_block.captures(key) {
                input_blocks = input_blocks.max(captured_index(&captures) + 1);
            }
            if let Some(captures) = vae_up.captures(key) {
                vae_blocks = vae_blocks.max(captured_index(&captures) + 1);
            }
        }
        // input_blocks.{1+L} is the first downsampler; a UNet with one block has none and
        // input_blocks 1..=L.
        let layers = if first_downsample == usize::MAX {
            input_blocks.saturating_sub(1)
        } else {
            first_downsample - 1
        };
        Self {
            unet_layers_per_block: layers,
            // Not needed in this direction: the LDM `{sub}` index says it.
            unet_up_blocks_with_attention: BTreeSet::new(),
            vae_block_count: vae_blocks,
        }
    }

    /// The LDM key of a diffusers key of `component` (relative to the component), with the
    /// component's prefix. None when no rule covers the key.
    pub fn to_ldm(&self, component: Component, diffusers_key: &str) -> Option<MappedKey> {
        let key = match component {
            Component::TextEncoder => normalize_clip_key(diffusers_key),
            _ => diffusers_key.to_string(),
        };
        let layers = self.unet_layers_per_block;
        for compiled in compiled_rules()
            .iter()
            .filter(|c| c.rule.component == component)
        {
            let Some(captures) = compiled.diffusers.captures(&key) else {
                continue;
            };
            let block = captured(&captures, "block");
            let layer = captured(&captures, "layer");
            let mut values: Vec<(&str, String)> = Vec::new();
            if let Some(block) = block {
                values.push(("block", block.to_string()));
            }
            if let Some(layer) = layer {
                values.push(("layer", layer.to_string()));
            }
            match compiled.rule.index {
                Index::None => {}
                Index::DownLayer => {
                    let (block, layer) = (block?, layer?);
                    if layer >= layers {
                        continue;
                    }
                    values.push(("flat", (1 + block * (layers + 1) + layer).to_string()));
                }
                Index::Downsampler => {
                    values.push(("flat", (1 + block? * (layers + 1) + layers).to_string()));
                }
                Index::UpLayer => {
                    let (block, layer) = (block?, layer?);
                    if layer > layers {
                        continue;
                    }
                    values.push(("flat", (block * (layers + 1) + layer).to_string()));
                }
                Index::Upsampler => {
                    let block = block?;
                    values.push(("flat", (block * (layers + 1) + layers).to_string()));
                    let sub = if self.unet_up_blocks_with_attention.contains(&block) {
                        2
                    } else {
                        1
                    };
                    values.push(("sub", sub.to_string()));
                }
                Index::Reversed => {
                    let block = block?;
                    if block >= self.vae_block_count {
                        continue;
                    }
                    values.push(("rev", (self.vae_block_count - 1 - block).to_string()));
                }
            }
            let rest = captures.name("rest").map_or("", |m| m.as_str());
            let (rest, diffusers_rest) = rename_rest(compiled.rule.inner, rest, true);
            values.push(("rest", rest));
            let reshape = reshape_of(compiled.rule.inner, &diffusers_rest);
            return Some(MappedKey {
                component,
                key: format!(
                    "{}{}",
                    component.ldm_prefix(),
                    fill(compiled.rule.ldm, &values)
                ),
                reshape,
            });
        }
        None
    }

    /// The component and diffusers key (relative to the component) of a single-file key.
    /// None for keys outside the three components or not covered by a rule.
    pub fn to_diffusers(&self, ldm_key: &str) -> Option<MappedKey> {
        let (component, relative) = Component::ALL.iter().find_map(|&component| {
            ldm_key
                .strip_prefix(component.ldm_prefix())
                .map(|relative| (component, relative))
        })?;
        let relative = match component {
            Component::TextEncoder => normalize_clip_key(relative),
            _ => relative.to_string(),
        };
        let layers = self.unet_layers_per_block;
        for compiled in compiled_rules()
            .iter()
            .filter(|c| c.rule.component == component)
        {
            let Some(captures) = compiled.ldm.captures(&relative) else {
                continue;
            };
            let mut values: Vec<(&str, String)> = Vec::new();
            if let Some(block) = captured(&captures, "block") {
                values.push(("block", block.to_string()));
            }
            if let Some(layer) = captured(&captures, "layer") {
                values.push(("layer", layer.to_string()));
            }
            match compiled.rule.index {
                Index::None => {}
                Index::DownLayer | Index::Downsampler => {
                    let flat = captured(&captures, "flat")?;
                    if flat == 0 || layers == 0 {
                        continue;
                    }
                    let (block, layer) = ((flat - 1) / (layers + 1), (flat - 1) % (layers + 1));
                    let is_downsampler = layer == layers;
                    if is_downsampler != (compiled.rule.index == Index::Downsampler) {
                        continue;
                    }
                    values.push(("block", block.to_string()));
                    values.push(("layer", layer.to_string()));
                }
                Index::UpLayer | Index::Upsampler => {
                    let flat = captured(&captures, "flat")?;
                    if layers == 0 {
                        continue;
                    }
                    let (block, layer) = (flat / (layers + 1), flat % (layers + 1));
                    if compiled.rule.index == Index::Upsampler && layer != layers {
                        continue;
                    }
                    values.push(("block", block.to_string()));
                    values.push(("layer", layer.to_string()));
                }
                Index::Reversed => {
                    let rev = captured(&captures, "rev")?;
                    if rev >= self.vae_block_count {
                        continue;
                    }
                    values.push(("block", (self.vae_block_count - 1 - rev).to_string()));
                }
            }
            let rest = captures.name("rest").map_or("", |m| m.as_str());
            let (rest, diffusers_rest) = rename_rest(compiled.rule.inner, rest, false);
            values.push(("rest", rest));
            return Some(MappedKey {
                component,
                key: fill(compiled.rule.diffusers, &values),
                reshape: reshape_of(compiled.rule.inner, &diffusers_rest),
            });
        }
        None
    }
}

fn captured_index(captures: &regex::Captures) -> usize {
    captures[1].parse().unwrap_or(0)
}

/// Applies the inner renames to `rest`; returns the renamed remainder and the remainder's
/// diffusers-side spelling.
fn rename_rest(inner: Inner, rest: &str, to_ldm: bool) -> (String, String) {
    for &(diffusers, ldm) in inner_renames(inner) {
        let (from, to) = if to_ldm {
            (diffusers, ldm)
        } else {
            (ldm, diffusers)
        };
        if let Some(tail) = rest.strip_prefix(from) {
            return (format!("{to}{tail}"), format!("{diffusers}{tail}"));
        }
    }
    (rest.to_string(), rest.to_string())
}

/// The VAE attention's projection weights are linear in diffusers and 1x1 convs in LDM.
fn reshape_of(inner: Inner, diffusers_rest: &str) -> Reshape {
    let is_projection_weight =
        diffusers_rest.starts_with("to_") && diffusers_rest.ends_with("weight");
    if inner == Inner::VaeAttention && is_projection_weight {
        Reshape::LinearConv1x1
    } else {
        Reshape::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd1_map() -> KeyMap {
        KeyMap {
            unet_layers_per_block: 2,
            unet_up_blocks_with_attention: [1, 2, 3].into_iter().collect(),
            vae_block_count: 4,
        }
    }

    #[test]
    fn sd1_unet_keys_map_to_the_compvis_layout() {
        let map = sd1_map();
        let cases = [
            (
                "conv_in.weight",
                "model.diffusion_model.input_blocks.0.0.weight",
            ),
            (
                "time_embedding.linear_2.bias",
                "model.diffusion_model.time_embed.2.bias",
            ),
            (
                "down_blocks.0.resnets.1.norm1.weight",
                "model.diffusion_model.input_blocks.2.0.in_layers.0.weight",
            ),
            (
                "down_blocks.1.attentions.0.proj_in.weight",
                "model.diffusion_model.input_blocks.4.1.proj_in.weight",
            ),
            (
                "down_blocks.2.downsamplers.0.conv.weight",
                "model.diffusion_model.input_blocks.9.0.op.weight",
            ),
            (
                "down_blocks.1.resnets.0.conv_shortcut.weight",
                "model.diffusion_model.input_blocks.4.0.skip_connection.weight",
            ),
            (
                "mid_block.resnets.1.time_emb_proj.weight",
                "model.diffusion_model.middle_block.2.emb_layers.1.weight",
            ),
            (
                "up_blocks.0.resnets.2.conv2.bias",
                "model.diffusion_model.output_blocks.2.0.out_layers.3.bias",
            ),
            (
                "up_blocks.0.upsamplers.0.conv.weight",
                "model.diffusion_model.output_blocks.2.1.conv.weight",
            ),
            (
                "up_blocks.1.upsamplers.0.conv.weight",
                "model.diffusion_model.output_blocks.5.2.conv.weight",
            ),
            (
                "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            ("conv_norm_out.bias", "model.diffusion_model.out.0.bias"),
        ];
        for (diffusers, ldm) in cases {
            let mapped = map.to_ldm(Component::Unet, diffusers).expect(diffusers);
            assert_eq!(mapped.key, ldm, "{diffusers}");
            let back = map.to_diffusers(ldm).expect(ldm);
            assert_eq!(
                (back.component, back.key.as_str()),
                (Component::Unet, diffusers)
            );
        }
    }

    #[test]
    fn vae_keys_reverse_decoder_blocks_and_reshape_attention() {
        let map = sd1_map();
        let mapped = map
            .to_ldm(
                Component::Vae,
                "decoder.up_blocks.0.resnets.2.conv_shortcut.weight",
            )
            .expect("mapped");
        assert_eq!(
            mapped.key,
            "first_stage_model.decoder.up.3.block.2.nin_shortcut.weight"
        );
        let attention = map
            .to_ldm(
                Component::Vae,
                "encoder.mid_block.attentions.0.to_out.0.weight",
            )
            .expect("mapped");
        assert_eq!(
            attention.key,
            "first_stage_model.encoder.mid.attn_1.proj_out.weight"
        );
        assert_eq!(attention.reshape, Reshape::LinearConv1x1);
        let norm = map
            .to_diffusers("first_stage_model.decoder.mid.attn_1.norm.bias")
            .expect("mapped");
        assert_eq!(norm.key, "decoder.mid_block.attentions.0.group_norm.bias");
        assert_eq!(
            norm.reshape,
            Reshape::None,
            "only the projection weights reshape"
        );
    }

    #[test]
    fn clip_keys_take_the_prefix_with_or_without_text_model() {
        let map = sd1_map();
        let with = map
            .to_diffusers("cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight")
            .expect("mapped");
        let without = map
            .to_diffusers("cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight")
            .expect("mapped");
        assert_eq!(with, without);
        assert_eq!(with.key, "text_model.encoder.layers.0.mlp.fc1.weight");
        let exported = map
            .to_ldm(Component::TextEncoder, "embeddings.token_embedding.weight")
            .expect("mapped");
        assert_eq!(
            exported.key,
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
        );
    }

    #[test]
    fn dimensions_are_read_from_either_key_set() {
        let diffusers = KeyMap::from_diffusers_keys(
            [
                "down_blocks.0.resnets.0.conv1.weight",
                "down_blocks.0.resnets.1.conv1.weight",
                "up_blocks.1.attentions.0.proj_in.weight",
            ],
            ["decoder.up_blocks.3.resnets.0.conv1.weight"],
        );
        assert_eq!(diffusers.unet_layers_per_block, 2);
        assert_eq!(diffusers.vae_block_count, 4);
        assert!(diffusers.unet_up_blocks_with_attention.contains(&1));
        let ldm = KeyMap::from_ldm_keys([
            "model.diffusion_model.input_blocks.3.0.op.weight",
            "first_stage_model.decoder.up.1.block.0.conv1.weight",
        ]);
        assert_eq!(ldm.unet_layers_per_block, 2);
        assert_eq!(ldm.vae_block_count, 2);
    }

    #[test]
    fn unknown_keys_are_not_mapped() {
        let map = sd1_map();
        assert_eq!(map.to_diffusers("model_ema.decay"), None);
        assert_eq!(map.to_ldm(Component::Unet, "not_a_layer.weight"), None);
    }
}
