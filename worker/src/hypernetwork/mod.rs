//! Hypernetworks as AUTOMATIC1111 defines them (docs/architecture.md §4): for each enabled size d a
//! k module and a v module ([`module::HypernetworkModule`], `x + f(x)·multiplier`) applied to the
//! context that feeds an attention layer's `to_k` and `to_v`. The pair is picked by the context
//! width at every attention layer, so the text width (768 in SD1) covers all cross-attention and
//! the block widths cover self-attention. Several hypernetworks chain ([`HypernetworkChain`]).
//!
//! - [`shallow_penalty`]: NovelAI's per-depth gradient weighting (training only).
//! - [`pt_writer`] / [`pt_reader`]: A1111's `.pt` format (written by hand; read through the
//!   [`restricted_pickle`] reader, which never executes a pickle).
//! - [`Hypernetwork::inference_entries`]: `<size>.<0=k|1=v>.<A1111 key>`, the inference layout
//!   without dropout. No safetensors form is exported: AUTOMATIC1111 only loads `.pt`
//!   hypernetworks, and ComfyUI's loader reads a safetensors one as an empty patch.
//!
//! Variables live in the hypernetwork's own `VarStore` as `<size>.<0|1>.linear.<i>.<weight|bias>`,
//! with dropout positions counted as A1111 counts them in training.

pub mod module;
pub mod pt_file;
pub mod pt_reader;
pub mod pt_writer;
pub mod restricted_pickle;
pub mod shallow_penalty;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::Path;

use tch::{nn, Device, Tensor};

use crate::attention::{AttentionLayerInfo, KvContextTransform};
use crate::error::{Result, WorkerError};
use module::{HypernetworkModule, HypernetworkStructure};
use pt_file::HypernetworkFile;
use pt_writer::PtDtype;
use shallow_penalty::ShallowPenalty;

/// SD1's default sizes: the text width, then the block widths.
pub const DEFAULT_SIZES: [i64; 4] = [768, 320, 640, 1280];

/// The file metadata that is not structure.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HypernetworkInfo {
    pub name: String,
    pub step: i64,
    pub sd_checkpoint: Option<String>,
    pub sd_checkpoint_name: Option<String>,
}

/// One hypernetwork: its modules, their variables, and how it is applied.
pub struct Hypernetwork {
    var_store: nn::VarStore,
    structure: HypernetworkStructure,
    modules: BTreeMap<i64, [HypernetworkModule; 2]>,
    pub info: HypernetworkInfo,
    /// Scales f(x); 1 in training (A1111 ignores its multiplier while training).
    pub multiplier: f64,
    /// Dropout on (training) or off.
    pub train: bool,
    penalty: Option<ShallowPenalty>,
    l2_terms: RefCell<Vec<Tensor>>,
}

impl std::fmt::Debug for Hypernetwork {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Hypernetwork")
            .field("structure", &self.structure)
            .field("sizes", &self.sizes())
            .field("info", &self.info)
            .field("multiplier", &self.multiplier)
            .field("train", &self.train)
            .field("penalty", &self.penalty)
            .finish()
    }
}

impl Hypernetwork {
    /// New modules for `sizes`, initialised as the structure says (seed with
    /// `tch::manual_seed` first for reproducibility).
    pub fn new(
        sizes: &[i64],
        structure: HypernetworkStructure,
        info: HypernetworkInfo,
        device: Device,
    ) -> Result<Self> {
        structure.validate()?;
        if let Some(size) = sizes.iter().find(|size| **size <= 0) {
            return Err(WorkerError::Hypernetwork {
                item: "sizes".to_string(),
                message: format!("size {size} must be positive"),
            });
        }
        let var_store = nn::VarStore::new(device);
        let mut modules = BTreeMap::new();
        for size in sizes {
            let root = var_store.root() / *size;
            let pair = [
                HypernetworkModule::new(&root / 0, *size, &structure),
                HypernetworkModule::new(&root / 1, *size, &structure),
            ];
            modules.insert(*size, pair);
        }
        Ok(Self {
            var_store,
            structure,
            modules,
            info,
            multiplier: 1.0,
            train: false,
            penalty: None,
            l2_terms: RefCell::new(Vec::new()),
        })
    }

    /// Builds the modules a file describes and loads its weights (strictly).
    pub fn from_file(file: &HypernetworkFile, device: Device) -> Result<Self> {
        let sizes: Vec<i64> = file.modules.keys().copied().collect();
        let hypernetwork = Self::new(
            &sizes,
            file.structure.clone(),
            HypernetworkInfo {
                name: file.name.clone(),
                step: file.step,
                sd_checkpoint: file.sd_checkpoint.clone(),
                sd_checkpoint_name: file.sd_checkpoint_name.clone(),
            },
            device,
        )?;
        for (size, [key_state, value_state]) in &file.modules {
            let [key_module, value_module] = &hypernetwork.modules[size];
            key_module.load_state_dict(key_state, &format!("{}.0", size))?;
            value_module.load_state_dict(value_state, &format!("{}.1", size))?;
        }
        Ok(hypernetwork)
    }

    /// Reads an A1111 `.pt`.
    pub fn load_pt(path: &Path, device: Device) -> Result<Self> {
        Self::from_file(&pt_reader::read_pt(path)?, device)
    }

    pub fn structure(&self) -> &HypernetworkStructure {
        &self.structure
    }

    pub fn sizes(&self) -> Vec<i64> {
        self.modules.keys().copied().collect()
    }

    pub fn var_store(&self) -> &nn::VarStore {
        &self.var_store
    }

    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.var_store
    }

    /// The k (`which` 0) or v (1) module of a size.
    pub fn module(&self, size: i64, which: usize) -> Option<&HypernetworkModule> {
        self.modules.get(&size).and_then(|pair| pair.get(which))
    }

    /// Turns the shallow-layer penalty on (validated here) or off.
    pub fn set_shallow_penalty(&mut self, penalty: Option<ShallowPenalty>) -> Result<()> {
        if let Some(penalty) = &penalty {
            penalty.validate()?;
        }
        self.penalty = penalty;
        Ok(())
    }

    /// The L2 penalty collected since the last call (a scalar; zero when the penalty is off).
    pub fn take_l2_penalty(&self) -> Tensor {
        let terms = std::mem::take(&mut *self.l2_terms.borrow_mut());
        terms
            .into_iter()
            .reduce(|sum, term| sum + term)
            .unwrap_or_else(|| Tensor::from(0f32).to_device(self.var_store.device()))
    }

    /// Applies the k and v modules of `layer.context_dim` (unchanged for other widths).
    pub fn apply_pair(
        &self,
        key_context: &Tensor,
        value_context: &Tensor,
        layer: &AttentionLayerInfo,
    ) -> (Tensor, Tensor) {
        let Some([key_module, value_module]) = self.modules.get(&layer.context_dim) else {
            return (key_context.shallow_clone(), value_context.shallow_clone());
        };
        (
            self.apply_module(key_module, key_context, layer),
            self.apply_module(value_module, value_context, layer),
        )
    }

    fn apply_module(
        &self,
        module: &HypernetworkModule,
        context: &Tensor,
        layer: &AttentionLayerInfo,
    ) -> Tensor {
        let level = layer.resolution_level;
        let branch = match &self.penalty {
            Some(penalty) => {
                let needs_detached = penalty.gradient_weight(level) != 1.0;
                let (branch, parameter_detached) = if needs_detached {
                    let (branch, detached) =
                        module.branch_and_parameter_detached(context, self.train);
                    (branch, Some(detached))
                } else {
                    (module.branch(context, self.train), None)
                };
                if let Some(term) = penalty.l2_term(&branch, level) {
                    self.l2_terms.borrow_mut().push(term);
                }
                match parameter_detached {
                    Some(detached) => penalty.apply(&branch, &detached, level),
                    None => branch,
                }
            }
            None => module.branch(context, self.train),
        };
        context + branch * self.multiplier
    }

    /// The contents of the `.pt` for inference: dropout removed and keys renumbered.
    pub fn to_file(&self) -> HypernetworkFile {
        let modules = self
            .modules
            .iter()
            .map(|(size, [key_module, value_module])| {
                (
                    *size,
                    [key_module.state_dict(false), value_module.state_dict(false)],
                )
            })
            .collect();
        HypernetworkFile {
            structure: self.structure.without_dropout(),
            step: self.info.step,
            name: self.info.name.clone(),
            sd_checkpoint: self.info.sd_checkpoint.clone(),
            sd_checkpoint_name: self.info.sd_checkpoint_name.clone(),
            modules,
        }
    }

    /// Writes A1111's `.pt` (see [`pt_writer`]).
    pub fn save_pt(&self, path: &Path, dtype: PtDtype) -> Result<()> {
        pt_writer::write_pt(&self.to_file(), path, dtype)
    }

    /// The weights in the inference layout, `<size>.<0|1>.<A1111 key>` without dropout
    /// positions.
    pub fn inference_entries(&self) -> Vec<(String, Tensor)> {
        let mut entries = Vec::new();
        for (size, pair) in &self.modules {
            for (which, module) in pair.iter().enumerate() {
                for (key, tensor) in module.state_dict(false) {
                    entries.push((format!("{size}.{which}.{key}"), tensor.detach()));
                }
            }
        }
        entries
    }

    /// The gradient of every module parameter, named `<size>.<k|v>.<A1111 key>` (dropout
    /// positions counted as in training); zeros where none reached it.
    pub fn gradients(&self) -> Vec<(String, Tensor)> {
        let mut gradients = Vec::new();
        for (size, pair) in &self.modules {
            for (which, module) in pair.iter().enumerate() {
                let side = if which == 0 { "k" } else { "v" };
                for (key, variable) in module.state_dict(true) {
                    let gradient = variable.grad();
                    let gradient = if gradient.defined() {
                        gradient.detach().copy()
                    } else {
                        variable.zeros_like()
                    };
                    gradients.push((format!("{size}.{side}.{key}"), gradient));
                }
            }
        }
        gradients
    }

    /// Zeroes every module gradient.
    pub fn zero_grad(&self) {
        for (_, mut variable) in self.var_store.variables() {
            variable.zero_grad();
        }
    }
}

impl KvContextTransform for Hypernetwork {
    fn transform(&self, context: &Tensor, layer: &AttentionLayerInfo) -> (Tensor, Tensor) {
        self.apply_pair(context, context, layer)
    }
}

/// Several hypernetworks applied in order, A1111's `apply_hypernetworks`: each one's k module
/// takes the previous k context, its v module the previous v context.
#[derive(Debug)]
pub struct HypernetworkChain<'a> {
    pub hypernetworks: Vec<&'a Hypernetwork>,
}

impl KvContextTransform for HypernetworkChain<'_> {
    fn transform(&self, context: &Tensor, layer: &AttentionLayerInfo) -> (Tensor, Tensor) {
        let mut key_context = context.shallow_clone();
        let mut value_context = context.shallow_clone();
        for hypernetwork in &self.hypernetworks {
            (key_context, value_context) =
                hypernetwork.apply_pair(&key_context, &value_context, layer);
        }
        (key_context, value_context)
    }
}
