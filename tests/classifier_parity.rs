//! Parity with Hugging Face transformers for sequence classifiers: logits, loss,
//! every gradient, the step-1 weights and ten AdamW losses
//! (tests/fixtures/*-cls-tiny, with padding; see each FIXTURE.json).

use candle_core::{DType, Device, Tensor};
use lmforge::model::{cross_entropy_sum, hf, Model};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;
use common::{assert_gradients_match, expected_tensors, fixture_adamw, rel_err, to_vec};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Σ cross-entropy of the fixture's batch and its logits, differentiable.
fn loss_and_logits(m: &Model, exp: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    let ids = exp["input_ids"].to_dtype(DType::U32).unwrap();
    let labels = exp["labels"].to_dtype(DType::U32).unwrap();
    let logits = match m {
        Model::Bert(b) => {
            let types = exp["token_type_ids"].to_dtype(DType::U32).unwrap();
            let hidden = b
                .hidden_states(&ids, Some(&types), exp.get("attention_mask"), None)
                .unwrap();
            b.classify_logits(&hidden).unwrap()
        }
        Model::Gpt(g) => g.classify_logits(&ids, None).unwrap(),
    };
    let loss = cross_entropy_sum(&logits, &labels, lmforge::model::Kernels::Fused).unwrap();
    (loss, logits)
}

/// Mean loss and every parameter's gradient.
fn gradients(m: &Model, exp: &HashMap<String, Tensor>) -> (f64, Vec<Vec<f32>>) {
    let (sum, _) = loss_and_logits(m, exp);
    let rows = exp["labels"].elem_count();
    let loss = (sum / rows as f64).unwrap();
    let store = loss.backward().unwrap();
    let grads = m
        .params()
        .iter()
        .map(|p| to_vec(store.get(p.tensor()).expect("every weight gets a gradient")))
        .collect();
    (loss.to_scalar::<f32>().unwrap() as f64, grads)
}

const FIXTURES: [&str; 2] = ["bert-cls-tiny", "gpt2-cls-tiny"];

#[test]
fn logits_loss_and_gradients_match_transformers() {
    for name in FIXTURES {
        let exp = expected_tensors(&fixture(name));
        let m = hf::load(&fixture(name).join("model"), &Device::Cpu).unwrap();
        assert_eq!(m.objective(), lmforge::model::Objective::Classify);
        let (_, logits) = loss_and_logits(&m, &exp);
        let err = rel_err(&to_vec(&logits), &to_vec(&exp["logits"]));
        assert!(err <= 1e-5, "{name}: logits relative error {err:e}");
        let (loss, grads) = gradients(&m, &exp);
        let want = to_vec(&exp["loss"])[0] as f64;
        assert!(
            (loss - want).abs() / want <= 1e-5,
            "{name}: loss {loss} vs {want}"
        );
        assert_gradients_match(name, &m.params(), &grads, &exp);
    }
}

#[test]
fn ten_adamw_losses_match_transformers() {
    for name in FIXTURES {
        let exp = expected_tensors(&fixture(name));
        let m = hf::load(&fixture(name).join("model"), &Device::Cpu).unwrap();
        let mut opt = fixture_adamw(&m.params());
        for (step, &w) in to_vec(&exp["losses_10"]).iter().enumerate() {
            let (loss, grads) = gradients(&m, &exp);
            assert!(
                (loss - w as f64).abs() <= 1e-4,
                "{name} step {step}: loss {loss} vs {w}"
            );
            opt.step(&m.params(), &grads, 1e-3).unwrap();
        }
    }
}

#[test]
fn classifiers_save_with_their_labels_and_reload() {
    for name in FIXTURES {
        let m = hf::load(&fixture(name).join("model"), &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        hf::save(&m, dir.path(), Some(511)).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        let theirs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture(name).join("model/config.json")).unwrap(),
        )
        .unwrap();
        for key in ["architectures", "id2label", "label2id", "model_type"] {
            assert_eq!(cfg[key], theirs[key], "{name}: {key}");
        }
        let st = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&st).unwrap();
        let ours_names: std::collections::BTreeSet<String> =
            st.names().into_iter().map(str::to_string).collect();
        let theirs_bytes = std::fs::read(fixture(name).join("model/model.safetensors")).unwrap();
        let theirs_st = safetensors::SafeTensors::deserialize(&theirs_bytes).unwrap();
        let theirs_names: std::collections::BTreeSet<String> =
            theirs_st.names().into_iter().map(str::to_string).collect();
        assert_eq!(ours_names, theirs_names, "{name}");
        let again = hf::load(dir.path(), &Device::Cpu).unwrap();
        for (a, b) in m.params().iter().zip(again.params()) {
            assert_eq!(to_vec(a.tensor()), to_vec(b.tensor()), "{}", a.name);
        }
    }
}
