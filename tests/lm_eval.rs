//! EleutherAI's lm-evaluation-harness against `lmforge serve`: a multiple-choice task
//! read from a local JSONL file, scored through the server (`local-completions`, four
//! prompts a request) and by transformers on the same checkpoint (`hf`). Same accuracy,
//! log-likelihoods within 1e-4, same greedy flags. lm-eval comes from PyPI, into a venv
//! kept outside the repository and reused; the test says why when it cannot run.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// 24 four-way questions from the corpus (bench/lm-eval/make_task.py), as an lm-eval
/// task directory.
fn write_task(dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let tasks = dir.join("tasks");
    let made = Command::new("python3")
        .arg(root.join("bench/lm-eval/make_task.py"))
        .arg(root.join("data/shakespeare/input.txt"))
        .args([s(&tasks), "24"])
        .status()
        .unwrap();
    assert!(made.success());
    tasks
}

/// (accuracy, per document: each choice's (log-likelihood, is_greedy)).
fn read_results(out: &Path) -> (f64, Vec<Vec<(f64, bool)>>) {
    let files: Vec<PathBuf> = walk(out);
    let results = files
        .iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("results")
        })
        .unwrap();
    let results: Value = serde_json::from_str(&std::fs::read_to_string(results).unwrap()).unwrap();
    let acc = results["results"]["lmforge_mc"]["acc,none"]
        .as_f64()
        .unwrap();
    let samples = files
        .iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("samples")
        })
        .unwrap();
    let mut docs: Vec<(u64, Vec<(f64, bool)>)> = std::fs::read_to_string(samples)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let resps = v["resps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| {
                    let r = &r[0];
                    (r[0].as_str().unwrap().parse().unwrap(), r[1] == "True")
                })
                .collect();
            (v["doc_id"].as_u64().unwrap(), resps)
        })
        .collect();
    docs.sort_by_key(|d| d.0);
    (acc, docs.into_iter().map(|d| d.1).collect())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn lm_evaluation_harness_scores_the_server_as_transformers_scores_the_checkpoint() {
    let Some(python) = hf_python() else {
        return;
    };
    let lm_eval = python.with_file_name("lm_eval");
    let tmp = tempfile::tempdir().unwrap();
    // A small GPT-2 with GPT-2's own tokenizer, which transformers loads from the run.
    let tokenizer =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tokenizer/tokenizer.json");
    let data = prepare_with(tmp.path(), 200_000, s(&tokenizer));
    let run = tmp.path().join("run");
    ok(&[
        "train",
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--set",
        "n_layer=2",
        "--set",
        "n_embd=32",
        "--set",
        "n_head=2",
        "--set",
        "block_size=64",
        "--set",
        "max_steps=60",
        "--set",
        "lr=3e-3",
        "--set",
        "eval_every=0",
        "--set",
        "sample_tokens=0",
    ]);
    let model = lmforge::train::checkpoint::resolve_model_dir(&run).unwrap();
    let tasks = write_task(tmp.path());
    let server = Server::start(&model, &["--max-batch", "4"]);
    let evaluate = |model_args: String, backend: &str, out: &Path, extra: &[&str]| {
        let status = Command::new(&lm_eval)
            .args([
                "--model",
                backend,
                "--model_args",
                &model_args,
                "--tasks",
                "lmforge_mc",
            ])
            .args([
                "--include_path",
                s(&tasks),
                "--output_path",
                s(out),
                "--log_samples",
            ])
            .args(extra)
            .env("HF_HUB_OFFLINE", "1")
            .env("HF_DATASETS_OFFLINE", "1")
            .env("TOKENIZERS_PARALLELISM", "false")
            .status()
            .unwrap();
        assert!(status.success(), "lm_eval --model {backend} failed");
        read_results(out)
    };
    let (hf_acc, hf) = evaluate(
        format!("pretrained={}", model.display()),
        "hf",
        &tmp.path().join("hf"),
        &["--device", "cpu"],
    );
    let (api_acc, api) = evaluate(
        format!(
            "model=tiny,base_url={},tokenizer_backend=huggingface,tokenizer={}",
            server.url("/v1/completions"),
            model.display()
        ),
        "local-completions",
        &tmp.path().join("api"),
        &["--batch_size", "4"],
    );
    assert_eq!(hf.len(), 24);
    assert_eq!(api_acc, hf_acc);
    for (d, (a, h)) in api.iter().zip(&hf).enumerate() {
        for ((la, ga), (lh, gh)) in a.iter().zip(h) {
            assert!(
                (la - lh).abs() < 1e-4,
                "doc {d}: {la} through the server, {lh} in transformers"
            );
            assert_eq!(ga, gh, "doc {d}: is_greedy");
        }
    }
}
