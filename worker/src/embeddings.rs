//! Timestep embeddings of the UNet: diffusers' sinusoidal `Timesteps` projection
//! (`get_timestep_embedding` with `flip_sin_to_cos` and `downscale_freq_shift`) and the
//! `TimestepEmbedding` MLP that follows it.

use tch::{nn, nn::Module, Kind, Tensor};

/// The sinusoidal projection of a per-sample timestep tensor, as diffusers' `Timesteps` module.
#[derive(Debug, Clone, Copy)]
pub struct TimestepProjection {
    pub embedding_dim: i64,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
    pub max_period: f64,
}

impl TimestepProjection {
    pub fn new(embedding_dim: i64, flip_sin_to_cos: bool, downscale_freq_shift: f64) -> Self {
        Self {
            embedding_dim,
            flip_sin_to_cos,
            downscale_freq_shift,
            max_period: 10000.0,
        }
    }

    /// `timesteps` is a 1-D tensor (one timestep per sample, any numeric kind); the result is
    /// f32 [B, embedding_dim].
    pub fn forward(&self, timesteps: &Tensor) -> Tensor {
        let half_dim = self.embedding_dim / 2;
        let device = timesteps.device();
        let exponent = Tensor::arange(half_dim, (Kind::Float, device)) * (-self.max_period.ln())
            / (half_dim as f64 - self.downscale_freq_shift);
        let frequencies = exponent.exp();
        let arguments = timesteps.to_kind(Kind::Float).unsqueeze(1) * frequencies.unsqueeze(0);
        let (first, second) = if self.flip_sin_to_cos {
            (arguments.cos(), arguments.sin())
        } else {
            (arguments.sin(), arguments.cos())
        };
        let embedding = Tensor::cat(&[first, second], -1);
        if self.embedding_dim % 2 == 1 {
            return embedding.constant_pad_nd([0, 1, 0, 0]);
        }
        embedding
    }
}

/// diffusers' `TimestepEmbedding`: linear_1 → SiLU → linear_2.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: nn::Linear,
    linear_2: nn::Linear,
}

impl TimestepEmbedding {
    pub fn new(vs: nn::Path, in_channels: i64, time_embed_dim: i64) -> Self {
        let linear_1 = nn::linear(
            &vs / "linear_1",
            in_channels,
            time_embed_dim,
            Default::default(),
        );
        let linear_2 = nn::linear(
            &vs / "linear_2",
            time_embed_dim,
            time_embed_dim,
            Default::default(),
        );
        Self { linear_1, linear_2 }
    }

    pub fn forward(&self, projected: &Tensor) -> Tensor {
        self.linear_2
            .forward(&self.linear_1.forward(projected).silu())
    }
}
