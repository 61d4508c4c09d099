//! Merging a kohya-layout LoRA into a model's weights (`arbor-worker merge-lora`): every module's
//! `W += multiplier · alpha/rank · up·down`, on the components' diffusers-named tensors, so the
//! result exports like any other model.

use std::collections::{BTreeMap, HashMap};

use tch::Kind;

use crate::error::{Result, WorkerError};
use crate::lora::kohya_file::KohyaModule;
use crate::lora::{kohya_module_name, KOHYA_TEXT_ENCODER_PREFIX, KOHYA_UNET_PREFIX};
use crate::weights::export::NamedTensors;
use crate::weights::Component;

/// How many modules went into each component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MergeReport {
    pub unet_modules: usize,
    pub text_encoder_modules: usize,
}

/// kohya module name → (component, weight key) of every `.weight` of the components.
fn module_index(
    components: &BTreeMap<Component, NamedTensors>,
) -> HashMap<String, (Component, String)> {
    let mut index = HashMap::new();
    for (component, prefix) in [
        (Component::Unet, KOHYA_UNET_PREFIX),
        (Component::TextEncoder, KOHYA_TEXT_ENCODER_PREFIX),
    ] {
        let Some(tensors) = components.get(&component) else {
            continue;
        };
        for key in tensors.keys() {
            if let Some(module_path) = key.strip_suffix(".weight") {
                index.insert(
                    kohya_module_name(prefix, module_path),
                    (component, key.clone()),
                );
            }
        }
    }
    index
}

/// Adds every module's update, times `multiplier`, to the weight it adapts. A module that adapts
/// no weight of these components, or whose update does not fit the weight, is an error naming
/// it; nothing is changed then.
pub fn merge_lora(
    components: &mut BTreeMap<Component, NamedTensors>,
    modules: &[KohyaModule],
    multiplier: f64,
) -> Result<MergeReport> {
    let index = module_index(components);
    let mut updates = Vec::with_capacity(modules.len());
    for module in modules {
        let Some((component, key)) = index.get(&module.name) else {
            return Err(WorkerError::Training(format!(
                "lora module `{}` adapts no layer of this model (is it a LoRA for another \
                 architecture?)",
                module.name
            )));
        };
        let weight = &components[component][key];
        let update = module.dense_update();
        if update.numel() != weight.numel() {
            return Err(WorkerError::TensorShape {
                key: module.name.clone(),
                source_name: "the lora".to_string(),
                expected: weight.size(),
                actual: update.size(),
            });
        }
        let update = update.reshape(weight.size()) * (multiplier * module.scale());
        updates.push((*component, key.clone(), update));
    }
    let mut report = MergeReport::default();
    for (component, key, update) in updates {
        let tensors = components
            .get_mut(&component)
            .expect("the index only names present components");
        let weight = &tensors[&key];
        let merged = (weight.to_kind(Kind::Float) + update).to_kind(weight.kind());
        tensors.insert(key, merged);
        match component {
            Component::TextEncoder => report.text_encoder_modules += 1,
            _ => report.unet_modules += 1,
        }
    }
    Ok(report)
}
