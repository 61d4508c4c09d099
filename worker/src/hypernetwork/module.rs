//! One AUTOMATIC1111 `HypernetworkModule`: `x + f(x)·multiplier`, with f a `torch.nn.Sequential`
//! built from `layer_structure` exactly as A1111's `modules/hypernetworks/hypernetwork.py` builds
//! it, so the state-dict keys (`linear.<position>.weight`/`.bias`) sit at the same Sequential
//! positions:
//!
//! for i in 0..len(layer_structure)−1:
//! 1. `Linear(int(d·ls[i]), int(d·ls[i+1]))`;
//! 2. the activation, unless it is `linear` or (this is the last layer and not `activate_output`);
//! 3. `LayerNorm(int(d·ls[i+1]))` when `is_layer_norm`;
//! 4. `Dropout(p)` when `dropout_structure[i+1] > 0`.
//!
//! Initialisation follows A1111 too: `Normal` draws Linear weights from N(0, 0.01) with zero bias;
//! Xavier*/Kaiming* use torch's formulas (Kaiming with the relu gain, which equals the leaky_relu
//! gain at A1111's default slope of 0); a LayerNorm's weight is always drawn from N(0, 0.01) and its
//! bias zeroed, whatever the init (that is what A1111 does).

use tch::{nn, Tensor};

/// torch.nn.LayerNorm's default eps, which A1111's modules use.
const LAYER_NORM_EPS: f64 = 1e-5;

pub use arbor_common::config::{HypernetworkActivation, HypernetworkWeightInit};

use crate::error::{Result, WorkerError};

/// Applies A1111's `activation_func`.
fn apply_activation(activation: HypernetworkActivation, input: &Tensor) -> Tensor {
    match activation {
        HypernetworkActivation::Linear => input.shallow_clone(),
        HypernetworkActivation::Relu => input.relu(),
        HypernetworkActivation::LeakyRelu => input.leaky_relu(),
        HypernetworkActivation::Elu => input.elu(),
        HypernetworkActivation::Swish => input.hardswish(),
        HypernetworkActivation::Tanh => input.tanh(),
        HypernetworkActivation::Sigmoid => input.sigmoid(),
    }
}

/// The structure shared by every module of one hypernetwork (A1111's metadata keys).
#[derive(Debug, Clone, PartialEq)]
pub struct HypernetworkStructure {
    /// Width multipliers; must start and end with 1 (A1111 asserts it).
    pub layer_structure: Vec<f64>,
    pub activation: HypernetworkActivation,
    pub is_layer_norm: bool,
    pub weight_init: HypernetworkWeightInit,
    /// A dropout probability after each layer (index 0 unused); all zero for no dropout.
    pub dropout_structure: Vec<f64>,
    pub activate_output: bool,
}

impl Default for HypernetworkStructure {
    fn default() -> Self {
        Self {
            layer_structure: vec![1.0, 2.0, 1.0],
            activation: HypernetworkActivation::Linear,
            is_layer_norm: false,
            weight_init: HypernetworkWeightInit::Normal,
            dropout_structure: vec![0.0, 0.0, 0.0],
            activate_output: false,
        }
    }
}

impl HypernetworkStructure {
    /// A1111's `parse_dropout_structure`: 0.3 after every hidden layer when `use_dropout`, and
    /// after the last hidden layer only with `last_layer_dropout`.
    pub fn a1111_dropout_structure(
        layer_structure: &[f64],
        use_dropout: bool,
        last_layer_dropout: bool,
    ) -> Vec<f64> {
        if !use_dropout {
            return vec![0.0; layer_structure.len()];
        }
        let mut values = vec![0.0];
        values.extend(std::iter::repeat_n(
            0.3,
            layer_structure.len().saturating_sub(3),
        ));
        values.push(if last_layer_dropout { 0.3 } else { 0.0 });
        values.push(0.0);
        values
    }

    pub fn use_dropout(&self) -> bool {
        self.dropout_structure
            .iter()
            .any(|probability| *probability > 0.0)
    }

    /// Whether the dropout before the output layer is on (A1111's `dropout_structure[-2] != 0`).
    pub fn last_layer_dropout(&self) -> bool {
        self.dropout_structure.len() >= 2
            && self.dropout_structure[self.dropout_structure.len() - 2] != 0.0
    }

    /// The same structure without dropout (what is exported for inference).
    pub fn without_dropout(&self) -> Self {
        Self {
            dropout_structure: vec![0.0; self.layer_structure.len()],
            ..self.clone()
        }
    }

    /// Checks the structure as A1111's constructor asserts it.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, message: String| {
            Err(WorkerError::Hypernetwork {
                item: field.to_string(),
                message,
            })
        };
        let layers = &self.layer_structure;
        if layers.len() < 2 || layers[0] != 1.0 || layers[layers.len() - 1] != 1.0 {
            return invalid(
                "layer_structure",
                format!("{layers:?} must have at least two entries, starting and ending with 1"),
            );
        }
        if layers
            .iter()
            .any(|factor| !factor.is_finite() || *factor <= 0.0)
        {
            return invalid(
                "layer_structure",
                format!("{layers:?} must hold positive factors"),
            );
        }
        if self.dropout_structure.len() != layers.len() {
            return invalid(
                "dropout_structure",
                format!(
                    "has {} entries, layer_structure has {}",
                    self.dropout_structure.len(),
                    layers.len()
                ),
            );
        }
        if self
            .dropout_structure
            .iter()
            .any(|probability| !(0.0..1.0).contains(probability))
        {
            return invalid(
                "dropout_structure",
                format!(
                    "{:?} must hold probabilities in [0, 1)",
                    self.dropout_structure
                ),
            );
        }
        Ok(())
    }

    /// Width of layer boundary `index` for module size `dim` (Python's `int(dim * factor)`).
    pub fn width(&self, dim: i64, index: usize) -> i64 {
        (dim as f64 * self.layer_structure[index]).trunc() as i64
    }
}

#[derive(Debug)]
enum Layer {
    Linear(nn::Linear),
    Activation(HypernetworkActivation),
    LayerNorm(nn::LayerNorm),
    Dropout(f64),
}

/// One k or v module of one size.
#[derive(Debug)]
pub struct HypernetworkModule {
    layers: Vec<Layer>,
}

impl HypernetworkModule {
    /// Builds the module under `vs` (variables `linear.<position>.weight`/`.bias`) with the
    /// structure's initialisation.
    pub fn new(vs: nn::Path, dim: i64, structure: &HypernetworkStructure) -> Self {
        let linear_path = &vs / "linear";
        let count = structure.layer_structure.len() - 1;
        let mut layers = Vec::new();
        for index in 0..count {
            let fan_in = structure.width(dim, index);
            let fan_out = structure.width(dim, index + 1);
            let position = layers.len();
            let weight_init = match structure.weight_init {
                HypernetworkWeightInit::Normal => nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.01,
                },
                HypernetworkWeightInit::XavierUniform => {
                    let bound = (6.0 / (fan_in + fan_out) as f64).sqrt();
                    nn::Init::Uniform {
                        lo: -bound,
                        up: bound,
                    }
                }
                HypernetworkWeightInit::XavierNormal => nn::Init::Randn {
                    mean: 0.0,
                    stdev: (2.0 / (fan_in + fan_out) as f64).sqrt(),
                },
                HypernetworkWeightInit::KaimingUniform => {
                    let bound = 2f64.sqrt() * (3.0 / fan_in as f64).sqrt();
                    nn::Init::Uniform {
                        lo: -bound,
                        up: bound,
                    }
                }
                HypernetworkWeightInit::KaimingNormal => nn::Init::Randn {
                    mean: 0.0,
                    stdev: 2f64.sqrt() / (fan_in as f64).sqrt(),
                },
            };
            layers.push(Layer::Linear(nn::linear(
                &linear_path / position,
                fan_in,
                fan_out,
                nn::LinearConfig {
                    ws_init: weight_init,
                    bs_init: Some(nn::Init::Const(0.0)),
                    bias: true,
                },
            )));
            let is_last = index + 1 == count;
            if structure.activation != HypernetworkActivation::Linear
                && (!is_last || structure.activate_output)
            {
                layers.push(Layer::Activation(structure.activation));
            }
            if structure.is_layer_norm {
                let position = layers.len();
                layers.push(Layer::LayerNorm(nn::layer_norm(
                    &linear_path / position,
                    vec![fan_out],
                    nn::LayerNormConfig {
                        ws_init: nn::Init::Randn {
                            mean: 0.0,
                            stdev: 0.01,
                        },
                        bs_init: nn::Init::Const(0.0),
                        eps: LAYER_NORM_EPS,
                        ..Default::default()
                    },
                )));
            }
            let dropout = structure.dropout_structure[index + 1];
            if dropout > 0.0 {
                layers.push(Layer::Dropout(dropout));
            }
        }
        Self { layers }
    }

    /// f(x), the residual branch (dropout only when `train`).
    pub fn branch(&self, input: &Tensor, train: bool) -> Tensor {
        self.run(input, train, false).0
    }

    /// f(x) twice in lockstep: with the parameters, and with the parameters detached (same
    /// dropout masks, so both have exactly the same value). The second lets gradients flow to
    /// x but not to the module's parameters (used by the shallow-layer penalty).
    pub fn branch_and_parameter_detached(&self, input: &Tensor, train: bool) -> (Tensor, Tensor) {
        let (branch, detached) = self.run(input, train, true);
        (branch, detached.expect("the detached pass was requested"))
    }

    fn run(&self, input: &Tensor, train: bool, with_detached: bool) -> (Tensor, Option<Tensor>) {
        let mut hidden = input.shallow_clone();
        let mut detached = with_detached.then(|| input.shallow_clone());
        for layer in &self.layers {
            match layer {
                Layer::Linear(linear) => {
                    hidden = hidden.linear(&linear.ws, linear.bs.as_ref());
                    detached = detached.map(|value| {
                        value.linear(
                            &linear.ws.detach(),
                            linear.bs.as_ref().map(Tensor::detach).as_ref(),
                        )
                    });
                }
                Layer::Activation(activation) => {
                    hidden = apply_activation(*activation, &hidden);
                    detached = detached.map(|value| apply_activation(*activation, &value));
                }
                Layer::LayerNorm(norm) => {
                    let normalise = |value: &Tensor, detach: bool| {
                        let parameter = |tensor: &Option<Tensor>| {
                            tensor.as_ref().map(|tensor| {
                                if detach {
                                    tensor.detach()
                                } else {
                                    tensor.shallow_clone()
                                }
                            })
                        };
                        value.layer_norm(
                            &norm.normalized_shape,
                            parameter(&norm.ws),
                            parameter(&norm.bs),
                            LAYER_NORM_EPS,
                            false,
                        )
                    };
                    hidden = normalise(&hidden, false);
                    detached = detached.map(|value| normalise(&value, true));
                }
                Layer::Dropout(probability) => {
                    if !train {
                        continue;
                    }
                    // torch.nn.Dropout: zero with probability p, scale the rest by 1/(1−p).
                    let keep = 1.0 - probability;
                    let mask = hidden.ones_like().bernoulli_float_(keep) / keep;
                    hidden = &hidden * &mask;
                    detached = detached.map(|value| value * &mask);
                }
            }
        }
        (hidden, detached)
    }

    /// The module's parameters under their A1111 keys, in Sequential order. With
    /// `with_dropout` false the Dropout positions are left out of the numbering, which is the
    /// layout of the same structure without dropout (the inference export).
    pub fn state_dict(&self, with_dropout: bool) -> Vec<(String, Tensor)> {
        let mut entries = Vec::new();
        let mut position = 0usize;
        for layer in &self.layers {
            let (weight, bias) = match layer {
                Layer::Linear(linear) => (Some(&linear.ws), linear.bs.as_ref()),
                Layer::LayerNorm(norm) => (norm.ws.as_ref(), norm.bs.as_ref()),
                Layer::Activation(_) => (None, None),
                Layer::Dropout(_) => {
                    if with_dropout {
                        position += 1;
                    }
                    continue;
                }
            };
            if let Some(weight) = weight {
                entries.push((format!("linear.{position}.weight"), weight.shallow_clone()));
            }
            if let Some(bias) = bias {
                entries.push((format!("linear.{position}.bias"), bias.shallow_clone()));
            }
            position += 1;
        }
        entries
    }

    /// Copies a state dict in (A1111 keys, dropout positions counted), strictly: every key must
    /// be present with its shape and no other key may be. `item` names the module in errors.
    pub fn load_state_dict(&self, entries: &[(String, Tensor)], item: &str) -> Result<()> {
        let own = self.state_dict(true);
        for (key, _) in entries {
            if !own.iter().any(|(own_key, _)| own_key == key) {
                return Err(WorkerError::Hypernetwork {
                    item: format!("{item}.{key}"),
                    message: "unexpected key for this layer structure".to_string(),
                });
            }
        }
        let _guard = tch::no_grad_guard();
        for (key, mut variable) in own {
            let Some((_, tensor)) = entries.iter().find(|(entry_key, _)| *entry_key == key) else {
                return Err(WorkerError::Hypernetwork {
                    item: format!("{item}.{key}"),
                    message: format!("missing (expected shape {:?})", variable.size()),
                });
            };
            if tensor.size() != variable.size() {
                return Err(WorkerError::Hypernetwork {
                    item: format!("{item}.{key}"),
                    message: format!(
                        "has shape {:?}, expected {:?}",
                        tensor.size(),
                        variable.size()
                    ),
                });
            }
            variable.copy_(&tensor.to_kind(variable.kind()).to_device(variable.device()));
        }
        Ok(())
    }

    /// `x + f(x)·multiplier`.
    pub fn forward(&self, input: &Tensor, multiplier: f64, train: bool) -> Tensor {
        input + self.branch(input, train) * multiplier
    }
}
