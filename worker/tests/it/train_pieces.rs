//! The training pieces against references: AdamW vs `torch.optim.AdamW`, gradient clipping vs
//! `torch.nn.utils.clip_grad_norm_`, EMA vs diffusers' `EMAModel`, LR schedules vs diffusers'
//! schedulers and AUTOMATIC1111's learn schedule, the sample grid vs diffusers'
//! `VaeImageProcessor`, and properties of caption augmentation, the metrics log and the loss
//! curve. Goldens come from `tests/fixtures/make_train_fixtures.py`, run once per script version
//! with the project's virtualenv (`ARBOR_PYTHON_BIN`, default `.venv/bin/python`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use serde_json::Value;
use tch::{Kind, Tensor};

use arbor_common::config::LrScheduler;
use arbor_worker::train::adamw::{AdamW, AdamWConfig};
use arbor_worker::train::caption_augment::CaptionAugment;
use arbor_worker::train::ema::Ema;
use arbor_worker::train::grad_clip::clip_grad_norm;
use arbor_worker::train::loss_curve::render_loss_curve;
use arbor_worker::train::lr_schedule::LrSchedule;
use arbor_worker::train::metrics_log::{MetricsLog, StepMetrics, TokenLengthHistogram};
use arbor_worker::train::phase_clock::PhaseSeconds;
use arbor_worker::train::run_dir::RunDir;
use arbor_worker::train::sample_grid::images_to_grid_png;

use crate::model_fixtures::{get, read_tensors, script_fixtures};

// ---------------------------------------------------------------------------------------------
// Fixtures

fn fixtures_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        script_fixtures("make_train_fixtures.py", &[], "train-pieces-fixtures")
            .expect("building the training-piece fixtures")
    })
}

fn tensors(name: &str) -> HashMap<String, Tensor> {
    read_tensors(&fixtures_dir().join(name)).unwrap_or_else(|error| panic!("{error:#}"))
}

fn json(name: &str) -> Value {
    let path = fixtures_dir().join(name);
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// max|actual − expected| / max(max|expected|, 1e-12).
fn relative_error(actual: &Tensor, expected: &Tensor, name: &str) -> f64 {
    assert_eq!(actual.size(), expected.size(), "shape of {name}");
    let expected = expected.to_kind(Kind::Double);
    let difference = (actual.to_kind(Kind::Double) - &expected)
        .abs()
        .max()
        .double_value(&[]);
    difference / expected.abs().max().double_value(&[]).max(1e-12)
}

fn assert_close(actual: &Tensor, expected: &Tensor, tolerance: f64, name: &str) {
    let error = relative_error(actual, expected, name);
    assert!(
        error <= tolerance,
        "{name}: relative error {error:e} > {tolerance:e}"
    );
}

fn leaf(value: &Tensor) -> Tensor {
    value.detach().copy().set_requires_grad(true)
}

/// Makes each parameter's gradient exactly `gradients[i]` (added to what is there), through a
/// backward pass of Σ parameter·gradient.
fn set_gradients(pairs: &[(&Tensor, &Tensor)]) {
    let loss = pairs
        .iter()
        .map(|(parameter, gradient)| (*parameter * *gradient).sum(Kind::Float))
        .reduce(|total, term| total + term)
        .expect("at least one gradient");
    loss.backward();
}

const ADAMW_TOLERANCE: f64 = 1e-6;

// ---------------------------------------------------------------------------------------------
// AdamW

/// Both kernels are checked against the same torch goldens (torch's single-tensor path): the
/// fused one differs from it only in rounding.
const KERNELS: [(&str, bool); 2] = [("single-tensor", false), ("fused", true)];

fn adamw_config(case: &Value, fused: bool) -> AdamWConfig {
    AdamWConfig {
        beta1: case["beta1"].as_f64().unwrap(),
        beta2: case["beta2"].as_f64().unwrap(),
        eps: case["eps"].as_f64().unwrap(),
        weight_decay: case["weight_decay"].as_f64().unwrap(),
        fused,
    }
}

/// Runs steps `from..to` of `case` on `optimizer`, checking parameters and moments after each.
fn run_adamw_steps(
    optimizer: &mut AdamW,
    goldens: &HashMap<String, Tensor>,
    case_name: &str,
    case: &Value,
    steps: std::ops::Range<usize>,
) {
    let lrs: Vec<f64> = case["lrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|lr| lr.as_f64().unwrap())
        .collect();
    for step in steps {
        optimizer.zero_grad().unwrap();
        let parameters: Vec<(String, Tensor)> = optimizer
            .parameters()
            .iter()
            .map(|(name, tensor)| (name.clone(), tensor.shallow_clone()))
            .collect();
        let pairs: Vec<(&Tensor, &Tensor)> = parameters
            .iter()
            .filter_map(|(name, parameter)| {
                goldens
                    .get(&format!("{case_name}.grad.{step}.{name}"))
                    .map(|gradient| (parameter, gradient))
            })
            .collect();
        set_gradients(&pairs);
        optimizer.step(lrs[step]).unwrap();
        let state: HashMap<String, Tensor> = optimizer.state_tensors().into_iter().collect();
        for (name, parameter) in &parameters {
            let fused = optimizer.config().fused;
            let label = format!("{case_name} (fused {fused}) step {step} `{name}`");
            assert_close(
                parameter,
                get(goldens, &format!("{case_name}.after.{step}.{name}")),
                ADAMW_TOLERANCE,
                &label,
            );
            if let Some(expected) = goldens.get(&format!("{case_name}.exp_avg.{step}.{name}")) {
                assert_close(
                    get(&state, &format!("{name}.exp_avg")),
                    expected,
                    ADAMW_TOLERANCE,
                    &format!("{label} exp_avg"),
                );
                assert_close(
                    get(&state, &format!("{name}.exp_avg_sq")),
                    get(goldens, &format!("{case_name}.exp_avg_sq.{step}.{name}")),
                    ADAMW_TOLERANCE,
                    &format!("{label} exp_avg_sq"),
                );
            }
        }
    }
}

fn adamw_for_case(
    goldens: &HashMap<String, Tensor>,
    case_name: &str,
    case: &Value,
    fused: bool,
) -> (AdamW, Vec<String>) {
    let names: Vec<String> = case["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|name| name.as_str().unwrap().to_string())
        .collect();
    let parameters = names
        .iter()
        .map(|name| {
            (
                name.clone(),
                leaf(get(goldens, &format!("{case_name}.init.{name}"))),
            )
        })
        .collect();
    (AdamW::new(parameters, adamw_config(case, fused)), names)
}

#[test]
fn adamw_matches_torch_over_five_steps_with_varied_decay_and_rates() {
    let goldens = tensors("adamw.safetensors");
    let cases = json("adamw.json");
    let cases = cases.as_object().unwrap();
    assert!(cases.len() >= 4);
    for (case_name, case) in cases {
        for (_, fused) in KERNELS {
            let (mut optimizer, _) = adamw_for_case(&goldens, case_name, case, fused);
            run_adamw_steps(&mut optimizer, &goldens, case_name, case, 0..5);
            assert_eq!(optimizer.step_count(), 5);
        }
    }
}

#[test]
fn adamw_skips_a_parameter_without_gradient_and_its_step_count_lags_like_torch() {
    let goldens = tensors("adamw.safetensors");
    let cases = json("adamw.json");
    let case = &cases["skipped_parameter"];
    for (kernel, fused) in KERNELS {
        let (mut optimizer, _) = adamw_for_case(&goldens, "skipped_parameter", case, fused);
        run_adamw_steps(&mut optimizer, &goldens, "skipped_parameter", case, 0..2);
        let initial_bias = get(&goldens, "skipped_parameter.init.bias");
        let bias = &optimizer.parameters()[1];
        assert_eq!(bias.0, "bias");
        assert_eq!(
            relative_error(&bias.1, initial_bias, "bias"),
            0.0,
            "{kernel}"
        );
        let state: HashMap<String, Tensor> = optimizer.state_tensors().into_iter().collect();
        assert_eq!(get(&state, "bias.step").int64_value(&[]), 0, "{kernel}");
        assert!(!state.contains_key("weight.step"), "{kernel}");
    }
}

#[test]
fn adamw_resumed_from_its_state_continues_exactly() {
    let goldens = tensors("adamw.safetensors");
    let cases = json("adamw.json");
    for (case_name, (_, fused)) in ["defaults", "skipped_parameter"]
        .into_iter()
        .flat_map(|case_name| KERNELS.map(|kernel| (case_name, kernel)))
    {
        let case = &cases[case_name];
        let (mut optimizer, names) = adamw_for_case(&goldens, case_name, case, fused);
        run_adamw_steps(&mut optimizer, &goldens, case_name, case, 0..3);
        let saved: HashMap<String, Tensor> = optimizer.state_tensors().into_iter().collect();
        let parameters: Vec<(String, Tensor)> = names
            .iter()
            .zip(optimizer.parameters())
            .map(|(name, (_, tensor))| (name.clone(), leaf(tensor)))
            .collect();
        drop(optimizer);
        let mut resumed = AdamW::new(parameters, adamw_config(case, fused));
        resumed.load_state(&saved, 3).unwrap();
        assert_eq!(resumed.step_count(), 3);
        run_adamw_steps(&mut resumed, &goldens, case_name, case, 3..5);
    }
}

#[test]
fn adamw_load_state_names_a_missing_or_misshapen_tensor_and_changes_nothing() {
    let goldens = tensors("adamw.safetensors");
    let cases = json("adamw.json");
    let (mut optimizer, _) = adamw_for_case(&goldens, "defaults", &cases["defaults"], true);
    let mut state: HashMap<String, Tensor> = optimizer.state_tensors().into_iter().collect();
    state.remove("conv.exp_avg_sq");
    let error = optimizer.load_state(&state, 9).unwrap_err().to_string();
    assert!(error.contains("conv.exp_avg_sq"), "{error}");
    state.insert(
        "conv.exp_avg_sq".into(),
        Tensor::zeros([2, 3], (Kind::Float, tch::Device::Cpu)),
    );
    let error = optimizer.load_state(&state, 9).unwrap_err().to_string();
    assert!(
        error.contains("conv.exp_avg_sq") && error.contains("[2, 3]"),
        "{error}"
    );
    assert_eq!(optimizer.step_count(), 0);
    assert!(optimizer.step(f64::NAN).is_err());
}

// ---------------------------------------------------------------------------------------------
// Gradient clipping

#[test]
fn clip_grad_norm_matches_torch() {
    let goldens = tensors("clip.safetensors");
    let cases = json("clip.json");
    for (case_name, case) in cases.as_object().unwrap() {
        let count = case["parameters"].as_u64().unwrap() as usize;
        let parameters: Vec<Tensor> = (0..count)
            .map(|index| {
                let shape = goldens
                    .get(&format!("{case_name}.grad.{index}"))
                    .map(Tensor::size)
                    .unwrap_or_else(|| vec![3]);
                Tensor::zeros(shape, (Kind::Float, tch::Device::Cpu)).set_requires_grad(true)
            })
            .collect();
        let pairs: Vec<(&Tensor, &Tensor)> = parameters
            .iter()
            .enumerate()
            .filter_map(|(index, parameter)| {
                goldens
                    .get(&format!("{case_name}.grad.{index}"))
                    .map(|gradient| (parameter, gradient))
            })
            .collect();
        set_gradients(&pairs);
        let total = clip_grad_norm(&parameters, case["max_norm"].as_f64().unwrap()).unwrap();
        let expected = case["total_norm"].as_f64().unwrap();
        assert!(
            ((total - expected) / expected).abs() < 1e-6,
            "{case_name}: total norm {total} vs torch {expected}"
        );
        for (index, parameter) in parameters.iter().enumerate() {
            match goldens.get(&format!("{case_name}.clipped.{index}")) {
                Some(expected) => assert_close(
                    &parameter.grad(),
                    expected,
                    1e-6,
                    &format!("{case_name} grad {index}"),
                ),
                None => assert!(!parameter.grad().defined(), "{case_name} grad {index}"),
            }
        }
    }
}

#[test]
fn clip_grad_norm_with_max_norm_zero_only_measures() {
    let goldens = tensors("clip.safetensors");
    let gradient = get(&goldens, "clipped.grad.0");
    let parameter =
        Tensor::zeros(gradient.size(), (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    set_gradients(&[(&parameter, gradient)]);
    let total = clip_grad_norm(std::slice::from_ref(&parameter), 0.0).unwrap();
    let expected = gradient.norm().double_value(&[]);
    assert!((total - expected).abs() <= 1e-6 * expected);
    assert_eq!(relative_error(&parameter.grad(), gradient, "grad"), 0.0);
    assert_eq!(clip_grad_norm(&[], 1.0).unwrap(), 0.0);
}

// ---------------------------------------------------------------------------------------------
// EMA

#[test]
fn ema_matches_diffusers_ema_model() {
    let goldens = tensors("ema.safetensors");
    let cases = json("ema.json");
    for (case_name, case) in cases.as_object().unwrap() {
        let names: Vec<&str> = case["names"]
            .as_array()
            .unwrap()
            .iter()
            .map(|name| name.as_str().unwrap())
            .collect();
        let frozen: Vec<&str> = case["frozen"]
            .as_array()
            .unwrap()
            .iter()
            .map(|name| name.as_str().unwrap())
            .collect();
        let parameters: Vec<(String, Tensor)> = names
            .iter()
            .map(|name| {
                let initial = get(&goldens, &format!("{case_name}.param.0.{name}"));
                let tensor = initial.detach().copy();
                let tensor = if frozen.contains(name) {
                    tensor
                } else {
                    tensor.set_requires_grad(true)
                };
                (name.to_string(), tensor)
            })
            .collect();
        let mut ema = Ema::new(&parameters, case["decay"].as_f64().unwrap());
        let steps = case["steps"].as_u64().unwrap();
        for step in 0..=steps {
            if step > 0 {
                tch::no_grad(|| {
                    for (name, parameter) in &parameters {
                        let mut parameter = parameter.shallow_clone();
                        parameter.copy_(get(&goldens, &format!("{case_name}.param.{step}.{name}")));
                    }
                });
                ema.update(&parameters).unwrap();
            }
            assert_eq!(ema.update_count(), step);
            for (name, shadow) in ema.shadow() {
                assert_close(
                    shadow,
                    get(&goldens, &format!("{case_name}.shadow.{step}.{name}")),
                    1e-6,
                    &format!("{case_name} update {step} `{name}`"),
                );
            }
        }
    }
}

#[test]
fn ema_state_round_trips_and_a_missing_tensor_is_named() {
    let parameters = vec![
        (
            "a".to_string(),
            Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
        ),
        (
            "b".to_string(),
            Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true),
        ),
    ];
    let mut ema = Ema::new(&parameters, 0.9);
    ema.update(&parameters).unwrap();
    let saved: HashMap<String, Tensor> = ema.state_tensors().into_iter().collect();
    let mut restored = Ema::new(&parameters, 0.9);
    restored.load_state(&saved, 1).unwrap();
    assert_eq!(restored.update_count(), 1);
    assert_eq!(restored.decay_for_update(2), 2.0 / 11.0);
    let mut partial = saved;
    partial.remove("b");
    let error = restored.load_state(&partial, 5).unwrap_err().to_string();
    assert!(error.contains("`b`"), "{error}");
    assert_eq!(restored.update_count(), 1);
    let error = restored.update(&parameters[..1]).unwrap_err().to_string();
    assert!(error.contains("1 parameters"), "{error}");
}

// ---------------------------------------------------------------------------------------------
// LR schedules

#[test]
fn constant_and_cosine_schedules_match_diffusers() {
    let schedules = json("schedules.json");
    for case in schedules["diffusers"].as_array().unwrap() {
        let kind: LrScheduler = case["kind"].as_str().unwrap().parse().unwrap();
        let rate = case["lr"].as_f64().unwrap();
        let schedule = LrSchedule::from_config(
            &rate.to_string(),
            kind,
            case["warmup"].as_u64().unwrap(),
            case["total"].as_u64().unwrap(),
        )
        .unwrap();
        assert_eq!(schedule.final_step(), None);
        for (step, expected) in case["rates"].as_array().unwrap().iter().enumerate() {
            let expected = expected.as_f64().unwrap();
            let actual = schedule.learning_rate(step as u64);
            assert!(
                (actual - expected).abs() <= 1e-12 * rate,
                "{kind} {case}: step {step}: {actual} vs diffusers {expected}"
            );
        }
    }
}

#[test]
fn a1111_schedules_match_learn_schedule_rates_and_end_of_training() {
    let schedules = json("schedules.json");
    for case in schedules["a1111"].as_array().unwrap() {
        let text = case["lr"].as_str().unwrap();
        let max_steps = case["max_steps"].as_u64().unwrap();
        let schedule = LrSchedule::from_config(text, LrScheduler::Constant, 0, max_steps).unwrap();
        let rates = case["rates"].as_array().unwrap();
        for (step, expected) in rates.iter().enumerate() {
            let expected = expected.as_f64().unwrap();
            assert_eq!(
                schedule.learning_rate(step as u64),
                expected,
                "`{text}` step {step}"
            );
        }
        match case["finished_at"].as_u64() {
            Some(end) => assert_eq!(schedule.final_step(), Some(end), "`{text}`"),
            None => assert!(
                schedule.final_step().is_none_or(|end| end >= max_steps),
                "`{text}`: {:?}",
                schedule.final_step()
            ),
        }
    }
}

#[test]
fn a1111_schedule_with_warmup_ramps_the_first_entry() {
    let schedule =
        LrSchedule::from_config("0.01:10, 0.001", LrScheduler::Constant, 4, 100).unwrap();
    let rates: Vec<f64> = (0..12).map(|step| schedule.learning_rate(step)).collect();
    assert_eq!(&rates[..4], &[0.0, 0.0025, 0.005, 0.0075]);
    assert_eq!(rates[4], 0.01);
    assert_eq!(rates[11], 0.001);
}

#[test]
fn malformed_schedules_are_errors_naming_the_bad_entry() {
    let cases = [
        ("0.001:abc, 1e-5", "0.001:abc"),
        ("0.01:10, fast:20", "fast:20"),
        ("0.01:10:20", "0.01:10:20"),
        ("0.01:10, 0.001:5", "0.001:5"),
        ("0.01, 0.001:50", "0.001:50"),
        ("0.01:0", "0.01:0"),
        ("-0.5", "-0.5"),
        ("0.1:1.5", "0.1:1.5"),
        ("nan", "nan"),
        (" , ", "no rate"),
        ("", "rate `` is not a number"),
    ];
    for (text, expected) in cases {
        let error = LrSchedule::from_config(text, LrScheduler::Constant, 0, 100)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("train.lr") && error.contains(expected),
            "`{text}`: {error}"
        );
    }
    let error = "linear".parse::<LrScheduler>().unwrap_err().to_string();
    assert!(
        error.contains("train.lr_scheduler") && error.contains("linear"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------
// Caption augmentation

fn augment(shuffle: bool, keep_tokens: u32, tag_dropout: f64) -> CaptionAugment {
    CaptionAugment {
        shuffle,
        keep_tokens,
        tag_dropout,
        caption_dropout: 0.0,
    }
}

#[test]
fn caption_dropout_empties_that_fraction_of_captions_and_replays_exactly() {
    let augmenter = CaptionAugment {
        caption_dropout: 0.25,
        ..augment(true, 1, 0.0)
    };
    let items = 4000u64;
    let results: Vec<String> = (0..items)
        .map(|item| augmenter.apply(CAPTION, 42, 1, item))
        .collect();
    let dropped = results.iter().filter(|caption| caption.is_empty()).count();
    let fraction = dropped as f64 / items as f64;
    // Binomial(4000, 0.25): standard deviation 0.0068; 0.03 is over four of them.
    assert!(
        (fraction - 0.25).abs() < 0.03,
        "dropped fraction {fraction}"
    );
    for (item, result) in results.iter().enumerate().take(200) {
        assert_eq!(
            &augmenter.apply(CAPTION, 42, 1, item as u64),
            result,
            "item {item} does not replay"
        );
    }
    // Another epoch drops other items.
    let next_epoch: Vec<bool> = (0..items)
        .map(|item| augmenter.apply(CAPTION, 42, 2, item).is_empty())
        .collect();
    let same = results
        .iter()
        .zip(&next_epoch)
        .filter(|(caption, dropped)| caption.is_empty() == **dropped)
        .count();
    assert!(same < items as usize * 9 / 10, "epochs drop the same items");
    // Off, nothing is dropped.
    let off = augment(true, 1, 0.0);
    for item in 0..200 {
        let caption = off.apply(CAPTION, 42, 1, item);
        assert!(!caption.is_empty());
    }
    let all = CaptionAugment {
        caption_dropout: 1.0,
        ..augment(false, 0, 0.0)
    };
    assert_eq!(all.apply(CAPTION, 1, 1, 1), "");
}

fn tags(caption: &str) -> Vec<&str> {
    caption.split(", ").filter(|tag| !tag.is_empty()).collect()
}

const CAPTION: &str =
    "1girl, solo ,long hair,, smile, blue eyes, outdoors, sky, cloud, tree, dress";

#[test]
fn caption_shuffle_keeps_the_leading_tags_and_the_multiset() {
    let augmenter = augment(true, 2, 0.0);
    let mut orders = std::collections::HashSet::new();
    let mut expected: Vec<&str> = CAPTION
        .split(',')
        .map(str::trim)
        .filter(|tag| !tag.is_empty())
        .collect();
    expected.sort();
    for item in 0..50 {
        let result = augmenter.apply(CAPTION, 7, 0, item);
        let result_tags = tags(&result);
        assert_eq!(&result_tags[..2], &["1girl", "solo"], "{result}");
        let mut sorted = result_tags.clone();
        sorted.sort();
        assert_eq!(sorted, expected, "{result}");
        orders.insert(result);
    }
    assert!(orders.len() > 40, "only {} distinct orders", orders.len());
}

#[test]
fn caption_augmentation_is_deterministic_per_seed_epoch_and_item() {
    let augmenter = augment(true, 1, 0.3);
    let first = augmenter.apply(CAPTION, 42, 3, 1234);
    assert_eq!(augmenter.apply(CAPTION, 42, 3, 1234), first);
    let varied = [
        augmenter.apply(CAPTION, 43, 3, 1234),
        augmenter.apply(CAPTION, 42, 4, 1234),
        augmenter.apply(CAPTION, 42, 3, 1235),
    ];
    let differing = varied.iter().filter(|other| **other != first).count();
    assert!(differing >= 2, "{first:?} vs {varied:?}");
}

#[test]
fn caption_tag_dropout_rate_is_near_p_and_kept_tags_never_drop() {
    let caption: String = (0..20)
        .map(|index| format!("tag{index}"))
        .collect::<Vec<_>>()
        .join(",");
    for probability in [0.1, 0.5] {
        let augmenter = augment(false, 3, probability);
        let mut dropped = 0usize;
        let mut droppable = 0usize;
        for item in 0..500 {
            let result = augmenter.apply(&caption, 1, 0, item);
            let result_tags = tags(&result);
            assert_eq!(&result_tags[..3], &["tag0", "tag1", "tag2"]);
            // Without shuffle the survivors keep their order.
            let indices: Vec<usize> = result_tags
                .iter()
                .map(|tag| tag[3..].parse().unwrap())
                .collect();
            assert!(indices.windows(2).all(|pair| pair[0] < pair[1]), "{result}");
            droppable += 17;
            dropped += 20 - result_tags.len();
        }
        let rate = dropped as f64 / droppable as f64;
        // 8500 Bernoulli trials: 5 standard deviations is < 0.03.
        assert!(
            (rate - probability).abs() < 0.03,
            "p {probability}: dropped {rate}"
        );
    }
}

#[test]
fn caption_edge_cases_empty_single_tag_and_no_augmentation() {
    let augmenter = augment(true, 1, 0.5);
    assert_eq!(augmenter.apply("", 1, 2, 3), "");
    assert_eq!(augmenter.apply(" , ,", 1, 2, 3), "");
    assert_eq!(
        augmenter.apply("  a photo of a cat  ", 1, 2, 3),
        "a photo of a cat"
    );
    let plain = augment(false, 0, 0.0);
    assert_eq!(plain.apply(" a,b ,, c ", 1, 2, 3), "a, b, c");
    let all_kept = augment(true, 10, 1.0);
    assert_eq!(all_kept.apply("x, y, z", 5, 5, 5), "x, y, z");
    let all_dropped = augment(true, 1, 1.0);
    assert_eq!(all_dropped.apply("x, y, z", 5, 5, 5), "x");
    let data: arbor_common::config::DataSection = serde_json::from_value(serde_json::json!({
        "manifest": "m.jsonl", "tag_shuffle": false, "keep_tokens": 2, "tag_dropout": 0.25
    }))
    .unwrap();
    assert_eq!(CaptionAugment::from_config(&data), augment(false, 2, 0.25));
}

// ---------------------------------------------------------------------------------------------
// Metrics log

fn record(step: u64, loss: f64) -> StepMetrics {
    let mut histogram = TokenLengthHistogram::default();
    for count in [3, 75, 76, 150, 151, 225, 226, 400] {
        histogram.record(count);
    }
    StepMetrics {
        step,
        epoch: step / 10,
        batch: step % 10,
        rank: 0,
        world_size: 2,
        generation: 1,
        loss,
        lr: 1e-4,
        grad_norm: 0.5,
        images_per_second: 12.5,
        data_wait_fraction: 0.01,
        token_length_histogram: histogram,
        failed_items: 0,
        bucket: "512x768".into(),
        unix_time: 1.7e9 + step as f64,
        // Every other record carries the timed phases and the peak memory.
        phase_seconds: (step % 2 == 0).then_some(PhaseSeconds {
            data_wait: 0.01,
            encode: 0.1,
            forward: 0.2,
            backward: 0.4,
            all_reduce: 0.05,
            optimizer: 0.03,
        }),
        peak_memory_bytes: (step % 2 == 0).then_some(40 << 30),
        // Every fifth record carries a validation loss.
        validation_loss: (step % 5 == 0).then_some(loss + 0.125),
    }
}

#[test]
fn token_length_histogram_bins_by_clip_chunks() {
    let histogram = record(1, 0.0).token_length_histogram;
    assert_eq!(histogram.total(), 8);
    assert_eq!(
        (
            histogram.up_to_75,
            histogram.from_76_to_150,
            histogram.from_151_to_225,
            histogram.over_225_truncated
        ),
        (2, 2, 2, 2)
    );
}

#[test]
fn metrics_log_round_trips_and_a_resume_drops_the_rolled_back_stretch() {
    let folder = tempfile::tempdir().unwrap();
    let run_dir = RunDir::open(folder.path().to_str().unwrap()).unwrap();
    let mut log = MetricsLog::open(&run_dir, 0).unwrap();
    for step in 1..=8 {
        log.append(record(step, 1.0 / step as f64)).unwrap();
    }
    log.flush().unwrap();
    let text = std::fs::read_to_string(folder.path().join("metrics.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 8);
    let parsed: StepMetrics = serde_json::from_str(text.lines().nth(2).unwrap()).unwrap();
    assert_eq!(parsed, record(3, 1.0 / 3.0));
    // The timed phases and the peak memory appear only where they were measured.
    let untimed: serde_json::Value = serde_json::from_str(text.lines().nth(2).unwrap()).unwrap();
    assert!(untimed.get("phase_seconds").is_none(), "{untimed}");
    assert!(untimed.get("peak_memory_bytes").is_none(), "{untimed}");
    let timed: serde_json::Value = serde_json::from_str(text.lines().nth(3).unwrap()).unwrap();
    assert_eq!(timed["phase_seconds"]["backward"], 0.4, "{timed}");
    assert_eq!(timed["peak_memory_bytes"], 40u64 << 30, "{timed}");
    assert_eq!(
        serde_json::from_value::<StepMetrics>(timed).unwrap(),
        record(4, 0.25)
    );

    // Resumed from the checkpoint at step 5: steps 6..8 are redone.
    let mut resumed = MetricsLog::open(&run_dir, 5).unwrap();
    assert_eq!(
        resumed
            .loss_history()
            .iter()
            .map(|point| point.0)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    resumed.append(record(6, 0.123)).unwrap();
    resumed.flush().unwrap();
    let reopened = MetricsLog::open(&run_dir, u64::MAX).unwrap();
    assert_eq!(reopened.loss_history().len(), 6);
    assert_eq!(reopened.loss_history()[5], (6, 0.123));
    assert_eq!(reopened.records().nth(5).unwrap(), &record(6, 0.123));
}

#[test]
fn metrics_log_keeps_a_line_that_does_not_parse() {
    let folder = tempfile::tempdir().unwrap();
    let run_dir = RunDir::open(folder.path().to_str().unwrap()).unwrap();
    let good = serde_json::to_string(&record(1, 0.5)).unwrap();
    std::fs::write(
        folder.path().join("metrics.jsonl"),
        format!("{good}\n{{\"step\": 2, \"truncated\n"),
    )
    .unwrap();
    let mut log = MetricsLog::open(&run_dir, 10).unwrap();
    assert_eq!(log.unparsed_lines(), 1);
    assert_eq!(log.loss_history(), vec![(1, 0.5)]);
    log.append(record(2, 0.25)).unwrap();
    log.flush().unwrap();
    let text = std::fs::read_to_string(folder.path().join("metrics.jsonl")).unwrap();
    assert_eq!(text.lines().count(), 3);
    assert!(text.contains("\"truncated"));
    let mut bad = record(3, 0.1);
    bad.bucket = "wide".into();
    let error = log.append(bad).unwrap_err().to_string();
    assert!(
        error.contains("bucket") && error.contains("wide"),
        "{error}"
    );
}

// ---------------------------------------------------------------------------------------------
// Loss curve

fn decode_png(bytes: &[u8]) -> image::RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .expect("a valid png")
        .to_rgb8()
}

#[test]
fn loss_curve_of_no_or_one_point_still_renders() {
    for points in [vec![], vec![(5u64, 0.3)], vec![(1, f64::NAN)]] {
        let image = decode_png(&render_loss_curve(&points, 200, 100).unwrap());
        assert_eq!(image.dimensions(), (200, 100));
    }
    assert!(render_loss_curve(&[(1, 0.1)], 0, 100).is_err());
}

// ---------------------------------------------------------------------------------------------
// Sample grid

#[test]
fn grid_pixels_match_diffusers_postprocess() {
    let goldens = tensors("grid.safetensors");
    let images = get(&goldens, "images");
    let pixels = get(&goldens, "pixels");
    let (count, height, width) = (3usize, 4u32, 5u32);
    let grid = decode_png(&images_to_grid_png(images, 2).unwrap());
    assert_eq!(grid.dimensions(), (2 * width, 2 * height));
    for index in 0..count {
        let (row, column) = ((index / 2) as u32, (index % 2) as u32);
        for y in 0..height {
            for x in 0..width {
                let expected: Vec<u8> = (0..3)
                    .map(|channel| {
                        pixels.int64_value(&[index as i64, y as i64, x as i64, channel]) as u8
                    })
                    .collect();
                let actual = grid.get_pixel(column * width + x, row * height + y).0;
                assert_eq!(actual.to_vec(), expected, "image {index} at ({x}, {y})");
            }
        }
    }
    // The fourth cell of the 2x2 grid is empty, black.
    assert!((0..height)
        .all(|y| (0..width).all(|x| grid.get_pixel(width + x, height + y).0 == [0, 0, 0])));
    // One row when there are fewer images than columns; other kinds convert too.
    let wide = decode_png(&images_to_grid_png(&images.to_kind(Kind::Double), 8).unwrap());
    assert_eq!(wide.dimensions(), (3 * width, height));
    assert_eq!(wide.get_pixel(2, 0).0[0], 255);
    assert_eq!(wide.get_pixel(1, 0).0[0], 128);
}

#[test]
fn grid_rejects_bad_shapes_and_zero_columns() {
    let images = Tensor::zeros([2, 3, 4, 4], (Kind::Float, tch::Device::Cpu));
    assert!(images_to_grid_png(&images, 0)
        .unwrap_err()
        .to_string()
        .contains("columns"));
    let gray = Tensor::zeros([2, 1, 4, 4], (Kind::Float, tch::Device::Cpu));
    let error = images_to_grid_png(&gray, 2).unwrap_err().to_string();
    assert!(error.contains("[2, 1, 4, 4]"), "{error}");
    let flat = Tensor::zeros([3, 4, 4], (Kind::Float, tch::Device::Cpu));
    assert!(images_to_grid_png(&flat, 2).is_err());
}
