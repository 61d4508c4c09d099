//! arbor's worker library: the tch (libtorch) model stack of Stable Diffusion 1.x — CLIP text
//! encoder with clip skip and long prompts, UNet, VAE, DDPM — and weight I/O.

pub mod attention;
pub mod clip;
pub mod ddpm;
pub mod device;
pub mod diffusers_config;
pub mod diffusion_samplers;
pub mod embeddings;
pub mod error;
pub mod hypernetwork;
pub mod json_file;
pub mod layer_adapter;
pub mod lora;
pub mod model_components;
pub mod probe;
pub mod prompt;
pub mod resnet;
pub mod tokenizer;
pub mod train;
pub mod unet_2d;
pub mod unet_2d_config;
pub mod unet_blocks;
pub mod vae;
pub mod weights;

pub use error::{Result, WorkerError};
