//! Parity with Hugging Face transformers on the gpt2-tiny fixture (golden vectors
//! written by transformers 5.23 in float32; see tests/fixtures/gpt2-tiny/FIXTURE.json).

use candle_core::{DType, Device, Tensor};
use lmforge::data::Batch;
use lmforge::generate::{generate, SamplingOptions};
use lmforge::model::{hf, Model};
use lmforge::train::parallel::Gradients;
use lmforge::train::trainer::accumulate_gradients;
use rand::SeedableRng;
use std::collections::HashMap;
use std::path::PathBuf;

mod common;
use common::{expected_tensors, fixture_adamw, rel_err, test_device, to_vec};

fn fixture() -> PathBuf {
    common::repo().join("tests/fixtures/gpt2-tiny")
}

fn expected() -> HashMap<String, Tensor> {
    expected_tensors(&fixture())
}

fn model() -> Model {
    hf::load(&fixture().join("model"), &test_device()).unwrap()
}

fn input_ids(exp: &HashMap<String, Tensor>) -> Vec<Vec<u32>> {
    exp["input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap()
}

/// The fixture's loss: mean cross-entropy of logits[:, :-1] against ids[:, 1:].
fn fixture_batch(ids: &[Vec<u32>]) -> Batch {
    let t = ids[0].len() - 1;
    Batch::causal(
        ids.iter().flat_map(|r| r[..t].to_vec()).collect(),
        ids.iter().flat_map(|r| r[1..].to_vec()).collect(),
        ids.len(),
        t,
        1,
    )
}

fn gradients(model: &Model, ids: &[Vec<u32>]) -> (f64, Vec<Vec<f32>>) {
    let grads: Vec<Vec<f32>> = model
        .params()
        .iter()
        .map(|p| vec![0.0; p.tensor().elem_count()])
        .collect();
    let mut host = Gradients::Host(grads);
    let loss = accumulate_gradients(
        model,
        vec![fixture_batch(ids)],
        None,
        &mut host,
        (None, 1.0),
    )
    .unwrap();
    (loss, host.into_host().unwrap())
}

#[test]
fn logits_and_loss_match_transformers() {
    let exp = expected();
    let m = model();
    let ids = Tensor::new(input_ids(&exp), m.device()).unwrap();
    let Model::Gpt(gpt) = &m else {
        panic!("a gpt2 fixture")
    };
    let logits = gpt.forward(&ids, None, None).unwrap();
    assert_eq!(logits.dims(), exp["logits"].dims());
    let err = rel_err(&to_vec(&logits), &to_vec(&exp["logits"]));
    assert!(err <= 1e-5, "logits relative error {err:e}");

    let (loss, _) = gradients(&m, &input_ids(&exp));
    let want = to_vec(&exp["loss"])[0] as f64;
    assert!((loss - want).abs() / want <= 1e-5, "loss {loss} vs {want}");
}

#[test]
fn every_gradient_matches_transformers() {
    let exp = expected();
    let m = model();
    let (_, grads) = gradients(&m, &input_ids(&exp));
    for (p, g) in m.params().iter().zip(&grads) {
        let want = to_vec(&exp[&format!("grad.{}", p.name)]);
        let err = rel_err(g, &want);
        assert!(err <= 1e-4, "{}: gradient relative error {err:e}", p.name);
    }
}

#[test]
fn one_adamw_step_matches_transformers() {
    let exp = expected();
    // The optimizer alone: fed transformers' own gradients, our AdamW must land on
    // PyTorch's weights to float32 rounding.
    let m = model();
    let hf_grads: Vec<Vec<f32>> = m
        .params()
        .iter()
        .map(|p| to_vec(&exp[&format!("grad.{}", p.name)]))
        .collect();
    let mut opt = fixture_adamw(&m.params());
    opt.step(&m.params(), &hf_grads, 1e-3).unwrap();
    for p in m.params() {
        let err = rel_err(
            &to_vec(p.tensor()),
            &to_vec(&exp[&format!("step1.{}", p.name)]),
        );
        assert!(
            err <= 1e-6,
            "{}: relative error after one step {err:e}",
            p.name
        );
    }
    // The whole step with our gradients. Adam's first update is lr·g/(|g| + eps), so
    // where a gradient is at roundoff level (the key bias's is exactly zero in theory:
    // softmax ignores a shift) both frameworks move the weight by amplified noise.
    // Elements with a well-determined gradient must agree to 1e-4 of the weights'
    // scale; the others may only move by at most lr, as Adam allows.
    let m = model();
    let before: Vec<Vec<f32>> = m.params().iter().map(|p| to_vec(p.tensor())).collect();
    let (_, grads) = gradients(&m, &input_ids(&exp));
    let mut opt = fixture_adamw(&m.params());
    opt.step(&m.params(), &grads, 1e-3).unwrap();
    let (mut noise_level, mut total) = (0, 0);
    for (p, w0) in m.params().iter().zip(&before) {
        let ours = to_vec(p.tensor());
        let theirs = to_vec(&exp[&format!("step1.{}", p.name)]);
        let hf_grad = &hf_grads
            .iter()
            .zip(m.params())
            .find(|(_, q)| q.name == p.name)
            .unwrap()
            .0;
        let scale = theirs.iter().map(|x| x.abs()).fold(1e-12f32, f32::max);
        total += ours.len();
        for i in 0..ours.len() {
            if hf_grad[i].abs() >= 1e-6 {
                let err = (ours[i] - theirs[i]).abs() / scale;
                assert!(
                    err <= 1e-4,
                    "{}[{i}]: relative error after one step {err:e}",
                    p.name
                );
            } else {
                noise_level += 1;
                assert!(
                    (ours[i] - w0[i]).abs() <= 1.01e-3 && (theirs[i] - w0[i]).abs() <= 1.01e-3,
                    "{}[{i}]",
                    p.name
                );
            }
        }
    }
    assert!(
        noise_level * 20 < total,
        "{noise_level} of {total} elements have roundoff-level gradients"
    );
}

#[test]
fn ten_adamw_losses_match_transformers() {
    let exp = expected();
    let m = model();
    let ids = input_ids(&exp);
    let mut opt = fixture_adamw(&m.params());
    let want = to_vec(&exp["losses_10"]);
    for (step, &w) in want.iter().enumerate() {
        let (loss, grads) = gradients(&m, &ids);
        assert!(
            (loss - w as f64).abs() <= 1e-4,
            "step {step}: loss {loss} vs {w}"
        );
        opt.step(&m.params(), &grads, 1e-3).unwrap();
    }
}

#[test]
fn greedy_ids_match_transformers() {
    let exp = expected();
    let m = hf::load_gpt(&fixture().join("model"), &test_device(), "test").unwrap();
    let want: Vec<u32> = exp["greedy_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let prompt = &input_ids(&exp)[0][..8];
    let opts = SamplingOptions {
        max_new_tokens: 16,
        temperature: 1.0,
        top_k: None,
        top_p: None,
        greedy: true,
        stop_token: None,
    };
    let got = generate(
        &m,
        prompt,
        &opts,
        &mut rand_chacha::ChaCha8Rng::seed_from_u64(0),
    )
    .unwrap();
    assert_eq!(got, want);
}

#[test]
fn save_matches_fixture_layout_and_reload_is_bit_identical() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    hf::save(&m, dir.path(), Some(511)).unwrap();

    let theirs_bytes = std::fs::read(fixture().join("model/model.safetensors")).unwrap();
    let ours_bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let theirs = safetensors::SafeTensors::deserialize(&theirs_bytes).unwrap();
    let ours = safetensors::SafeTensors::deserialize(&ours_bytes).unwrap();
    let mut names: Vec<String> = ours.names().into_iter().map(str::to_string).collect();
    names.sort();
    let mut want: Vec<String> = theirs.names().into_iter().map(str::to_string).collect();
    want.sort();
    assert_eq!(names, want);
    for name in &names {
        let (a, b) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
        assert_eq!((a.shape(), a.dtype()), (b.shape(), b.dtype()), "{name}");
        assert_eq!(a.data(), b.data(), "{name}: bytes differ after load → save");
    }

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    let fixture_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture().join("model/config.json")).unwrap(),
    )
    .unwrap();
    for key in [
        "model_type",
        "architectures",
        "vocab_size",
        "n_positions",
        "n_embd",
        "n_layer",
        "n_head",
        "layer_norm_epsilon",
        "activation_function",
        "tie_word_embeddings",
    ] {
        assert_eq!(cfg[key], fixture_cfg[key], "config key {key}");
    }

    let again = hf::load(dir.path(), &Device::Cpu).unwrap();
    for (a, b) in m.params().iter().zip(again.params()) {
        assert_eq!(to_vec(a.tensor()), to_vec(b.tensor()), "{}", a.name);
    }
}

#[test]
fn hub_layout_keys_load_and_unsupported_config_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(fixture().join("model/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    // Rewrite as the original hub files name keys: no `transformer.` prefix, plus buffers.
    let mut tensors: Vec<(String, Tensor)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            use candle_core::safetensors::Load;
            (
                n.trim_start_matches("transformer.").to_string(),
                v.load(&Device::Cpu).unwrap(),
            )
        })
        .collect();
    tensors.push((
        "h.0.attn.bias".into(),
        Tensor::ones((1, 1, 64, 64), DType::F32, &Device::Cpu).unwrap(),
    ));
    let data = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), data).unwrap();
    std::fs::copy(
        fixture().join("model/config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let hub = hf::load(dir.path(), &Device::Cpu).unwrap();
    for (a, b) in model().params().iter().zip(hub.params()) {
        assert_eq!(to_vec(a.tensor()), to_vec(b.tensor()), "{}", a.name);
    }

    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    cfg["activation_function"] = "relu".into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = hf::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json") && err.contains("relu"), "{err}");
}
