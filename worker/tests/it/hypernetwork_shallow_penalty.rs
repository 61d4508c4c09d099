//! The shallow-layer penalty: the forward pass is unchanged, each resolution level's
//! contribution to the shared modules' gradient is scaled by its weight a_l, and the optional
//! L2 term is depth-weighted.

use crate::hypernetwork_fixtures::{fixtures_dir, get, load_unet, max_abs_diff, read_tensors};
use arbor_worker::attention::{AttentionLayerInfo, KvContextTransform, UNetBlockPosition};
use arbor_worker::hypernetwork::module::HypernetworkStructure;
use arbor_worker::hypernetwork::shallow_penalty::ShallowPenalty;
use arbor_worker::hypernetwork::{Hypernetwork, HypernetworkInfo};
use arbor_worker::unet_2d::UNet2DConditionModel;
use tch::{Device, Kind, Reduction, Tensor};

/// libtorch's default generator is global and the tests of a binary run in parallel threads: the
/// tests here that draw random numbers (or need reproducible draws) hold this lock.
static RNG_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    RNG_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn penalty(level_weights: &[f64]) -> ShallowPenalty {
    ShallowPenalty {
        level_weights: level_weights.to_vec(),
        ..Default::default()
    }
}

/// (UNet output, gradients) with the given penalty.
fn run(
    unet: &UNet2DConditionModel,
    hypernetwork: &mut Hypernetwork,
    penalty: Option<ShallowPenalty>,
) -> (Tensor, Vec<(String, Tensor)>) {
    let tensors = read_tensors(&fixtures_dir().join("leakyrelu_121.safetensors"));
    hypernetwork.set_shallow_penalty(penalty).unwrap();
    hypernetwork.zero_grad();
    let output = unet
        .try_forward(
            get(&tensors, "hn.sample"),
            get(&tensors, "hn.timesteps"),
            get(&tensors, "hn.encoder_hidden_states"),
            Some(&*hypernetwork),
        )
        .unwrap();
    output
        .mse_loss(get(&tensors, "hn.target"), Reduction::Mean)
        .backward();
    (output.detach(), hypernetwork.gradients())
}

#[test]
fn the_penalty_leaves_the_forward_pass_unchanged_and_scales_each_level_gradient() {
    let _rng = rng_lock();
    let (_unet_vars, unet) = load_unet();
    let levels: Vec<usize> = unet
        .attention_layers()
        .iter()
        .map(|layer| layer.resolution_level)
        .collect();
    let deepest = *levels.iter().max().unwrap();
    assert!(deepest >= 2, "the tiny UNet has attention at three levels");
    let mut hypernetwork =
        Hypernetwork::load_pt(&fixtures_dir().join("leakyrelu_121.pt"), Device::Cpu).unwrap();
    let (plain_output, plain_gradients) = run(&unet, &mut hypernetwork, None);
    let weights = [0.25, 0.5, 1.0];
    let (penalised_output, penalised_gradients) =
        run(&unet, &mut hypernetwork, Some(penalty(&weights)));
    assert!(
        penalised_output.equal(&plain_output),
        "the forward pass must be bit-identical"
    );

    // One level at a time (a one-hot weight vector) gives that level's contribution g_l.
    let per_level: Vec<Vec<(String, Tensor)>> = (0..=deepest)
        .map(|level| {
            let one_hot: Vec<f64> = (0..=deepest)
                .map(|index| if index == level { 1.0 } else { 0.0 })
                .collect();
            run(&unet, &mut hypernetwork, Some(penalty(&one_hot))).1
        })
        .collect();
    let mut shallow_changed = false;
    for (index, (name, penalised)) in penalised_gradients.iter().enumerate() {
        let plain = &plain_gradients[index].1;
        let sum_of_levels = per_level.iter().fold(plain.zeros_like(), |sum, gradients| {
            sum + &gradients[index].1
        });
        let scale = plain.abs().max().double_value(&[]).max(1e-8);
        assert!(
            max_abs_diff(&sum_of_levels, plain, name) / scale < 1e-4,
            "{name}: the level contributions add up to the plain gradient"
        );
        let expected =
            per_level
                .iter()
                .enumerate()
                .fold(plain.zeros_like(), |sum, (level, gradients)| {
                    sum + &gradients[index].1 * weights[level.min(weights.len() - 1)]
                });
        let error = max_abs_diff(penalised, &expected, name) / scale;
        assert!(error < 1e-4, "{name}: Σ a_l·g_l error {error:e}");
        if per_level[0][index].1.abs().max().double_value(&[]) > 1e-6 {
            shallow_changed |= max_abs_diff(penalised, plain, name) > 1e-6 * scale;
        }
    }
    assert!(
        shallow_changed,
        "the shallow level must contribute and be scaled"
    );
}

#[test]
fn with_dropout_the_penalty_keeps_the_forward_pass_and_masks() {
    let _rng = rng_lock();
    let structure = HypernetworkStructure {
        layer_structure: vec![1.0, 2.0, 2.0, 1.0],
        dropout_structure: vec![0.0, 0.3, 0.3, 0.0],
        ..Default::default()
    };
    tch::manual_seed(4);
    let mut hypernetwork =
        Hypernetwork::new(&[16], structure, HypernetworkInfo::default(), Device::Cpu).unwrap();
    hypernetwork.train = true;
    let context = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
    let layer = AttentionLayerInfo {
        name: "l".to_string(),
        query_dim: 16,
        context_dim: 16,
        is_cross_attention: false,
        heads: 1,
        position: UNetBlockPosition::Down(0),
        resolution_level: 0,
    };
    tch::manual_seed(21);
    let (plain, _) = hypernetwork.transform(&context, &layer);
    hypernetwork
        .set_shallow_penalty(Some(penalty(&[0.25])))
        .unwrap();
    tch::manual_seed(21);
    let (penalised, _) = hypernetwork.transform(&context, &layer);
    assert!(penalised.equal(&plain));
    tch::manual_seed(22);
    let (other_masks, _) = hypernetwork.transform(&context, &layer);
    assert!(!other_masks.equal(&plain), "dropout is active in training");
}

#[test]
fn the_l2_penalty_is_depth_weighted() {
    let _rng = rng_lock();
    tch::manual_seed(9);
    let mut hypernetwork = Hypernetwork::new(
        &[16],
        HypernetworkStructure::default(),
        HypernetworkInfo::default(),
        Device::Cpu,
    )
    .unwrap();
    hypernetwork
        .set_shallow_penalty(Some(ShallowPenalty {
            level_weights: vec![0.25, 0.5, 1.0],
            l2_strength: 2.0,
            l2_level_weights: vec![1.0, 0.5, 0.25],
        }))
        .unwrap();
    let context = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
    let layer = |level: usize| AttentionLayerInfo {
        name: "l".to_string(),
        query_dim: 16,
        context_dim: 16,
        is_cross_attention: false,
        heads: 1,
        position: UNetBlockPosition::Down(level),
        resolution_level: level,
    };
    let branch_energy = |which: usize| {
        hypernetwork
            .module(16, which)
            .unwrap()
            .branch(&context, false)
            .square()
            .mean(Kind::Float)
            .double_value(&[])
    };
    let energy = branch_energy(0) + branch_energy(1);
    let _ = hypernetwork.transform(&context, &layer(0));
    let _ = hypernetwork.transform(&context, &layer(5));
    let total = hypernetwork.take_l2_penalty().double_value(&[]);
    let expected = 2.0 * (1.0 + 0.25) * energy;
    assert!(
        (total - expected).abs() <= 1e-6 * expected,
        "{total} vs {expected}"
    );
    assert_eq!(hypernetwork.take_l2_penalty().double_value(&[]), 0.0);
}

#[test]
fn invalid_penalty_weights_are_refused() {
    let _rng = rng_lock();
    let mut hypernetwork = Hypernetwork::new(
        &[16],
        HypernetworkStructure::default(),
        HypernetworkInfo::default(),
        Device::Cpu,
    )
    .unwrap();
    let error = hypernetwork
        .set_shallow_penalty(Some(penalty(&[1.5])))
        .unwrap_err();
    assert!(error.to_string().contains("shallow_penalty.level_weights"));
    let error = hypernetwork
        .set_shallow_penalty(Some(penalty(&[])))
        .unwrap_err();
    assert!(error.to_string().contains("level_weights"));
}
