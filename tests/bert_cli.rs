//! Masked-LM pretraining end to end through the CLI: WordPiece data, a BERT and a
//! DistilBERT trained, stopped and resumed bit for bit, evaluated (masked-token loss,
//! perplexity, accuracy) and asked to fill masks; bad input refused in one line.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn wordpiece_data(tmp: &Path) -> PathBuf {
    prepare_with(tmp, 60_000, "wordpiece:300")
}

const TINY_BERT: &[&str] = &[
    "--set",
    "model_type=bert",
    "--set",
    "n_layer=2",
    "--set",
    "n_head=2",
    "--set",
    "n_embd=32",
    "--set",
    "block_size=32",
    "--set",
    "batch_size=4",
    "--set",
    "grad_accum=2",
    "--set",
    "dropout=0.1",
    "--set",
    "lr=3e-3",
    "--set",
    "warmup_steps=2",
    "--set",
    "eval_every=4",
    "--set",
    "eval_batches=2",
    "--set",
    "keep_last=0",
    "--set",
    "max_steps=12",
    "--set",
    "save_every=0",
];

fn train<'a>(data: &'a Path, run: &'a Path, extra: &[&'a str]) -> String {
    let mut args = vec!["train", "--data", s(data), "--out", s(run)];
    args.extend_from_slice(TINY_BERT);
    args.extend_from_slice(extra);
    ok(&args)
}

fn numbers(run: &Path) -> Vec<Vec<Value>> {
    metric_values(run, &["step", "loss", "lr", "grad_norm", "val_loss"])
}

#[test]
fn bert_trains_stops_resumes_exactly_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let data = wordpiece_data(tmp.path());
    let straight = tmp.path().join("straight");
    train(&data, &straight, &[]);
    let stopped = tmp.path().join("stopped");
    let mut args = vec!["train", "--data", s(&data), "--out", s(&stopped)];
    args.extend_from_slice(TINY_BERT);
    args.extend_from_slice(&["--stop-at-step", "6"]);
    ok(&args);
    ok(&["train", "--out", s(&stopped), "--resume"]);
    let weights =
        |run: &Path| std::fs::read(run.join("checkpoints/step-000012/model.safetensors")).unwrap();
    assert!(
        weights(&straight) == weights(&stopped),
        "resumed weights differ"
    );
    assert_eq!(numbers(&straight), numbers(&stopped));

    // It learns: validation loss falls from ln(vocab) at the start.
    let vals: Vec<f64> = metrics(&straight)
        .iter()
        .filter_map(|l| l.get("val_loss").and_then(Value::as_f64))
        .collect();
    assert!((vals[0] - (300f64).ln()).abs() < 0.3, "{vals:?}");
    assert!(vals.last().unwrap() < &(vals[0] - 0.15), "{vals:?}");

    // A Hugging Face BERT directory with the tokenizer files transformers reads.
    let ckpt = straight.join("checkpoints/step-000012");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
        "tokenizer_config.json",
    ] {
        assert!(ckpt.join(f).exists(), "{f}");
    }
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["model_type"], "bert");
    assert_eq!(cfg["architectures"][0], "BertForMaskedLM");

    // eval: masked-token loss, perplexity and accuracy, the same on every run.
    let eval = || -> Value {
        serde_json::from_str(&ok(&[
            "eval",
            "--model",
            s(&straight),
            "--data",
            s(&data),
            "--json",
        ]))
        .unwrap()
    };
    let (a, b) = (eval(), eval());
    assert_eq!(a, b);
    let (loss, ppl, acc) = (
        a["loss"].as_f64().unwrap(),
        a["perplexity"].as_f64().unwrap(),
        a["accuracy"].as_f64().unwrap(),
    );
    assert!((ppl - loss.exp()).abs() < 1e-9 * ppl);
    assert!(
        loss < (300f64).ln() && (0.0..=1.0).contains(&acc) && acc > 0.0,
        "{a}"
    );
    assert!(a["tokens"].as_u64().unwrap() > 100);

    // fill-mask: candidates in order of probability, top-k of them, for each [MASK].
    let out: Value = serde_json::from_str(&ok(&[
        "fill-mask",
        "--model",
        s(&straight),
        "--text",
        "the [MASK] of the [MASK]",
        "--top-k",
        "3",
        "--json",
    ]))
    .unwrap();
    let masks = out["masks"].as_array().unwrap();
    assert_eq!(masks.len(), 2);
    assert_eq!(masks[0]["position"], 2, "[CLS] the [MASK]: position 2");
    for m in masks {
        let c = m["candidates"].as_array().unwrap();
        assert_eq!(c.len(), 3);
        let p: Vec<f64> = c
            .iter()
            .map(|x| x["probability"].as_f64().unwrap())
            .collect();
        assert!(p[0] >= p[1] && p[1] >= p[2] && p.iter().sum::<f64>() <= 1.0 + 1e-9);
        assert!(c[0]["token"].is_string());
    }
    // The same by ids, with the mask id given for a directory without a tokenizer.
    let ids = ok(&[
        "fill-mask",
        "--model",
        s(&straight),
        "--ids",
        "2,4,3",
        "--mask-id",
        "4",
        "--json",
    ]);
    let ids: Value = serde_json::from_str(&ids).unwrap();
    assert_eq!(ids["masks"][0]["position"], 1);

    // Bad input: one line, naming what is wrong.
    let e = fails(&[
        "fill-mask",
        "--model",
        s(&straight),
        "--text",
        "no mask here",
    ]);
    assert!(e.contains("[MASK]"), "{e}");
    let x = tmp.path().join("x");
    let mut args = vec!["train", "--data", s(&data), "--out", s(&x)];
    args.extend_from_slice(TINY_BERT);
    let init = straight.display().to_string();
    args.extend_from_slice(&["--init-from", &init, "--set", "block_size=64"]);
    let e = fails(&args);
    assert!(
        e.contains("block_size 64") && e.contains("32 positions"),
        "{e}"
    );
    let e = fails(&["generate", "--model", s(&straight), "--prompt-ids", "2"]);
    assert!(e.contains("causal") && e.contains("bert"), "{e}");
}

#[test]
fn distilbert_trains_and_a_masked_lm_needs_a_bert_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let data = wordpiece_data(tmp.path());
    let run = tmp.path().join("distil");
    train(&data, &run, &["--set", "model_type=distilbert"]);
    let ckpt = run.join("checkpoints/step-000012");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "DistilBertForMaskedLM");
    let st = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st).unwrap();
    assert!(st
        .names()
        .contains(&"distilbert.transformer.layer.1.ffn.lin2.weight"));
    let vals: Vec<f64> = metrics(&run)
        .iter()
        .filter_map(|l| l.get("val_loss").and_then(Value::as_f64))
        .collect();
    assert!(vals.last().unwrap() < &(vals[0] - 0.15), "{vals:?}");

    let chars = prepare_char(tmp.path(), 20_000);
    let y = tmp.path().join("y");
    let mut args = vec!["train", "--data", s(&chars), "--out", s(&y)];
    args.extend_from_slice(TINY_BERT);
    let e = fails(&args);
    assert!(e.contains("wordpiece"), "{e}");
}
