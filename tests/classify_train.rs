//! Fine-tuning sequence classifiers (`train --task classify`) and using them
//! (`predict`, `eval --data FILE`): a pretrained body under a fresh head, class
//! weights against a float64 recomputation, exact resume, early stopping by a metric,
//! token ids in place of text.

mod common;
use candle_core::{DType, Device};
use common::*;
use lmforge::data::labelled::{class_weights, classification_batch, Framing};
use lmforge::data::TextTokenizer;
use lmforge::model::{hf, ModelConfig};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Both domains of the review sentences, with a WordPiece of 600.
fn prepare_reviews(tmp: &Path) -> PathBuf {
    prepare_sentiment(tmp, &["imdb", "amazon"], "wordpiece:600")
}

fn eval_json(model: &Path, data: &Path) -> Value {
    serde_json::from_str(&ok(&[
        "eval",
        "--model",
        s(model),
        "--data",
        s(data),
        "--json",
    ]))
    .unwrap()
}

#[test]
fn a_masked_lm_becomes_a_classifier_with_a_fresh_head_and_hf_label_maps() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_reviews(tmp.path());
    // Pretrain a small masked LM on the review texts, with the data's tokenizer.
    let texts: String = ["imdb", "amazon"]
        .iter()
        .flat_map(|n| {
            std::fs::read_to_string(sentiment(n))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: Value = serde_json::from_str(l).unwrap();
                    format!("{}\n", v["text"].as_str().unwrap())
                })
                .collect::<Vec<_>>()
        })
        .collect();
    std::fs::write(tmp.path().join("reviews.txt"), texts).unwrap();
    let lm_data = tmp.path().join("lm");
    ok(&[
        "prepare",
        "--input",
        s(&tmp.path().join("reviews.txt")),
        "--out",
        s(&lm_data),
        "--tokenizer",
        s(&data.join("tokenizer.json")),
    ]);
    let mlm = tmp.path().join("mlm");
    let mut a = vec![
        "train",
        "--data",
        s(&lm_data),
        "--out",
        s(&mlm),
        "--set",
        "model_type=bert",
        "--set",
        "block_size=48",
        "--set",
        "max_steps=20",
        "--set",
        "eval_every=0",
    ];
    a.extend_from_slice(TINY_MODEL);
    ok(&a);

    let run = tmp.path().join("cls");
    let out = ok(&classify_args(
        &data,
        &run,
        &[
            "--init-from",
            s(&mlm),
            "--set",
            "max_steps=300",
            "--set",
            "eval_every=100",
            "--set",
            "lr=2e-3",
        ],
    ));
    assert!(out.contains("lmforge predict --model"), "{out}");
    let ckpt = run.join("checkpoints/step-000300");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    assert_eq!(config["id2label"].as_object().unwrap().len(), 2, "{config}");
    assert_eq!(config["id2label"]["0"], "negative");
    assert_eq!(config["label2id"]["positive"], 1);
    // Learned something: better than the 50 % of either constant answer.
    let r = eval_json(&run, &data);
    assert!(r["accuracy"].as_f64().unwrap() > 0.6, "{r}");
    let log = metrics(&run);
    let last = log
        .iter()
        .rev()
        .find(|l| l.get("val_f1_macro").is_some())
        .unwrap();
    assert_eq!(
        last["val_accuracy"], r["accuracy"],
        "the run's last evaluation is eval's"
    );

    // The head is new, the body is the masked LM's: before any step, every body weight
    // equals the pretrained one and the classifier's weights are freshly drawn.
    let lm = hf::load(&checkpoint_of(&mlm), &Device::Cpu).unwrap();
    let mut config = lm.config();
    config.set_classifier(vec!["a".into(), "b".into(), "c".into()], 0);
    let cls = lm.with_new_head(&config, 7).unwrap();
    let lm_params = lm.params();
    for p in cls.params() {
        match lm_params.iter().find(|q| q.name == p.name) {
            Some(q) => assert_eq!(to_vec(p.tensor()), to_vec(q.tensor()), "{}", p.name),
            None => assert!(
                p.name.starts_with("bert.pooler.") || p.name.starts_with("classifier."),
                "{} is neither body nor head",
                p.name
            ),
        }
    }
    assert_eq!(cls.labels().len(), 3);
}

fn checkpoint_of(run: &Path) -> PathBuf {
    lmforge::train::checkpoint::resolve_model_dir(run).unwrap()
}

#[test]
fn gpt2_language_model_fine_tunes_into_a_classifier_padding_with_end_of_text() {
    let tmp = tempfile::tempdir().unwrap();
    // The GPT-2 fixture has no tokenizer: a char vocabulary fits its 512 ids.
    let data = prepare_sentiment(tmp.path(), &["amazon"], "char");
    let pretrained = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tiny/model");
    let run = tmp.path().join("gpt-cls");
    ok(&[
        "train",
        "--task",
        "classify",
        "--init-from",
        s(&pretrained),
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--set",
        "block_size=64",
        "--set",
        "batch_size=8",
        "--set",
        "max_steps=10",
        "--set",
        "eval_every=0",
    ]);
    let ckpt = checkpoint_of(&run);
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "GPT2ForSequenceClassification");
    let eot = TextTokenizer::from_file(&data.join("tokenizer.json"))
        .unwrap()
        .eot_id();
    assert_eq!(config["pad_token_id"], eot, "{config}");
    let r = eval_json(&run, &data);
    assert_eq!(r["examples"], 100, "{r}");
}

#[test]
fn class_weights_scale_each_example_as_a_float64_recomputation_does() {
    assert_eq!(class_weights("", &[3, 1]).unwrap(), None);
    // scikit-learn's "balanced": n / (k · count).
    assert_eq!(
        class_weights("balanced", &[3, 1]).unwrap(),
        Some(vec![4.0 / 6.0, 2.0])
    );
    assert_eq!(
        class_weights("1, 2.5", &[3, 1]).unwrap(),
        Some(vec![1.0, 2.5])
    );
    for bad in ["1", "1,x", "1,-2", "fair"] {
        assert!(class_weights(bad, &[3, 1]).is_err(), "{bad}");
    }

    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert-cls-tiny/model");
    let model = hf::load(&fixture, &Device::Cpu).unwrap();
    let examples = vec![
        (vec![5, 6, 7, 8], 0),
        (vec![9, 10], 1),
        (vec![11, 12, 13], 1),
    ];
    let ModelConfig::Bert(c) = model.config() else {
        panic!("a BERT fixture")
    };
    let framing = Framing {
        wrap: Some((2, 3)),
        pad: c.pad_token_id,
        max_len: 16,
    };
    let mut batch = classification_batch(&examples, &framing);
    let weights = [0.5f32, 3.0];
    batch.weights = Some(batch.targets.iter().map(|&t| weights[t as usize]).collect());
    let (sum, n) = model.loss_sum(&batch, None).unwrap();
    let sum = sum
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert_eq!(n, 3);
    // Σ w_y · (log Σ exp(z) − z_y), in f64 from the model's logits.
    let logits: Vec<Vec<f64>> = model
        .classify_logits(&batch, None)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec2()
        .unwrap();
    let want: f64 = logits
        .iter()
        .zip(&batch.targets)
        .map(|(z, &y)| {
            let lse = z.iter().map(|x| x.exp()).sum::<f64>().ln();
            weights[y as usize] as f64 * (lse - z[y as usize])
        })
        .sum();
    assert!((sum - want).abs() <= 1e-5 * want.abs(), "{sum} vs {want}");
    // And a weighted loss has gradients everywhere, like the unweighted one.
    let (sum, _) = model.loss_sum(&batch, None).unwrap();
    let grads = sum.backward().unwrap();
    for p in model.params() {
        assert!(
            grads.get(p.tensor()).is_some(),
            "no gradient for {}",
            p.name
        );
    }
}

#[test]
fn a_classifier_run_resumes_exactly_with_dropout_and_class_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_reviews(tmp.path());
    let extra = [
        "--set",
        "max_steps=12",
        "--set",
        "eval_every=4",
        "--set",
        "dropout=0.1",
        "--set",
        "class_weights=balanced",
    ];
    let straight = tmp.path().join("straight");
    ok(&classify_args(&data, &straight, &extra));
    let split = tmp.path().join("split");
    let mut first = classify_args(&data, &split, &extra);
    first.extend_from_slice(&["--stop-at-step", "6"]);
    let out = ok(&first);
    assert!(out.contains("--resume"), "{out}");
    ok(&["train", "--out", s(&split), "--resume"]);
    let keys = ["step", "loss", "grad_norm", "val_loss", "val_f1_macro"];
    assert_eq!(
        metric_values(&straight, &keys),
        metric_values(&split, &keys)
    );
    let weights = |run: &Path| std::fs::read(checkpoint_of(run).join("model.safetensors")).unwrap();
    assert!(
        weights(&straight) == weights(&split),
        "final weights differ"
    );
}

#[test]
fn early_stopping_ends_a_run_that_stops_improving_and_keeps_its_best_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_reviews(tmp.path());
    let run = tmp.path().join("patient");
    // A learning rate too small to move the metric: the first evaluation stays best.
    let out = ok(&classify_args(
        &data,
        &run,
        &[
            "--set",
            "lr=1e-12",
            "--set",
            "min_lr=0",
            "--set",
            "max_steps=40",
            "--set",
            "eval_every=2",
            "--set",
            "patience=2",
            "--set",
            "metric=f1_macro",
            "--set",
            "keep_best=true",
            "--set",
            "keep_last=1",
        ],
    ));
    let steps: Vec<u64> = metrics(&run)
        .iter()
        .filter(|l| l.get("loss").is_some())
        .map(|l| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(
        steps.last(),
        Some(&6),
        "stopped after 2 evaluations without progress"
    );
    let best = run.join("checkpoints/step-000002");
    assert!(
        out.contains("best f1_macro") && out.contains(s(&best)),
        "{out}"
    );
    assert!(best.exists() && run.join("checkpoints/step-000006").exists());
    assert!(!run.join("checkpoints/step-000004").exists());

    // A classification metric on a language model, or a task mismatch, is refused.
    let lm = prepare_char(tmp.path(), 5_000);
    let e = fails(&["train", "--data", s(&lm), "--set", "metric=f1_macro"]);
    assert!(e.contains("val_loss"), "{e}");
    let e = fails(&[
        "train",
        "--task",
        "classify",
        "--data",
        s(&lm),
        "--out",
        s(&tmp.path().join("x")),
    ]);
    assert!(
        e.contains("meta.json") && e.contains("prepare --task classify"),
        "{e}"
    );
    let e = fails(&classify_args(
        &data,
        &tmp.path().join("y"),
        &["--set", "class_weights=1,2,3"],
    ));
    assert!(e.contains("class_weights") && e.contains("2 labels"), "{e}");
}

#[test]
fn predict_takes_text_files_jsonl_and_token_ids_and_agrees_with_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_reviews(tmp.path());
    let run = tmp.path().join("cls");
    ok(&classify_args(
        &data,
        &run,
        &["--set", "max_steps=30", "--set", "eval_every=0"],
    ));

    // Ten labelled amazon lines: eval on the file, predict on its text.
    let lines: Vec<Value> = std::fs::read_to_string(sentiment("amazon"))
        .unwrap()
        .lines()
        .take(10)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let labelled = tmp.path().join("ten.jsonl");
    std::fs::write(
        &labelled,
        lines.iter().map(|v| format!("{v}\n")).collect::<String>(),
    )
    .unwrap();
    let predictions: Vec<Value> = ok(&[
        "predict",
        "--model",
        s(&run),
        "--input",
        s(&labelled),
        "--json",
    ])
    .lines()
    .map(|l| serde_json::from_str(l).unwrap())
    .collect();
    assert_eq!(predictions.len(), 10);
    let right = predictions
        .iter()
        .zip(&lines)
        .filter(|(p, v)| p["label"] == v["label"])
        .count();
    let r = eval_json(&run, &labelled);
    assert_eq!(r["accuracy"].as_f64().unwrap(), right as f64 / 10.0, "{r}");
    for (i, p) in predictions.iter().enumerate() {
        assert_eq!(p["index"], i);
        let scores = p["scores"].as_object().unwrap();
        let total: f64 = scores.values().map(|x| x.as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-9);
        assert_eq!(scores[p["label"].as_str().unwrap()], p["score"]);
    }

    // Token ids (the model's input as is) give what the text gives.
    let text = lines[0]["text"].as_str().unwrap();
    let tok = TextTokenizer::from_file(&data.join("tokenizer.json")).unwrap();
    let specials = tok.bert_specials().unwrap();
    let mut ids = vec![specials.cls];
    ids.extend(tok.encode(text).unwrap());
    ids.push(specials.sep);
    let joined: Vec<String> = ids.iter().map(u32::to_string).collect();
    let by_ids = ok(&[
        "predict",
        "--model",
        s(&run),
        "--ids",
        &joined.join(","),
        "--json",
    ]);
    let by_text = ok(&["predict", "--model", s(&run), "--text", text, "--json"]);
    assert_eq!(by_ids, by_text);
    let id_file = tmp.path().join("ids.jsonl");
    std::fs::write(&id_file, format!("{{\"ids\": {:?}}}\n", ids)).unwrap();
    assert_eq!(
        ok(&[
            "predict",
            "--model",
            s(&run),
            "--input",
            s(&id_file),
            "--json"
        ]),
        by_text
    );
    let plain = tmp.path().join("one.txt");
    std::fs::write(&plain, format!("{text}\n")).unwrap();
    let line = ok(&["predict", "--model", s(&run), "--input", s(&plain)]);
    assert!(
        line.starts_with(predictions[0]["label"].as_str().unwrap()),
        "{line}"
    );

    // Bad input: one line naming where.
    std::fs::write(&id_file, "{\"ids\": [1, 999999]}\n").unwrap();
    let e = fails(&["predict", "--model", s(&run), "--input", s(&id_file)]);
    assert!(e.contains("ids.jsonl:1") && e.contains("999999"), "{e}");
    let unknown = tmp.path().join("unknown.jsonl");
    std::fs::write(&unknown, "{\"text\": \"fine\", \"label\": \"neutral\"}\n").unwrap();
    let e = fails(&["eval", "--model", s(&run), "--data", s(&unknown)]);
    assert!(
        e.contains("unknown.jsonl:1") && e.contains("neutral"),
        "{e}"
    );
    let e = fails(&["predict", "--model", s(&run), "--text", " "]);
    assert!(e.contains("empty text"), "{e}");
    let lm = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tiny/model");
    let e = fails(&["predict", "--model", s(&lm), "--text", "a"]);
    assert!(e.contains("not a sequence classifier"), "{e}");
}
