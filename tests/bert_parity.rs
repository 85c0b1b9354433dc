//! Parity with Hugging Face transformers for BertForMaskedLM and DistilBertForMaskedLM
//! (golden vectors in tests/fixtures/{bert,distilbert}-tiny, with padding, token
//! types, gradients and ten AdamW steps; see each FIXTURE.json).

use candle_core::{DType, Device, Tensor};
use lmforge::data::Batch;
use lmforge::model::bert::IGNORE;
use lmforge::model::{hf, Model};
use lmforge::train::parallel::Gradients;
use lmforge::train::trainer::accumulate_gradients;
use std::collections::HashMap;
use std::path::PathBuf;

mod common;
use common::{
    assert_gradients_match, expected_tensors, fixture_adamw, rel_err, test_device, to_vec,
};

const FIXTURES: [&str; 2] = ["bert-tiny", "distilbert-tiny"];

fn fixture(name: &str) -> PathBuf {
    common::repo().join("tests/fixtures").join(name)
}

fn load(name: &str) -> Model {
    hf::load(&fixture(name).join("model"), &test_device()).unwrap()
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.to_dtype(DType::I64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The fixture's batch: ids, labels (−100 → IGNORE), attention mask.
fn fixture_batch(exp: &HashMap<String, Tensor>) -> Batch {
    let (b, t) = exp["input_ids"].dims2().unwrap();
    let targets: Vec<u32> = ints(&exp["labels"])
        .into_iter()
        .map(|l| if l < 0 { IGNORE } else { l as u32 })
        .collect();
    let loss_positions = targets.iter().filter(|&&l| l != IGNORE).count();
    Batch {
        inputs: ints(&exp["input_ids"])
            .into_iter()
            .map(|x| x as u32)
            .collect(),
        targets,
        batch_size: b,
        block_size: t,
        attention_mask: exp
            .get("attention_mask")
            .map(|m| ints(m).into_iter().map(|x| x as u32).collect()),
        loss_positions,
        weights: None,
        hidden_positions: None,
    }
}

fn token_types(exp: &HashMap<String, Tensor>) -> Option<Tensor> {
    exp.get("token_type_ids")
        .map(|t| t.to_dtype(DType::U32).unwrap())
}

/// Loss and gradients of the fixture's batch, with its token types where it has them.
fn gradients(m: &Model, exp: &HashMap<String, Tensor>) -> (f64, Vec<Vec<f32>>) {
    let Model::Bert(bert) = m else {
        panic!("a BERT fixture")
    };
    let batch = fixture_batch(exp);
    let mut grads: Vec<Vec<f32>> = m
        .params()
        .iter()
        .map(|p| vec![0.0; p.tensor().elem_count()])
        .collect();
    if let Some(tt) = token_types(exp) {
        // The trainer's batches carry no token types; the model's own loss takes them.
        let shape = (batch.batch_size, batch.block_size);
        let ids = Tensor::from_slice(&batch.inputs, shape, m.device()).unwrap();
        let mask =
            Tensor::from_slice(batch.attention_mask.as_ref().unwrap(), shape, m.device()).unwrap();
        let (sum, n) = bert
            .masked_lm_loss_sum(&ids, Some(&tt), Some(&mask), &batch.targets, None)
            .unwrap();
        let loss = (sum / n as f64).unwrap();
        let store = loss.backward().unwrap();
        for (p, g) in m.params().iter().zip(grads.iter_mut()) {
            *g = to_vec(store.get(p.tensor()).unwrap());
        }
        return (loss.to_scalar::<f32>().unwrap() as f64, grads);
    }
    let mut host = Gradients::Host(grads);
    let loss = accumulate_gradients(m, vec![batch], None, &mut host, (None, 1.0)).unwrap();
    (loss, host.into_host().unwrap())
}

#[test]
fn logits_and_loss_match_transformers() {
    for name in FIXTURES {
        let exp = expected_tensors(&fixture(name));
        let m = load(name);
        let Model::Bert(bert) = &m else { panic!() };
        let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
        let mask = exp.get("attention_mask");
        let hidden = bert
            .hidden_states(&ids, token_types(&exp).as_ref(), mask, None)
            .unwrap();
        let logits = bert.mlm_logits(&hidden).unwrap();
        assert_eq!(logits.dims(), exp["logits"].dims(), "{name}");
        let err = rel_err(&to_vec(&logits), &to_vec(&exp["logits"]));
        assert!(err <= 1e-5, "{name}: logits relative error {err:e}");

        let (loss, _) = gradients(&m, &exp);
        let want = to_vec(&exp["loss"])[0] as f64;
        assert!(
            (loss - want).abs() / want <= 1e-5,
            "{name}: loss {loss} vs {want}"
        );
    }
}

#[test]
fn every_gradient_matches_transformers() {
    for name in FIXTURES {
        let exp = expected_tensors(&fixture(name));
        let m = load(name);
        let (_, grads) = gradients(&m, &exp);
        assert_gradients_match(name, &m.params(), &grads, &exp);
    }
}

#[test]
fn one_step_and_ten_adamw_losses_match_transformers() {
    for name in FIXTURES {
        let exp = expected_tensors(&fixture(name));
        let m = load(name);
        let mut opt = fixture_adamw(&m.params());
        let want = to_vec(&exp["losses_10"]);
        for (step, &w) in want.iter().enumerate() {
            let (loss, grads) = gradients(&m, &exp);
            assert!(
                (loss - w as f64).abs() <= 1e-4,
                "{name} step {step}: loss {loss} vs {w}"
            );
            opt.step(&m.params(), &grads, 1e-3).unwrap();
            if step == 0 {
                // Weights after one step, where the gradient is well determined (see
                // the GPT parity test for why roundoff-level gradients are excluded).
                let hf_grad = |n: &str| to_vec(&exp[&format!("grad.{n}")]);
                for p in m.params() {
                    let (ours, theirs) = (
                        to_vec(p.tensor()),
                        to_vec(&exp[&format!("step1.{}", p.name)]),
                    );
                    let g = hf_grad(&p.name);
                    let scale = theirs.iter().map(|x| x.abs()).fold(1e-12f32, f32::max);
                    for i in (0..ours.len()).filter(|&i| g[i].abs() >= 1e-6) {
                        let err = (ours[i] - theirs[i]).abs() / scale;
                        assert!(err <= 1e-4, "{name} {}[{i}]: step-1 error {err:e}", p.name);
                    }
                }
            }
        }
    }
}

#[test]
fn save_round_trips_and_other_key_layouts_load() {
    use candle_core::safetensors::Load;
    for name in FIXTURES {
        let m = load(name);
        let dir = tempfile::tempdir().unwrap();
        hf::save(&m, dir.path(), None).unwrap();
        // Same tensor names and bytes as transformers' own file.
        let theirs_bytes = std::fs::read(fixture(name).join("model/model.safetensors")).unwrap();
        let ours_bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let theirs = safetensors::SafeTensors::deserialize(&theirs_bytes).unwrap();
        let ours = safetensors::SafeTensors::deserialize(&ours_bytes).unwrap();
        let mut a: Vec<String> = ours.names().into_iter().map(str::to_string).collect();
        let mut b: Vec<String> = theirs.names().into_iter().map(str::to_string).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}");
        for n in &a {
            assert_eq!(
                ours.tensor(n).unwrap().data(),
                theirs.tensor(n).unwrap().data()
            );
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["model_type"], name.trim_end_matches("-tiny"));

        // Without the base prefix, with the tied decoder and a pooler present.
        let root = if name == "bert-tiny" {
            "bert."
        } else {
            "distilbert."
        };
        let mut tensors: Vec<(String, Tensor)> = theirs
            .tensors()
            .into_iter()
            .map(|(n, v)| {
                (
                    n.trim_start_matches(root).to_string(),
                    v.load(&Device::Cpu).unwrap(),
                )
            })
            .collect();
        let words = tensors
            .iter()
            .find(|(n, _)| n == "embeddings.word_embeddings.weight")
            .unwrap()
            .1
            .clone();
        let extra = if name == "bert-tiny" {
            vec![
                ("cls.predictions.decoder.weight", words),
                (
                    "pooler.dense.weight",
                    Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap(),
                ),
                (
                    "pooler.dense.bias",
                    Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap(),
                ),
            ]
        } else {
            vec![("vocab_projector.weight", words)]
        };
        tensors.extend(extra.into_iter().map(|(n, t)| (n.to_string(), t)));
        let data =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), data).unwrap();
        let again = hf::load(dir.path(), &Device::Cpu).unwrap();
        for (x, y) in m.params().iter().zip(again.params()) {
            assert_eq!(x.name, y.name);
            assert_eq!(to_vec(x.tensor()), to_vec(y.tensor()), "{}", x.name);
        }
    }
}

#[test]
fn unsupported_bert_config_is_refused_naming_config_json() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture("bert-tiny").join("model/model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("bert-tiny").join("model/config.json")).unwrap(),
    )
    .unwrap();
    cfg["position_embedding_type"] = "relative_key".into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    let err = hf::load(dir.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("relative_key"),
        "{err}"
    );
}
