//! The contents of an AUTOMATIC1111 hypernetwork `.pt`, independent of how it is stored: the
//! metadata keys A1111 writes and, per module size, the k and v state dicts (A1111 keys such as
//! `linear.0.weight`). [`super::pt_writer`] writes it, [`super::pt_reader`] reads it.

use std::collections::BTreeMap;

use tch::Tensor;

use super::module::HypernetworkStructure;

/// The state dicts of one size: `[k, v]`, each (A1111 key, tensor) in Sequential order.
pub type ModuleStateDicts = [Vec<(String, Tensor)>; 2];

/// Everything an A1111 hypernetwork file holds.
#[derive(Debug)]
pub struct HypernetworkFile {
    pub structure: HypernetworkStructure,
    /// Training steps done (`step`).
    pub step: i64,
    pub name: String,
    /// A1111's short hash of the model it was trained on (`sd_checkpoint`).
    pub sd_checkpoint: Option<String>,
    pub sd_checkpoint_name: Option<String>,
    /// Per size (the int keys of the pickled dict).
    pub modules: BTreeMap<i64, ModuleStateDicts>,
}

/// The A1111 key of a module's `.pt`/state-dict entry for the old two-layer format
/// (`linear1.weight` → `linear.0.weight`), as A1111's `fix_old_state_dict` renames it.
pub fn fix_old_key(key: &str) -> String {
    match key {
        "linear1.weight" => "linear.0.weight".to_string(),
        "linear1.bias" => "linear.0.bias".to_string(),
        "linear2.weight" => "linear.1.weight".to_string(),
        "linear2.bias" => "linear.1.bias".to_string(),
        other => other.to_string(),
    }
}
