//! Device-generic training and mixed precision (issue 23, ADR 014), on the CPU: the
//! tensor path a GPU runs against the host fast path, bf16 and fp16 steps against
//! f32, fp16's loss scaling, and `--device` / `dtype` at the command line.

mod common;

use candle_core::{DType, Device};
use common::{ok, one_line_error, run};
use lmforge::data::Batch;
use lmforge::model::{GptConfig, Kernels, Model, ModelConfig};
use lmforge::train::distributed::SingleProcess;
use lmforge::train::optim::{AdamW, AdamWConfig, Moments};
use lmforge::train::precision::{LossScaler, Precision};
use lmforge::train::trainer::{StepOutcome, Stepper};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::rc::Rc;

const VOCAB: usize = 96;
const ROWS: usize = 4;
const SEQ: usize = 32;

fn config() -> ModelConfig {
    ModelConfig::Gpt(GptConfig {
        vocab_size: VOCAB,
        n_positions: SEQ,
        n_embd: 64,
        n_layer: 2,
        n_head: 4,
        layer_norm_epsilon: 1e-5,
        bias: true,
        dropout: 0.0,
        labels: Vec::new(),
        pad_token_id: None,
    })
}

/// Batches with learnable structure (each token predicts the next of a fixed cycle,
/// with noise), so ten steps move the loss well away from ln(vocab).
fn batches(steps: usize) -> Vec<Batch> {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    (0..steps)
        .map(|_| {
            let mut ids = Vec::with_capacity(ROWS * (SEQ + 1));
            for _ in 0..ROWS {
                let start = rng.random_range(0..VOCAB as u32);
                for i in 0..=SEQ as u32 {
                    let noise = rng.random_range(0..8u32) == 0;
                    ids.push(if noise {
                        rng.random_range(0..VOCAB as u32)
                    } else {
                        (start + 3 * i) % VOCAB as u32
                    });
                }
            }
            let (mut inputs, mut targets) = (Vec::new(), Vec::new());
            for row in ids.chunks(SEQ + 1) {
                inputs.extend_from_slice(&row[..SEQ]);
                targets.extend_from_slice(&row[1..]);
            }
            Batch::causal(inputs, targets, ROWS, SEQ, 1)
        })
        .collect()
}

struct Run {
    losses: Vec<f64>,
    model: Model,
    opt: AdamW,
    stepper: Stepper,
}

fn adamw() -> AdamWConfig {
    AdamWConfig {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    }
}

fn start(precision: Precision, tensor_path: bool) -> Run {
    let mut model = Model::init(&config(), 1337, &Device::Cpu).unwrap();
    model.set_compute_dtype(precision.compute_dtype());
    if tensor_path {
        // Autograd on both sides of the comparison (not the hand-written step), so
        // only the gradient buffers, clipping and AdamW differ.
        model.set_kernels(Kernels::Composed);
    }
    let mut opt = AdamW::new(adamw(), &model.params()).unwrap();
    let mut stepper =
        Stepper::new(Rc::new(SingleProcess), (0, precision), &model, &mut opt).unwrap();
    if tensor_path {
        stepper.use_tensor_path(&model, &mut opt).unwrap();
    }
    Run {
        losses: Vec::new(),
        model,
        opt,
        stepper,
    }
}

fn step(run: &mut Run, batch: Batch) -> StepOutcome {
    run.stepper
        .step(
            &run.model,
            &mut run.opt,
            vec![batch],
            (None, None),
            (1.0, 3e-3),
            false,
        )
        .unwrap()
}

fn train(run: &mut Run, batches: Vec<Batch>) {
    for b in batches {
        let out = step(run, b);
        assert!(out.applied, "step {} not applied", run.losses.len());
        run.losses.push(out.loss);
    }
}

fn weights(model: &Model) -> Vec<Vec<f32>> {
    model
        .params()
        .iter()
        .map(|p| p.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect()
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// What a GPU runs — gradients summed as tensors, the clip norm and AdamW in tensor
/// operations — gives the CPU fast path's losses and weights.
#[test]
fn the_tensor_path_trains_like_the_host_path() {
    let (mut host, mut tensors) = (start(Precision::F32, false), start(Precision::F32, true));
    host.model.set_kernels(Kernels::Composed);
    train(&mut host, batches(4));
    train(&mut tensors, batches(4));
    assert!(tensors
        .opt
        .moments
        .iter()
        .all(|m| matches!(m, Moments::Device { .. })));
    for (a, b) in host.losses.iter().zip(&tensors.losses) {
        assert!(relative(*b, *a) < 1e-5, "loss {b} vs {a}");
    }
    let params = host.model.params();
    for ((a, b), p) in weights(&host.model)
        .iter()
        .zip(&weights(&tensors.model))
        .zip(params)
    {
        // The key bias's gradient is zero in exact arithmetic (softmax ignores a shift
        // along the keys): roundoff, which AdamW scales up to full-size steps.
        let keys = match p.name.ends_with("attn.c_attn.bias") {
            true => a.len() / 3..2 * a.len() / 3,
            false => 0..0,
        };
        for (_, (x, y)) in a
            .iter()
            .zip(b)
            .enumerate()
            .filter(|(i, _)| !keys.contains(i))
        {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-2), "{x} vs {y}");
        }
    }
}

/// Ten bf16 (and fp16) steps stay within 1e-2 relative of f32's losses, the loss
/// falls, and the weights, gradients and AdamW state stay f32.
#[test]
fn ten_mixed_precision_steps_track_f32() {
    let mut reference = start(Precision::F32, false);
    train(&mut reference, batches(10));
    let first = reference.losses[0];
    assert!(reference.losses[9] < first - 0.3, "{:?}", reference.losses);
    for precision in [Precision::Bf16, Precision::Fp16] {
        let mut run = start(precision, false);
        train(&mut run, batches(10));
        for (i, (a, b)) in reference.losses.iter().zip(&run.losses).enumerate() {
            assert!(
                relative(*b, *a) < 1e-2,
                "{precision} step {i}: {b} vs f32 {a}"
            );
        }
        // Not the f32 numbers in disguise: the compute really was narrower.
        assert!(run
            .losses
            .iter()
            .zip(&reference.losses)
            .any(|(a, b)| a != b));
        assert!(run
            .model
            .params()
            .iter()
            .all(|p| p.tensor().dtype() == DType::F32));
        assert_eq!(run.model.dtype(), DType::F32);
        assert!(run
            .opt
            .moments
            .iter()
            .all(|m| matches!(m, Moments::Host { .. } | Moments::Empty)));
        assert_eq!(
            run.stepper.loss_scaler.is_some(),
            precision == Precision::Fp16
        );
    }
}

/// A loss scale too large for fp16 overflows its gradients: the step is skipped, not
/// counted as divergence, the scale halves, the weights stay; the next good step applies.
#[test]
fn fp16_overflow_skips_the_step_and_halves_the_scale() {
    let mut run = start(Precision::Fp16, false);
    run.stepper.loss_scaler = Some(LossScaler {
        scale: 1e30,
        good_steps: 5,
    });
    let before = weights(&run.model);
    let out = step(&mut run, batches(1).remove(0));
    assert!(!out.applied && out.overflowed && out.loss.is_finite());
    assert_eq!(
        run.stepper.loss_scaler,
        Some(LossScaler {
            scale: 5e29,
            good_steps: 0
        })
    );
    assert_eq!(weights(&run.model), before);
    assert_eq!(run.opt.t, 0);
    run.stepper.loss_scaler = Some(LossScaler::new());
    let out = step(&mut run, batches(1).remove(0));
    assert!(out.applied && !out.overflowed);
    assert_eq!(run.stepper.loss_scaler.unwrap().good_steps, 1);
    assert_ne!(weights(&run.model), before);
}

/// `--set dtype=bf16` trains from the command line; a checkpoint of it resumes in
/// f32 with `--set dtype=f32`; fp16 logs its loss scale; bad names are one-line errors.
#[test]
fn dtype_and_device_at_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = common::prepare_char(dir.path(), 20_000);
    let out = dir.path().join("run");
    let (data_s, out_s) = (data.to_str().unwrap(), out.to_str().unwrap());
    let small = [
        common::TINY_MODEL,
        &[
            "--set",
            "block_size=32",
            "--set",
            "batch_size=4",
            "--set",
            "eval_every=4",
            "--set",
            "eval_batches=2",
            "--set",
            "sample_tokens=8",
            "--set",
            "log_every=1",
        ],
    ]
    .concat();
    let train = |out: &str, extra: &[&str]| {
        let mut args = vec!["train", "--data", data_s, "--out", out];
        args.extend_from_slice(&small);
        args.extend_from_slice(extra);
        ok(&args)
    };
    train(
        out_s,
        &[
            "--set",
            "max_steps=4",
            "--set",
            "dtype=bf16",
            "--device",
            "cpu",
        ],
    );
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let steps: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|v: &serde_json::Value| v.get("loss").is_some() && v.get("step").is_some())
        .collect();
    assert_eq!(steps.len(), 4, "{metrics}");
    assert!(steps
        .iter()
        .all(|v| v["loss"].as_f64().unwrap().is_finite()));
    assert!(steps.iter().all(|v| v.get("loss_scale").is_none()));
    let checkpoint = out.join("checkpoints/step-000004");
    let state = std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["config"]["dtype"], "bf16");
    assert_eq!(state["config"]["device"], "cpu");
    // The weights it wrote are the f32 master weights; the run resumes in f32.
    let weights =
        candle_core::safetensors::load(checkpoint.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(weights.values().all(|t| t.dtype() == DType::F32));
    train(
        out_s,
        &["--resume", "--set", "max_steps=6", "--set", "dtype=f32"],
    );
    // fp16 records its scale on every step line.
    let fp16_out = dir.path().join("fp16");
    train(
        fp16_out.to_str().unwrap(),
        &["--set", "max_steps=2", "--set", "dtype=fp16"],
    );
    let fp16 = std::fs::read_to_string(fp16_out.join("metrics.jsonl")).unwrap();
    assert!(fp16.contains("\"loss_scale\":65536.0"), "{fp16}");

    let e = one_line_error(&run(&["train", "--data", data_s, "--set", "dtype=int8"]));
    assert!(e.contains("expected f32, bf16 or fp16"), "{e}");
    // A bad --device is an argument error (clap's: exit 2, with the usage hint).
    let bad = run(&["train", "--data", data_s, "--device", "tpu"]);
    let e = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{e}");
    assert!(
        e.contains("expected cpu, cuda or cuda:N") && !e.contains("panicked"),
        "{e}"
    );
    // This build has no GPU (CI), or no driver: cuda is a one-line error everywhere.
    if !cfg!(feature = "cuda") {
        for args in [
            vec![
                "train", "--data", data_s, "--out", out_s, "--device", "cuda",
            ],
            vec![
                "generate", "--model", out_s, "--device", "cuda:1", "--prompt", "a",
            ],
            vec![
                "bench", "--preset", "small", "--device", "cuda", "--steps", "1",
            ],
            vec![
                "eval", "--model", out_s, "--data", data_s, "--device", "cuda",
            ],
            vec!["serve", "--model", out_s, "--device", "cuda"],
        ] {
            let e = one_line_error(&run(&args));
            assert!(e.contains("built without CUDA"), "{args:?}: {e}");
        }
    }
}
