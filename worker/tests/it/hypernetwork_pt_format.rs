//! A1111 `.pt` export and import: the written file loads in PyTorch with
//! `torch.load(weights_only=True)` into A1111-structured modules (strict) and gives the same
//! outputs; the zip holds only the allowed entries, stored; `torch.save` files import and
//! round-trip; foreign pickles are refused.

use std::collections::BTreeMap;
use std::io::Read;

use crate::hypernetwork_fixtures::{fixtures_dir, max_abs_diff, python_check_pt, CASES};
use arbor_worker::attention::{AttentionLayerInfo, KvContextTransform, UNetBlockPosition};
use arbor_worker::hypernetwork::module::{
    HypernetworkActivation, HypernetworkStructure, HypernetworkWeightInit,
};
use arbor_worker::hypernetwork::pt_reader::read_pt;
use arbor_worker::hypernetwork::pt_writer::PtDtype;
use arbor_worker::hypernetwork::restricted_pickle::read_pickle;
use arbor_worker::hypernetwork::{Hypernetwork, HypernetworkChain, HypernetworkInfo};
use arbor_worker::WorkerError;
use tch::{Device, Kind, Tensor};

fn layer(context_dim: i64, resolution_level: usize) -> AttentionLayerInfo {
    AttentionLayerInfo {
        name: "test.attn".to_string(),
        query_dim: context_dim,
        context_dim,
        is_cross_attention: false,
        heads: 1,
        position: UNetBlockPosition::Down(resolution_level),
        resolution_level,
    }
}

/// k and v outputs of every module for `x.<size>` inputs.
fn module_outputs(
    hypernetwork: &Hypernetwork,
    inputs: &[(String, Tensor)],
) -> BTreeMap<String, Tensor> {
    let _guard = tch::no_grad_guard();
    let mut outputs = BTreeMap::new();
    for (name, input) in inputs {
        let size: i64 = name.strip_prefix("x.").unwrap().parse().unwrap();
        let (key, value) = hypernetwork.transform(input, &layer(size, 0));
        outputs.insert(format!("{size}.0"), key);
        outputs.insert(format!("{size}.1"), value);
    }
    outputs
}

fn inputs_for(sizes: &[i64]) -> Vec<(String, Tensor)> {
    tch::manual_seed(11);
    sizes
        .iter()
        .map(|size| {
            (
                format!("x.{size}"),
                Tensor::randn([2, 7, *size], (Kind::Float, Device::Cpu)),
            )
        })
        .collect()
}

fn zip_entries(path: &std::path::Path) -> Vec<(String, zip::CompressionMethod)> {
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..archive.len())
        .map(|index| {
            let entry = archive.by_index(index).unwrap();
            (entry.name().to_string(), entry.compression())
        })
        .collect()
}

#[test]
fn exported_pt_loads_in_torch_weights_only_into_a1111_modules_with_the_same_outputs() {
    let work = tempfile::tempdir().unwrap();
    for case in CASES {
        let hypernetwork =
            Hypernetwork::load_pt(&fixtures_dir().join(format!("{case}.pt")), Device::Cpu).unwrap();
        let exported = work.path().join(format!("{case}-arbor.pt"));
        hypernetwork.save_pt(&exported, PtDtype::Float32).unwrap();

        // Only `<name>/data.pkl`, `<name>/data/N`, `<name>/version`, all stored.
        for (name, compression) in zip_entries(&exported) {
            let (folder, relative) = name.split_once('/').unwrap();
            assert_eq!(folder, format!("{case}-arbor"), "{name}");
            let allowed = relative == "data.pkl"
                || relative == "version"
                || relative
                    .strip_prefix("data/")
                    .is_some_and(|index| index.parse::<u32>().is_ok());
            assert!(allowed, "{case}: zip entry `{name}` is not allowed");
            assert_eq!(compression, zip::CompressionMethod::Stored, "{name}");
        }

        let inputs = inputs_for(&hypernetwork.sizes());
        let (metadata, torch_outputs) = python_check_pt(&exported, &inputs, work.path())
            .unwrap_or_else(|error| panic!("{case}: {error:#}"));
        let ours = module_outputs(&hypernetwork, &inputs);
        assert_eq!(torch_outputs.len(), ours.len());
        for (name, output) in &ours {
            let error = max_abs_diff(output, &torch_outputs[name], name);
            assert!(error <= 1e-5, "{case} module {name}: error {error:e}");
        }
        let structure = hypernetwork.structure();
        assert_eq!(metadata["activation_func"], structure.activation.as_str());
        assert_eq!(metadata["is_layer_norm"], structure.is_layer_norm);
        assert_eq!(metadata["activate_output"], structure.activate_output);
        assert_eq!(metadata["use_dropout"], false, "exported for inference");
        assert_eq!(metadata["step"], 123);
        assert_eq!(metadata["name"], case);
        assert_eq!(metadata["sd_checkpoint"], "0123abcd");
        assert_eq!(metadata["sd_checkpoint_name"], "tiny-sd");
        assert_eq!(metadata["dtypes"], serde_json::json!(["torch.float32"]));
        println!(
            "{case}: torch.load(weights_only=True) ok, keys {}",
            metadata["keys"]
        );
    }
}

#[test]
fn dropout_is_left_out_of_the_export_and_keys_renumbered() {
    let case = "swish_layernorm_dropout_1_15_2_1";
    let file = read_pt(&fixtures_dir().join(format!("{case}.pt"))).unwrap();
    assert!(file.structure.use_dropout());
    let training_keys: Vec<&str> = file.modules[&48][0]
        .iter()
        .map(|(key, _)| key.as_str())
        .collect();
    // Linear, Hardswish, LayerNorm, Dropout, Linear, Hardswish, LayerNorm, Dropout, Linear, LayerNorm
    assert_eq!(
        training_keys,
        [
            "linear.0.weight",
            "linear.0.bias",
            "linear.2.weight",
            "linear.2.bias",
            "linear.4.weight",
            "linear.4.bias",
            "linear.6.weight",
            "linear.6.bias",
            "linear.8.weight",
            "linear.8.bias",
            "linear.9.weight",
            "linear.9.bias"
        ]
    );
    let hypernetwork = Hypernetwork::from_file(&file, Device::Cpu).unwrap();
    let exported = hypernetwork.to_file();
    assert!(!exported.structure.use_dropout());
    let inference_keys: Vec<&str> = exported.modules[&48][0]
        .iter()
        .map(|(key, _)| key.as_str())
        .collect();
    assert_eq!(
        inference_keys,
        [
            "linear.0.weight",
            "linear.0.bias",
            "linear.2.weight",
            "linear.2.bias",
            "linear.3.weight",
            "linear.3.bias",
            "linear.5.weight",
            "linear.5.bias",
            "linear.6.weight",
            "linear.6.bias",
            "linear.7.weight",
            "linear.7.bias"
        ]
    );
    for ((_, trained), (_, inference)) in file.modules[&48][0].iter().zip(&exported.modules[&48][0])
    {
        assert!(trained.equal(inference));
    }
}

#[test]
fn torch_saved_pt_round_trips_through_arbor() {
    let work = tempfile::tempdir().unwrap();
    for case in CASES {
        let original = read_pt(&fixtures_dir().join(format!("{case}.pt"))).unwrap();
        let hypernetwork = Hypernetwork::from_file(&original, Device::Cpu).unwrap();
        let path = work.path().join(format!("{case}.pt"));
        hypernetwork.save_pt(&path, PtDtype::Float32).unwrap();
        let reread = read_pt(&path).unwrap();
        assert_eq!(
            reread.structure,
            original.structure.without_dropout(),
            "{case}"
        );
        assert_eq!(
            (
                reread.step,
                &reread.name,
                &reread.sd_checkpoint,
                &reread.sd_checkpoint_name
            ),
            (
                123,
                &case.to_string(),
                &Some("0123abcd".to_string()),
                &Some("tiny-sd".to_string())
            )
        );
        let reloaded = Hypernetwork::from_file(&reread, Device::Cpu).unwrap();
        let inputs = inputs_for(&hypernetwork.sizes());
        let before = module_outputs(&hypernetwork, &inputs);
        let after = module_outputs(&reloaded, &inputs);
        for (name, output) in &before {
            assert!(
                output.equal(&after[name]),
                "{case} module {name} changed in the round trip"
            );
        }
    }
}

#[test]
fn half_precision_export_loads_in_torch() {
    let work = tempfile::tempdir().unwrap();
    let hypernetwork =
        Hypernetwork::load_pt(&fixtures_dir().join("leakyrelu_121.pt"), Device::Cpu).unwrap();
    let exported = work.path().join("half.pt");
    hypernetwork.save_pt(&exported, PtDtype::Float16).unwrap();
    let inputs = inputs_for(&hypernetwork.sizes());
    let (metadata, torch_outputs) = python_check_pt(&exported, &inputs, work.path()).unwrap();
    assert_eq!(metadata["dtypes"], serde_json::json!(["torch.float16"]));
    let reread = Hypernetwork::load_pt(&exported, Device::Cpu).unwrap();
    for (name, tensor) in reread.inference_entries() {
        assert_eq!(
            tensor.kind(),
            Kind::Float,
            "{name} is widened to f32 on load"
        );
    }
    // torch's modules over the fp16 weights compute what arbor's re-read (widened) modules do,
    // and both stay within fp16 rounding of the fp32 original.
    let reread_outputs = module_outputs(&reread, &inputs);
    let original_outputs = module_outputs(&hypernetwork, &inputs);
    assert_eq!(torch_outputs.len(), reread_outputs.len());
    for (name, output) in &reread_outputs {
        let error = max_abs_diff(output, &torch_outputs[name], name);
        assert!(
            error <= 1e-5,
            "fp16 module {name}: torch vs arbor error {error:e}"
        );
        let rounding = max_abs_diff(output, &original_outputs[name], name);
        assert!(
            rounding <= 1e-2,
            "fp16 module {name}: {rounding:e} from the fp32 original"
        );
    }
}

#[test]
fn a_pickle_with_a_foreign_global_is_refused() {
    let error = read_pt(&fixtures_dir().join("malicious.pt")).unwrap_err();
    let message = error.to_string();
    println!("{message}");
    assert!(matches!(error, WorkerError::Hypernetwork { .. }));
    assert!(
        message.contains("posix.system") && message.contains("not allowed"),
        "{message}"
    );
}

#[test]
fn hand_made_pickles_outside_the_format_are_refused() {
    // GLOBAL builtins.eval
    let eval = b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.";
    assert!(read_pickle(eval)
        .unwrap_err()
        .to_string()
        .contains("builtins.eval"));
    // STACK_GLOBAL of a foreign name
    let stack_global = b"\x80\x04\x8c\x02os\x8c\x06system\x93.";
    assert!(read_pickle(stack_global)
        .unwrap_err()
        .to_string()
        .contains("os.system"));
    // INST (protocol 0 object creation) is not an allowed opcode
    let inst = b"(ios\nsystem\n.";
    assert!(read_pickle(inst)
        .unwrap_err()
        .to_string()
        .contains("opcode 0x69"));
    // REDUCE of an allowed storage type is not a call the format makes
    let storage_call = b"\x80\x02ctorch\nFloatStorage\n)R.";
    assert!(read_pickle(storage_call)
        .unwrap_err()
        .to_string()
        .contains("REDUCE"));
    // truncated input
    assert!(read_pickle(b"\x80\x02X\x10\x00\x00\x00abc")
        .unwrap_err()
        .to_string()
        .contains("truncated"));
    // a tensor reaching past its storage
    let mut out_of_bounds = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQK\x00K\x08\x85K\x01\x85\x89".to_vec();
    out_of_bounds.extend_from_slice(b"ccollections\nOrderedDict\n)RtR.");
    assert!(read_pickle(&out_of_bounds)
        .unwrap_err()
        .to_string()
        .contains("beyond its 4 elements"));
}

#[test]
fn a_truncated_or_foreign_file_is_a_clear_error() {
    let work = tempfile::tempdir().unwrap();
    let not_zip = work.path().join("legacy.pt");
    std::fs::write(&not_zip, b"\x80\x02}q\x00.").unwrap();
    let message = read_pt(&not_zip).unwrap_err().to_string();
    assert!(
        message.contains("legacy.pt") && message.contains("not a zip"),
        "{message}"
    );

    let source = std::fs::read(fixtures_dir().join("leakyrelu_121.pt")).unwrap();
    let truncated = work.path().join("truncated.pt");
    std::fs::write(&truncated, &source[..source.len() / 2]).unwrap();
    assert!(read_pt(&truncated).is_err());

    let missing = work.path().join("missing-storage.pt");
    {
        let mut archive = zip::ZipArchive::new(
            std::fs::File::open(fixtures_dir().join("leakyrelu_121.pt")).unwrap(),
        )
        .unwrap();
        let mut writer = zip::ZipWriter::new(std::fs::File::create(&missing).unwrap());
        for index in 0..archive.len() {
            let mut entry = archive.by_index(index).unwrap();
            if entry.name().ends_with("/data/3") {
                continue;
            }
            let name = entry.name().to_string();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            writer
                .start_file(
                    name,
                    zip::write::FileOptions::default()
                        .compression_method(zip::CompressionMethod::Stored),
                )
                .unwrap();
            std::io::Write::write_all(&mut writer, &bytes).unwrap();
        }
        writer.finish().unwrap();
    }
    let message = read_pt(&missing).unwrap_err().to_string();
    assert!(message.contains("data/3 is missing"), "{message}");
}

#[test]
fn modules_are_picked_by_context_width_and_chain_in_order() {
    let structure = HypernetworkStructure {
        activation: HypernetworkActivation::Tanh,
        weight_init: HypernetworkWeightInit::XavierUniform,
        ..Default::default()
    };
    tch::manual_seed(5);
    let first = Hypernetwork::new(
        &[16, 8],
        structure.clone(),
        HypernetworkInfo::default(),
        Device::Cpu,
    )
    .unwrap();
    let second =
        Hypernetwork::new(&[16], structure, HypernetworkInfo::default(), Device::Cpu).unwrap();
    let _guard = tch::no_grad_guard();
    let context = Tensor::randn([2, 3, 16], (Kind::Float, Device::Cpu));
    let (key, value) = first.transform(&context, &layer(16, 0));
    let expected_key = first.module(16, 0).unwrap().forward(&context, 1.0, false);
    let expected_value = first.module(16, 1).unwrap().forward(&context, 1.0, false);
    assert!(key.equal(&expected_key) && value.equal(&expected_value));
    assert!(!key.equal(&context) && !key.equal(&value));

    // A width without a module passes through.
    let other = Tensor::randn([2, 3, 12], (Kind::Float, Device::Cpu));
    let (key, value) = first.transform(&other, &layer(12, 0));
    assert!(key.equal(&other) && value.equal(&other));

    // Chaining: each k module takes the previous k context, each v module the previous v.
    let chain = HypernetworkChain {
        hypernetworks: vec![&first, &second],
    };
    let (key, value) = chain.transform(&context, &layer(16, 1));
    let expected_key = second
        .module(16, 0)
        .unwrap()
        .forward(&expected_key, 1.0, false);
    let expected_value = second
        .module(16, 1)
        .unwrap()
        .forward(&expected_value, 1.0, false);
    assert!(key.equal(&expected_key) && value.equal(&expected_value));

    // The multiplier scales f(x).
    let mut scaled = Hypernetwork::new(
        &[16],
        HypernetworkStructure::default(),
        HypernetworkInfo::default(),
        Device::Cpu,
    )
    .unwrap();
    let (unscaled_key, _) = scaled.transform(&context, &layer(16, 0));
    scaled.multiplier = 0.5;
    let (half_key, _) = scaled.transform(&context, &layer(16, 0));
    let expected = &context + (&unscaled_key - &context) * 0.5;
    assert!(max_abs_diff(&half_key, &expected, "multiplier") < 1e-6);
}

#[test]
fn default_init_is_normal_001_with_zero_bias() {
    tch::manual_seed(3);
    let hypernetwork = Hypernetwork::new(
        &[768],
        HypernetworkStructure::default(),
        HypernetworkInfo::default(),
        Device::Cpu,
    )
    .unwrap();
    let file = hypernetwork.to_file();
    let keys: Vec<&str> = file.modules[&768][0]
        .iter()
        .map(|(key, _)| key.as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "linear.0.weight",
            "linear.0.bias",
            "linear.1.weight",
            "linear.1.bias"
        ]
    );
    let weight = &file.modules[&768][0][0].1;
    assert_eq!(weight.size(), [1536, 768]);
    let std = weight.std(true).double_value(&[]);
    assert!((std - 0.01).abs() < 0.0005, "std {std}");
    assert_eq!(
        file.modules[&768][0][1].1.abs().max().double_value(&[]),
        0.0
    );
}
