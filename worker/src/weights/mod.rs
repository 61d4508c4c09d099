//! Weight I/O: diffusers folders and single-file (LDM) safetensors in, both out.

pub mod export;
pub mod key_map;
pub mod model_source;
pub mod state_dict;

pub use key_map::{Component, KeyMap};
pub use model_source::ModelSource;
pub use state_dict::{load_into_var_store, ComponentTensors, LoadReport};
