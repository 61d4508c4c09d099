//! CLIP text encoder (transformers' CLIPTextModel) with clip skip and long prompts.
//!
//! VarStore paths equal transformers' state-dict names with the `text_model.` prefix
//! (`text_model.encoder.layers.0.self_attn.q_proj.weight`, …), so a checkpoint loads by name.
//! `clip_skip = 1` is the last layer's output after `final_layer_norm` (last_hidden_state);
//! `clip_skip = 2` (the default, NovelAI's penultimate layer) is hidden_states[-2] followed by
//! `final_layer_norm`.

use std::path::Path;

use serde::Deserialize;
use tch::{nn, nn::Module, Kind, Tensor};

use crate::error::{Result, WorkerError};
use crate::json_file::read_json;
use crate::layer_adapter::{
    adaptable_linear, AdaptableLayers, AdaptableLinear, AdaptableSite, LayerRole,
};
use crate::prompt::{join_chunk_states, split_chunks, PromptLayout, FRAMED_CHUNK_TOKENS};

/// NovelAI's default: the penultimate layer.
pub const DEFAULT_CLIP_SKIP: usize = 2;

/// The activation between the MLP's two linear layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    QuickGelu,
    Gelu,
}

/// The fields of transformers' CLIPTextConfig (`text_encoder/config.json`) the model uses.
/// Other fields of that file (it is transformers' format, not ours) are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    /// SD1's text encoder, openai/clip-vit-large-patch14.
    pub fn sd1() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// Reads `config.json` of a transformers CLIPTextModel and validates it.
    pub fn from_transformers_json(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let error = |field: &str, message: String| WorkerError::Config {
            path: path.to_path_buf(),
            field: field.to_string(),
            message,
        };
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(error(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size {}",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        if self.num_hidden_layers == 0 {
            return Err(error("num_hidden_layers", "must be at least 1".to_string()));
        }
        if self.max_position_embeddings < FRAMED_CHUNK_TOKENS as i64 {
            return Err(error(
                "max_position_embeddings",
                format!("{} is below 77", self.max_position_embeddings),
            ));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct ClipAttention {
    q_proj: AdaptableLinear,
    k_proj: AdaptableLinear,
    v_proj: AdaptableLinear,
    out_proj: AdaptableLinear,
    heads: i64,
}

impl ClipAttention {
    fn new(vs: nn::Path, config: &ClipTextConfig) -> Self {
        let width = config.hidden_size;
        let linear = |name: &str| {
            adaptable_linear(
                &(&vs / name),
                LayerRole::TextEncoder,
                width,
                width,
                Default::default(),
            )
        };
        Self {
            q_proj: linear("q_proj"),
            k_proj: linear("k_proj"),
            v_proj: linear("v_proj"),
            out_proj: linear("out_proj"),
            heads: config.num_attention_heads,
        }
    }

    fn forward(&self, hidden: &Tensor) -> Tensor {
        let (batch, length, width) = hidden.size3().expect("hidden states are [B, T, D]");
        let head_dim = width / self.heads;
        let split_heads = |x: Tensor| {
            x.view([batch, length, self.heads, head_dim])
                .transpose(1, 2)
        };
        let query = split_heads(self.q_proj.forward(hidden));
        let key = split_heads(self.k_proj.forward(hidden));
        let value = split_heads(self.v_proj.forward(hidden));
        let attended = Tensor::scaled_dot_product_attention(
            &query,
            &key,
            &value,
            None::<Tensor>,
            0.0,
            true,
            None,
            false,
        );
        let merged = attended.transpose(1, 2).reshape([batch, length, width]);
        self.out_proj.forward(&merged)
    }
}

#[derive(Debug)]
struct ClipEncoderLayer {
    layer_norm1: nn::LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: nn::LayerNorm,
    fc1: AdaptableLinear,
    fc2: AdaptableLinear,
    activation: ClipActivation,
}

impl ClipEncoderLayer {
    fn new(vs: nn::Path, config: &ClipTextConfig) -> Self {
        let norm_config = nn::LayerNormConfig {
            eps: config.layer_norm_eps,
            ..Default::default()
        };
        let width = config.hidden_size;
        Self {
            layer_norm1: nn::layer_norm(&vs / "layer_norm1", vec![width], norm_config),
            self_attn: ClipAttention::new(&vs / "self_attn", config),
            layer_norm2: nn::layer_norm(&vs / "layer_norm2", vec![width], norm_config),
            fc1: adaptable_linear(
                &(&vs / "mlp" / "fc1"),
                LayerRole::TextEncoder,
                width,
                config.intermediate_size,
                Default::default(),
            ),
            fc2: adaptable_linear(
                &(&vs / "mlp" / "fc2"),
                LayerRole::TextEncoder,
                config.intermediate_size,
                width,
                Default::default(),
            ),
            activation: config.hidden_act,
        }
    }

    fn forward(&self, hidden: &Tensor) -> Tensor {
        let hidden = hidden + self.self_attn.forward(&self.layer_norm1.forward(hidden));
        let inner = self.fc1.forward(&self.layer_norm2.forward(&hidden));
        let inner = match self.activation {
            ClipActivation::QuickGelu => &inner * (&inner * 1.702).sigmoid(),
            ClipActivation::Gelu => inner.gelu("none"),
        };
        hidden + self.fc2.forward(&inner)
    }
}

impl AdaptableLayers for ClipEncoderLayer {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        let attention = &self.self_attn;
        for layer in [
            &attention.q_proj,
            &attention.k_proj,
            &attention.v_proj,
            &attention.out_proj,
            &self.fc1,
            &self.fc2,
        ] {
            sites.push(layer.site());
        }
    }
}

/// transformers' CLIPTextModel, without the pooled output (SD conditions on the hidden states).
#[derive(Debug)]
pub struct ClipTextModel {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: nn::LayerNorm,
    config: ClipTextConfig,
}

impl AdaptableLayers for ClipTextModel {
    fn adaptable_sites<'a>(&'a self, sites: &mut Vec<AdaptableSite<'a>>) {
        self.layers.adaptable_sites(sites);
    }
}

impl ClipTextModel {
    /// Builds the model under `vs` (pass the VarStore root: paths start with `text_model.`).
    pub fn new(vs: nn::Path, config: &ClipTextConfig) -> Self {
        let text_model = &vs / "text_model";
        let embeddings = &text_model / "embeddings";
        let layers = (0..config.num_hidden_layers)
            .map(|index| ClipEncoderLayer::new(&text_model / "encoder" / "layers" / index, config))
            .collect();
        Self {
            token_embedding: nn::embedding(
                &embeddings / "token_embedding",
                config.vocab_size,
                config.hidden_size,
                Default::default(),
            ),
            position_embedding: nn::embedding(
                &embeddings / "position_embedding",
                config.max_position_embeddings,
                config.hidden_size,
                Default::default(),
            ),
            layers,
            final_layer_norm: nn::layer_norm(
                &text_model / "final_layer_norm",
                vec![config.hidden_size],
                nn::LayerNormConfig {
                    eps: config.layer_norm_eps,
                    ..Default::default()
                },
            ),
            config: config.clone(),
        }
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Hidden states of `input_ids` [B, T] (T <= max_position_embeddings) `clip_skip` layers from
    /// the end, followed by `final_layer_norm`: clip_skip 1 is last_hidden_state, 2 the
    /// penultimate layer.
    pub fn encode(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let size = input_ids.size();
        if size.len() != 2 || size[1] == 0 || size[1] > self.config.max_position_embeddings {
            return Err(WorkerError::Input {
                name: "input_ids".to_string(),
                message: format!(
                    "shape {size:?} is not [batch, 1..={}]",
                    self.config.max_position_embeddings
                ),
            });
        }
        if clip_skip == 0 || clip_skip > self.layers.len() {
            return Err(WorkerError::Input {
                name: "clip_skip".to_string(),
                message: format!("{clip_skip} is outside 1..={}", self.layers.len()),
            });
        }
        let input_ids = input_ids.to_kind(Kind::Int64);
        let positions = Tensor::arange(size[1], (Kind::Int64, input_ids.device())).unsqueeze(0);
        let mut hidden =
            self.token_embedding.forward(&input_ids) + self.position_embedding.forward(&positions);
        let layers_to_run = self.layers.len() + 1 - clip_skip;
        for layer in &self.layers[..layers_to_run] {
            hidden = layer.forward(&hidden);
        }
        Ok(self.final_layer_norm.forward(&hidden))
    }

    /// Long-prompt conditioning: framed ids [B, 77·n] are encoded chunk by chunk and joined in
    /// `layout` ([B, 77·n, D] chunked, [B, 75·n+2, D] kohya).
    pub fn encode_chunked(
        &self,
        framed_ids: &Tensor,
        clip_skip: usize,
        layout: PromptLayout,
    ) -> Result<Tensor> {
        let chunks = split_chunks(framed_ids)?;
        let states = chunks
            .iter()
            .map(|chunk| self.encode(chunk, clip_skip))
            .collect::<Result<Vec<_>>>()?;
        Ok(join_chunk_states(&states, layout))
    }
}
