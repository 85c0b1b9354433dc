//! Knowledge distillation: the loss against a float64 recomputation (τ², batch mean,
//! masking), the layer rule, students that start as their teacher, and `lmforge
//! distill` end to end with exact resume.

mod common;
use candle_core::{DType, Device, Tensor};
use common::*;
use lmforge::data::Batch;
use lmforge::model::bert::IGNORE;
use lmforge::model::{hf, Model};
use lmforge::train::distill::{layer_map, loss_sum, terms, DistillSpec};
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::Path;

fn fixture(name: &str) -> Model {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}/model"));
    hf::load(&dir, &Device::Cpu).unwrap()
}

fn random(rng: &mut rand_chacha::ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// The three terms in plain f64 over rows of logits and hidden states.
fn reference(
    s: &[Vec<f64>],
    t: &[Vec<f64>],
    labels: &[usize],
    hs: &[Vec<f64>],
    ht: &[Vec<f64>],
    tau: f64,
) -> (f64, f64, f64) {
    let log_softmax = |z: &[f64], tau: f64| {
        let m = z.iter().cloned().fold(f64::MIN, f64::max) / tau;
        let lse = z.iter().map(|x| (x / tau - m).exp()).sum::<f64>().ln() + m;
        z.iter().map(|x| x / tau - lse).collect::<Vec<f64>>()
    };
    let (mut kl, mut ce, mut cos) = (0.0, 0.0, 0.0);
    for ((s, t), &y) in s.iter().zip(t).zip(labels) {
        let (ls, lt) = (log_softmax(s, tau), log_softmax(t, tau));
        kl += lt
            .iter()
            .zip(&ls)
            .map(|(a, b)| a.exp() * (a - b))
            .sum::<f64>()
            * tau
            * tau;
        ce -= log_softmax(s, 1.0)[y];
    }
    for (a, b) in hs.iter().zip(ht) {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        cos += 1.0 - dot / (na * nb);
    }
    (kl, ce, cos)
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

#[test]
fn the_loss_terms_equal_a_float64_recomputation() {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let (n, v, m, c) = (5, 7, 6, 4);
    let rows = |data: &[f64], k: usize| data.chunks(k).map(<[f64]>::to_vec).collect::<Vec<_>>();
    let (s, t) = (random(&mut rng, n * v, 3.0), random(&mut rng, n * v, 3.0));
    let (hs, ht) = (random(&mut rng, m * c, 1.0), random(&mut rng, m * c, 1.0));
    let labels: Vec<usize> = (0..n).map(|i| (i * 3) % v).collect();
    let f32_tensor = |x: &[f64], shape: (usize, usize)| {
        Tensor::from_vec(
            x.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
            shape,
            &Device::Cpu,
        )
        .unwrap()
    };
    for tau in [1.0, 2.0, 4.0] {
        let got = terms(
            (&f32_tensor(&s, (n, v)), &f32_tensor(&hs, (m, c))),
            (&f32_tensor(&t, (n, v)), &f32_tensor(&ht, (m, c))),
            &Tensor::new(
                labels.iter().map(|&y| y as u32).collect::<Vec<_>>(),
                &Device::Cpu,
            )
            .unwrap(),
            tau,
        )
        .unwrap();
        let (kl, ce, cos) = reference(
            &rows(&s, v),
            &rows(&t, v),
            &labels,
            &rows(&hs, c),
            &rows(&ht, c),
            tau,
        );
        for (what, a, b) in [
            ("kl", scalar(&got.kl), kl),
            ("ce", scalar(&got.lm), ce),
            ("cos", scalar(&got.cos), cos),
        ] {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "τ {tau} {what}: {a} vs {b}"
            );
        }
        assert_eq!((got.predicted, got.hidden), (n, m));
        // The weighted sum, divided by the predicted positions, is the batch mean of each
        // term: KL and CE over the n predicted rows, the cosine over the m hidden rows.
        let spec = DistillSpec {
            temperature: tau,
            alpha_ce: 5.0,
            alpha_lm: 2.0,
            alpha_cos: 1.0,
        };
        let mean = scalar(&got.weighted_sum(&spec, (n, m)).unwrap()) / n as f64;
        let want = 5.0 * kl / n as f64 + 2.0 * ce / n as f64 + cos / m as f64;
        assert!((mean - want).abs() <= 1e-5 * want, "{mean} vs {want}");
    }
    // Identical distributions: no KL; a student's own logits as teacher: none either.
    let same = terms(
        (&f32_tensor(&s, (n, v)), &f32_tensor(&hs, (m, c))),
        (&f32_tensor(&s, (n, v)), &f32_tensor(&hs, (m, c))),
        &Tensor::new(vec![0u32; n], &Device::Cpu).unwrap(),
        2.0,
    )
    .unwrap();
    assert!(scalar(&same.kl).abs() < 1e-5 && scalar(&same.cos).abs() < 1e-5);
}

#[test]
fn layers_are_taken_evenly_as_transformers_took_distilberts() {
    assert_eq!(layer_map(12, 6).unwrap(), vec![0, 2, 4, 7, 9, 11]);
    assert_eq!(layer_map(4, 2).unwrap(), vec![0, 3]);
    assert_eq!(layer_map(4, 4).unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(layer_map(4, 1).unwrap(), vec![0]);
    assert!(layer_map(4, 0).is_err() && layer_map(4, 5).is_err());
}

#[test]
fn a_distilbert_of_all_the_teachers_layers_computes_what_the_bert_does() {
    // Every layer kept: BERT → DistilBERT renames every weight and folds the token-type
    // embedding into the positions, so the two must agree to rounding.
    let teacher = fixture("bert-tiny");
    let config = teacher.config().with_layers(2);
    let student = teacher.distilled_student(&config, &[0, 1], 0).unwrap();
    assert_eq!(student.config().model_type(), "distilbert");
    let batch = masked_batch();
    let spec = DistillSpec {
        temperature: 2.0,
        alpha_ce: 1.0,
        alpha_lm: 0.0,
        alpha_cos: 1.0,
    };
    let (sum, n) = loss_sum(&student, &teacher, &batch, None, &spec).unwrap();
    assert_eq!(n, 3);
    assert!(
        scalar(&sum).abs() < 1e-4,
        "KL + cosine of identical models: {}",
        scalar(&sum)
    );
    // A student of one layer (the first) is not the teacher: it has something to learn.
    let one = teacher
        .distilled_student(&teacher.config().with_layers(1), &[0], 0)
        .unwrap();
    assert!(scalar(&loss_sum(&one, &teacher, &batch, None, &spec).unwrap().0) > 1e-3);
    let names: Vec<String> = one.params().iter().map(|p| p.name.clone()).collect();
    assert!(names.contains(&"distilbert.transformer.layer.0.attention.q_lin.weight".into()));
    assert!(!names.iter().any(|n| n.contains("token_type")));

    // GPT-2: student layer i is teacher layer keep[i], bit for bit.
    let gpt = fixture("gpt2-tiny");
    let keep = layer_map(gpt.config().layers(), 1).unwrap();
    let small = gpt
        .distilled_student(&gpt.config().with_layers(1), &keep, 0)
        .unwrap();
    for p in small.params() {
        let name = p
            .name
            .replace("transformer.h.0.", &format!("transformer.h.{}.", keep[0]));
        let q = gpt.params().into_iter().find(|q| q.name == name).unwrap();
        assert_eq!(to_vec(p.tensor()), to_vec(q.tensor()), "{}", p.name);
    }
}

/// Two right-padded sequences with three masked positions.
fn masked_batch() -> Batch {
    let inputs = vec![2, 40, 41, 42, 43, 3, 2, 50, 51, 3, 0, 0];
    let mut targets = vec![IGNORE; 12];
    targets[2] = 41;
    targets[4] = 43;
    targets[8] = 51;
    Batch {
        inputs,
        targets,
        batch_size: 2,
        block_size: 6,
        attention_mask: Some(vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]),
        loss_positions: 3,
        weights: None,
        hidden_positions: Some(10),
    }
}

#[test]
fn masking_leaves_unselected_and_padded_positions_out() {
    // Changing a padded position's id or an unselected position's label changes
    // nothing; the cosine term's mean is over the 10 non-pad positions.
    let teacher = fixture("bert-tiny");
    let student = teacher
        .distilled_student(&teacher.config().with_layers(1), &[0], 0)
        .unwrap();
    let spec = DistillSpec {
        temperature: 2.0,
        alpha_ce: 5.0,
        alpha_lm: 2.0,
        alpha_cos: 1.0,
    };
    let base = scalar(
        &loss_sum(&student, &teacher, &masked_batch(), None, &spec)
            .unwrap()
            .0,
    );
    let mut padded = masked_batch();
    padded.inputs[11] = 77;
    let same = scalar(
        &loss_sum(&student, &teacher, &padded, None, &spec)
            .unwrap()
            .0,
    );
    assert!((base - same).abs() <= 1e-6 * base, "{base} vs {same}");
    let mut relabelled = masked_batch();
    relabelled.targets[3] = IGNORE; // already ignored
    relabelled.targets[2] = 60; // a selected label: the CE term moves
    let moved = scalar(
        &loss_sum(&student, &teacher, &relabelled, None, &spec)
            .unwrap()
            .0,
    );
    assert!((base - moved).abs() > 1e-4);
}

#[test]
fn distill_trains_a_smaller_student_resumes_exactly_and_saves_what_transformers_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 30_000);
    let teacher = tmp.path().join("teacher");
    train_quick(
        &data,
        &teacher,
        &[
            "--set",
            "n_layer=3",
            "--set",
            "block_size=32",
            "--set",
            "max_steps=30",
        ],
    );
    let distill = |out: &Path, extra: &[&str]| {
        let mut a = vec![
            "distill",
            "--teacher",
            s(&teacher),
            "--data",
            s(&data),
            "--out",
            s(out),
            "--student-layers",
            "2",
            "--set",
            "block_size=32",
            "--set",
            "max_steps=12",
            "--set",
            "eval_every=4",
            "--set",
            "eval_batches=2",
            "--set",
            "sample_tokens=0",
            "--set",
            "dropout=0.1",
        ];
        a.extend_from_slice(extra);
        a.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let straight = tmp.path().join("straight");
    run(distill(&straight, &[]));
    let split = tmp.path().join("split");
    run(distill(&split, &["--stop-at-step", "6"]));
    ok(&[
        "distill",
        "--teacher",
        s(&teacher),
        "--out",
        s(&split),
        "--resume",
    ]);
    let keys = ["step", "loss", "grad_norm", "val_loss"];
    assert_eq!(
        metric_values(&straight, &keys),
        metric_values(&split, &keys)
    );
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(
            lmforge::train::checkpoint::resolve_model_dir(&straight)
                .unwrap()
                .join("config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(config["n_layer"], 2, "{config}");

    // BERT → DistilBERT: the student is a DistilBertForMaskedLM directory.
    let wp = prepare_with(&tmp.path().join("wp"), 30_000, "wordpiece:300");
    let bert = tmp.path().join("bert");
    train_quick(
        &wp,
        &bert,
        &[
            "--set",
            "model_type=bert",
            "--set",
            "block_size=32",
            "--set",
            "max_steps=10",
        ],
    );
    let student = tmp.path().join("distilbert");
    let out = ok(&[
        "distill",
        "--teacher",
        s(&bert),
        "--data",
        s(&wp),
        "--out",
        s(&student),
        "--student-layers",
        "1",
        "--set",
        "block_size=32",
        "--set",
        "max_steps=6",
        "--set",
        "eval_every=3",
    ]);
    assert!(out.contains("fill-mask"), "{out}");
    let dir = lmforge::train::checkpoint::resolve_model_dir(&student).unwrap();
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (config["model_type"].as_str(), config["n_layers"].as_u64()),
        (Some("distilbert"), Some(1)),
        "{config}"
    );
    assert_eq!(config["architectures"][0], "DistilBertForMaskedLM");

    // A student config of another vocabulary is refused, naming the file.
    let mut other: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    other["vocab_size"] = 301.into();
    let other_path = tmp.path().join("other.json");
    std::fs::write(&other_path, other.to_string()).unwrap();
    let e = fails(&[
        "distill",
        "--teacher",
        s(&bert),
        "--data",
        s(&wp),
        "--out",
        s(&tmp.path().join("v")),
        "--student-config",
        s(&other_path),
    ]);
    assert!(e.contains("other.json") && e.contains("301"), "{e}");

    // A student must be as deep as its teacher at most.
    let e = fails(&[
        "distill",
        "--teacher",
        s(&teacher),
        "--data",
        s(&data),
        "--out",
        s(&tmp.path().join("x")),
        "--student-layers",
        "5",
    ]);
    assert!(e.contains("5 layers") && e.contains("3"), "{e}");
}
