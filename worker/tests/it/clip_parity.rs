//! The CLIP text encoder matches transformers' CLIPTextModel: last_hidden_state (clip skip 1),
//! the penultimate layer with final_layer_norm (clip skip 2), and chunked long prompts.

use crate::model_fixtures::{assert_close, fixtures_dir, get, goldens, inputs};
use arbor_worker::clip::ClipTextModel;
use arbor_worker::model_components::ModelComponents;
use arbor_worker::prompt::{PromptFraming, PromptLayout};
use arbor_worker::tokenizer::ClipTokenizer;
use arbor_worker::weights::Component;
use tch::{nn, Device, Tensor};

fn text_encoder() -> (nn::VarStore, ClipTextModel) {
    ModelComponents::open(
        &fixtures_dir().join("model"),
        None,
        &[Component::TextEncoder],
        Device::Cpu,
    )
    .expect("open")
    .text_encoder()
    .expect("text encoder loads")
}

#[test]
fn clip_skip_1_and_2_match_transformers() {
    let (_vs, clip) = text_encoder();
    let inputs = inputs();
    let goldens = goldens();
    let ids = get(&inputs, "clip.input_ids");
    tch::no_grad(|| {
        assert_close(
            &clip.encode(ids, 1).unwrap(),
            get(&goldens, "clip.last_hidden_state"),
            "clip.last_hidden_state",
        );
        assert_close(
            &clip.encode(ids, 2).unwrap(),
            get(&goldens, "clip.penultimate_ln"),
            "clip.penultimate_ln",
        );
    });
    let skip1 = tch::no_grad(|| clip.encode(ids, 1).unwrap());
    let skip2 = tch::no_grad(|| clip.encode(ids, 2).unwrap());
    assert!(
        crate::model_fixtures::max_abs_diff(&skip1, &skip2, "skip") > 1e-2,
        "clip skip changes the output"
    );
}

#[test]
fn chunked_long_prompts_match_per_chunk_encoding() {
    let (_vs, clip) = text_encoder();
    let inputs = inputs();
    let ids = get(&inputs, "clip.chunked_input_ids");
    assert_eq!(ids.size()[1], 154, "the fixture has two chunks");
    let output = tch::no_grad(|| clip.encode_chunked(ids, 2, PromptLayout::Chunked).unwrap());
    assert_close(
        &output,
        get(&goldens(), "clip.chunked_penultimate_ln"),
        "clip.chunked_penultimate_ln",
    );
    let kohya = tch::no_grad(|| clip.encode_chunked(ids, 2, PromptLayout::Kohya).unwrap());
    assert_eq!(kohya.size(), [2, 152, 48]);
}

#[test]
fn our_framing_of_the_fixture_prompts_reproduces_the_golden_ids() {
    // The fixture's chunked ids were framed in Python; frame the same prompts here.
    let tokenizer =
        ClipTokenizer::from_model_dir(&fixtures_dir().join("model")).expect("tokenizer");
    let framing = PromptFraming::for_tokenizer(&tokenizer, 3);
    let framed_ids = get(&inputs(), "clip.chunked_input_ids").shallow_clone();
    let rows: Vec<Vec<i64>> = (0..2)
        .map(|row| Vec::<i64>::try_from(framed_ids.get(row)).expect("ids"))
        .collect();
    let bodies: Vec<Vec<i64>> = rows
        .iter()
        .map(|row| {
            row.chunks(77)
                .flat_map(|chunk| chunk[1..76].to_vec())
                .filter(|&id| id != 49407)
                .collect()
        })
        .collect();
    let (conditional, unconditional) = framing.frame_guided(&bodies[..1], &bodies[1..]);
    assert_eq!(conditional.rows[0], rows[0]);
    assert_eq!(
        unconditional.rows[0], rows[1],
        "the short prompt is padded to the long one's chunks"
    );
    assert_eq!(conditional.to_tensor().size(), [1, 154]);
}

#[test]
fn clip_without_text_model_prefix_loads_the_same() {
    // transformers 5 saves CLIPTextModel without `text_model.`; 4.x (and SD1 repos) with it.
    let dir = tempfile::tempdir().expect("tempdir");
    let source = fixtures_dir().join("model/text_encoder");
    let target = dir.path().join("text_encoder");
    std::fs::create_dir_all(&target).unwrap();
    std::fs::copy(source.join("config.json"), target.join("config.json")).unwrap();
    let tensors = Tensor::read_safetensors(source.join("model.safetensors")).unwrap();
    let had_prefix = tensors
        .iter()
        .any(|(name, _)| name.starts_with("text_model."));
    let flipped: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(name, tensor)| match name.strip_prefix("text_model.") {
            Some(stripped) => (stripped.to_string(), tensor),
            None => (format!("text_model.{name}"), tensor),
        })
        .collect();
    Tensor::write_safetensors(&flipped, target.join("model.safetensors")).unwrap();
    let (_vs, clip) =
        ModelComponents::open(dir.path(), None, &[Component::TextEncoder], Device::Cpu)
            .unwrap()
            .text_encoder()
            .unwrap_or_else(|error| panic!("prefix flipped (had prefix: {had_prefix}): {error}"));
    let output = tch::no_grad(|| clip.encode(get(&inputs(), "clip.input_ids"), 2).unwrap());
    assert_close(
        &output,
        get(&goldens(), "clip.penultimate_ln"),
        "clip.penultimate_ln (prefix flipped)",
    );
}

#[test]
fn kohya_layout_matches_sd_scripts() {
    let kohya = crate::model_fixtures::read_tensors(&fixtures_dir().join("kohya.safetensors"))
        .expect("kohya goldens");
    let golden_ids = get(&kohya, "kohya.input_ids");
    assert_eq!(golden_ids.size(), [2, 231]);
    // sd-scripts always frames max_token_length (3 chunks); our framing at n = 3 gives its ids.
    let tokenizer =
        ClipTokenizer::from_model_dir(&fixtures_dir().join("model")).expect("tokenizer");
    let framing = PromptFraming::for_tokenizer(&tokenizer, 3);
    let rows: Vec<Vec<i64>> = (0..2)
        .map(|row| Vec::<i64>::try_from(golden_ids.get(row)).expect("ids"))
        .collect();
    let bodies: Vec<Vec<i64>> = rows
        .iter()
        .map(|row| {
            row.chunks(77)
                .flat_map(|chunk| chunk[1..76].to_vec())
                .filter(|&id| id != 49407)
                .collect()
        })
        .collect();
    assert_eq!(
        framing.frame_batch_to(&bodies, 3).rows,
        rows,
        "framing equals sd-scripts' chunking"
    );
    let (_vs, clip) = text_encoder();
    let output = tch::no_grad(|| {
        clip.encode_chunked(golden_ids, 2, PromptLayout::Kohya)
            .unwrap()
    });
    assert_eq!(output.size(), [2, 227, 48]);
    assert_close(
        &output,
        get(&kohya, "kohya.penultimate_ln"),
        "kohya.penultimate_ln",
    );
}
