//! Helpers shared by the integration tests that drive the `lmforge` binary.
#![allow(dead_code)] // each test file uses its own subset

use candle_core::{DType, Device, Tensor};
use lmforge::model::Param;
use lmforge::train::optim::{AdamW, AdamWConfig};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository's root: LMFORGE_REPO when set (test binaries carried to the GPU
/// machine run from another checkout path, bench/gpu.sh), else where they were built.
pub fn repo() -> PathBuf {
    std::env::var_os("LMFORGE_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// Where the parity tests put their models: LMFORGE_TEST_DEVICE (bench/gpu.sh sets
/// cuda on the device), else the CPU.
pub fn test_device() -> Device {
    match std::env::var("LMFORGE_TEST_DEVICE") {
        Ok(spec) => spec
            .parse::<lmforge::device::DeviceSpec>()
            .and_then(|d| d.open())
            .unwrap(),
        Err(_) => Device::Cpu,
    }
}

/// The binary, with logs quieted to warnings.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lmforge"));
    c.env("RUST_LOG", "warn");
    c
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().unwrap()
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Checks a failed run: exit 1, no panic, exactly one `error: …` line; returns it.
pub fn one_line_error(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

/// Runs a command that must fail; returns its one-line error.
pub fn fails(args: &[&str]) -> String {
    one_line_error(&run(args))
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The first `chars` bytes of the embedded corpus (ASCII, so a char boundary).
pub fn corpus(chars: usize) -> String {
    let full = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/shakespeare/input.txt"),
    )
    .unwrap();
    full[..chars].to_string()
}

/// Char-level data prepared from the first `chars` characters, in `tmp/data`.
pub fn prepare_char(tmp: &Path, chars: usize) -> PathBuf {
    prepare_with(tmp, chars, "char")
}

/// Data prepared from the first `chars` characters with `--tokenizer tokenizer`
/// (the text in `tmp/c.txt`, the data in `tmp/data`).
pub fn prepare_with(tmp: &Path, chars: usize, tokenizer: &str) -> PathBuf {
    std::fs::create_dir_all(tmp).unwrap();
    let input = tmp.join("c.txt");
    std::fs::write(&input, corpus(chars)).unwrap();
    let data = tmp.join("data");
    ok(&[
        "prepare",
        "--input",
        s(&input),
        "--out",
        s(&data),
        "--tokenizer",
        tokenizer,
    ]);
    data
}

/// The values of `keys` in every line of a run's metrics.jsonl (null where absent):
/// what two runs that must be identical are compared by (timings left out).
pub fn metric_values(run: &Path, keys: &[&str]) -> Vec<Vec<Value>> {
    metrics(run)
        .iter()
        .map(|l| {
            keys.iter()
                .map(|k| l.get(*k).cloned().unwrap_or(Value::Null))
                .collect()
        })
        .collect()
}

/// A small model shape for fast runs.
pub const TINY_MODEL: &[&str] = &[
    "--set",
    "n_layer=2",
    "--set",
    "n_head=2",
    "--set",
    "n_embd=32",
];

/// Every line of a run's metrics.jsonl.
pub fn metrics(run: &Path) -> Vec<Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A fixture's `expected.safetensors` (golden vectors from transformers).
pub fn expected_tensors(fixture: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture.join("expected.safetensors"), &test_device()).unwrap()
}

pub fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs() as f64).fold(1e-12, f64::max);
    diff / scale
}

/// The fixtures' AdamW: betas 0.9/0.95, eps 1e-8, weight decay 0.1 on ≥ 2-D weights.
pub fn fixture_adamw(params: &[&Param]) -> AdamW {
    AdamW::new(
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        },
        params,
    )
    .unwrap()
}

/// Every gradient within 1e-4 of transformers' (`grad.<name>` in `exp`), relative to
/// its scale; a gradient that is zero in exact arithmetic (the key bias's: softmax
/// ignores a shift along the keys) must be at roundoff level on both sides.
pub fn assert_gradients_match(
    what: &str,
    params: &[&Param],
    grads: &[Vec<f32>],
    exp: &HashMap<String, Tensor>,
) {
    let largest = |v: &[f32]| v.iter().fold(0f32, |m, x| m.max(x.abs()));
    for (p, g) in params.iter().zip(grads) {
        let want = to_vec(&exp[&format!("grad.{}", p.name)]);
        if largest(&want) < 1e-6 {
            assert!(largest(g) < 1e-6, "{what} {}: {:e}", p.name, largest(g));
            continue;
        }
        let err = rel_err(g, &want);
        assert!(
            err <= 1e-4,
            "{what} {}: gradient relative error {err:e}",
            p.name
        );
    }
}

/// A file of the labelled review sentences in `data/reviews` (`imdb` or `amazon`; a
/// copy of `../shared/data/sentiment`, so a clone tests on its own).
pub fn sentiment(domain: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("data/reviews/{domain}.jsonl"))
}

/// The review sentences of `domains` prepared for classification (`prepare --task
/// classify`) with `--tokenizer tokenizer`, in `tmp/reviews`.
pub fn prepare_sentiment(tmp: &Path, domains: &[&str], tokenizer: &str) -> PathBuf {
    let data = tmp.join("reviews");
    let files: Vec<PathBuf> = domains.iter().map(|d| sentiment(d)).collect();
    let mut args = vec!["prepare", "--task", "classify", "--input"];
    args.extend(files.iter().map(|f| s(f)));
    args.extend_from_slice(&["--out", s(&data), "--tokenizer", tokenizer]);
    ok(&args);
    data
}

/// Arguments of a short classification run of a fresh 2-layer BERT.
pub fn classify_args<'a>(data: &'a Path, run: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--task",
        "classify",
        "--data",
        s(data),
        "--out",
        s(run),
        "--set",
        "model_type=bert",
        "--set",
        "block_size=48",
        "--set",
        "batch_size=8",
        "--set",
        "warmup_steps=2",
        "--set",
        "lr=5e-4",
    ];
    a.extend_from_slice(TINY_MODEL);
    a.extend_from_slice(extra);
    a
}

/// Trains a small model (`TINY_MODEL`, no evaluation, no sample) on `data` into `run`,
/// with `extra` arguments after (later `--set`s win).
pub fn train_quick(data: &Path, run: &Path, extra: &[&str]) {
    let mut a = vec!["train", "--data", s(data), "--out", s(run)];
    a.extend_from_slice(TINY_MODEL);
    a.extend_from_slice(&["--set", "eval_every=0", "--set", "sample_tokens=0"]);
    a.extend_from_slice(extra);
    ok(&a);
}

/// `lmforge quantize --model model --type qtype --out out`, as run.
pub fn quantize(model: &Path, qtype: &str, out: &Path) -> Output {
    run(&[
        "quantize",
        "--model",
        s(model),
        "--type",
        qtype,
        "--out",
        s(out),
    ])
}

/// `lmforge generate --greedy --json` of `prompt` for `tokens` new tokens.
pub fn greedy(model: &Path, prompt: &str, tokens: usize) -> Value {
    let n = tokens.to_string();
    serde_json::from_str(&ok(&[
        "generate",
        "--model",
        s(model),
        "--prompt",
        prompt,
        "--greedy",
        "--max-new-tokens",
        &n,
        "--json",
    ]))
    .unwrap()
}

/// `lmforge serve` on an ephemeral loopback port, killed when dropped.
pub struct Server {
    pub child: std::process::Child,
    pub base: String,
}

impl Server {
    pub fn start(model: &Path, extra: &[&str]) -> Server {
        let mut args = vec![
            "serve",
            "--model",
            s(model),
            "--addr",
            "127.0.0.1:0",
            "--model-name",
            "tiny",
        ];
        args.extend_from_slice(extra);
        Server::spawn(&args)
    }

    /// Any `lmforge` command that prints `… http://ADDR` on its first line and serves.
    pub fn spawn(args: &[&str]) -> Server {
        use std::io::BufRead;
        let mut child = Command::new(env!("CARGO_BIN_EXE_lmforge"))
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line.trim().rsplit(' ').next().unwrap().to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "{line}");
        Server { child, base }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A venv of PyPI packages (`~/.cache/lmforge/NAME`) kept outside the repository and
/// reused: its python once `imports` import, built on first use; `None`, with the
/// reason printed, where it cannot be built here (no python3-venv, no PyPI).
pub fn peer_venv(name: &str, packages: &[&str], imports: &str) -> Option<PathBuf> {
    let home = std::env::var("HOME").ok()?;
    let venv = Path::new(&home).join(".cache/lmforge").join(name);
    let python = venv.join("bin/python");
    let ready = |p: &Path| {
        Command::new(p)
            .args(["-c", &format!("import {imports}")])
            .status()
            .is_ok_and(|s| s.success())
    };
    if ready(&python) {
        return Some(python);
    }
    println!("installing {packages:?} into {} (minutes)", venv.display());
    let built = Command::new("python3")
        .args(["-m", "venv", s(&venv)])
        .status()
        .is_ok_and(|s| s.success())
        && Command::new(&python)
            .args(["-m", "pip", "install", "-q"])
            .args(packages)
            .status()
            .is_ok_and(|s| s.success());
    if built && ready(&python) {
        Some(python)
    } else {
        println!(
            "skipped: {packages:?} could not be installed here (no python3-venv, compiler or PyPI)"
        );
        None
    }
}

/// lm-evaluation-harness with its API and transformers backends (torch included).
pub fn hf_python() -> Option<PathBuf> {
    peer_venv(
        "lm-eval-venv",
        &["lm-eval[api,hf]"],
        "lm_eval, transformers, torch, accelerate, tenacity, aiohttp",
    )
}

/// A JSON array of numbers.
pub fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}
