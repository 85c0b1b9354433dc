//! `lmforge bench`: how fast a training step and KV-cache generation run here.
//!
//! A step is exactly what `train` does per optimizer step (forward, backward, clip,
//! AdamW through the trainer's own [`Stepper`]) on random tokens (for a masked LM,
//! labels at a random 15 % of the positions); the report gives the median and spread after warm-up, tokens/s, achieved
//! GFLOP/s against a matrix-product ceiling measured through the same stack, peak
//! memory and greedy generation speed. `bench/torch_ref.py` measures PyTorch the same
//! way and `bench/compare.sh` puts the two side by side.

use crate::data::Batch;
use crate::data::TokenizerSpec;
use crate::device::DeviceSpec;
use crate::generate::{generate, SamplingOptions};
use crate::model::bert::IGNORE;
use crate::model::{Gpt, GptConfig, Model, ModelConfig, Objective};
use crate::train::distributed::SingleProcess;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::precision::Precision;
use crate::train::trainer::Stepper;
use crate::train::TrainConfig;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

/// The shakespeare-char alphabet size: the vocabulary of the built-in presets.
const PRESET_VOCAB: usize = 65;

/// The built-in presets: only the keys that differ from the default preset (which
/// is `small`), embedded so `bench` works from any directory.
const PRESETS: [(&str, &str); 5] = [
    ("small", ""),
    ("medium", include_str!("../configs/bench-medium.toml")),
    (
        "bert-small",
        include_str!("../configs/bench-bert-small.toml"),
    ),
    (
        "bert-medium",
        include_str!("../configs/bench-bert-medium.toml"),
    ),
    ("gpt2", include_str!("../configs/bench-gpt2.toml")),
];

/// What to time: a model shape, a batch and the optimizer settings.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub name: String,
    pub model: ModelConfig,
    /// Sequence length of a batch row.
    pub block_size: usize,
    /// Masked LM: the share of positions with a label.
    pub mlm_probability: f64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub grad_clip: f64,
    pub adamw: AdamWConfig,
    /// The preset's `dtype` (f32, or bf16 / fp16 mixed precision).
    pub precision: Precision,
}

impl BenchSpec {
    /// A built-in preset (the shapes `bench/torch_ref.py` knows: small, medium,
    /// bert-small, bert-medium) or a TOML preset file.
    pub fn resolve(preset: &str) -> Result<Self> {
        let cfg = match PRESETS.iter().find(|(name, _)| *name == preset) {
            Some((_, text)) => TrainConfig::from_toml(text)?,
            None if preset.ends_with(".toml") => TrainConfig::from_file(Path::new(preset))?,
            None => {
                let names: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
                bail!(
                    "unknown preset {preset:?}: use {} or a .toml file",
                    names.join(", ")
                )
            }
        };
        cfg.validate()?;
        let vocab = match cfg.tokenizer {
            TokenizerSpec::Bpe(n) | TokenizerSpec::WordPiece(n) => n,
            _ => PRESET_VOCAB,
        };
        // Token ids 0–4 are BERT's specials; [PAD] is 0.
        let model = cfg.model_config(vocab, Some(0))?;
        Ok(BenchSpec {
            name: preset.to_string(),
            model,
            block_size: cfg.block_size,
            mlm_probability: cfg.mlm_probability,
            batch_size: cfg.batch_size,
            grad_accum: cfg.grad_accum,
            grad_clip: cfg.grad_clip,
            adamw: cfg.adamw(),
            precision: cfg.dtype,
        })
    }

    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.grad_accum * self.block_size
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub steps: usize,
    pub warmup: usize,
    /// Greedy tokens to generate from a one-token prompt (0: skip).
    pub generate_tokens: usize,
    pub seed: u64,
    pub device: DeviceSpec,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            steps: 20,
            warmup: 5,
            generate_tokens: 256,
            seed: 1337,
            device: DeviceSpec::Cpu,
        }
    }
}

/// The report; `--json` prints it as one object with these keys.
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub preset: String,
    pub tokens_per_s: f64,
    pub ms_per_step: f64,
    pub ms_min: f64,
    pub ms_max: f64,
    pub peak_rss_mb: f64,
    pub gflops: f64,
    pub ceiling_gflops: f64,
    pub mfu: f64,
    pub generate_tokens_per_s: Option<f64>,
}

/// Random tokens: next-token targets, or for a masked LM labels at a random
/// `mlm_probability` of the positions (the rest ignored).
fn random_batch(rng: &mut ChaCha8Rng, spec: &BenchSpec) -> Batch {
    let (rows, cols, vocab) = (spec.batch_size, spec.block_size, spec.model.vocab_size());
    let mut draw = || -> Vec<u32> {
        (0..rows * cols)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect()
    };
    let (inputs, targets) = (draw(), draw());
    let mut batch = Batch::causal(inputs, targets, rows, cols, 1);
    if spec.model.objective() == Objective::MaskedLm {
        for t in batch.targets.iter_mut() {
            if rng.random::<f64>() >= spec.mlm_probability {
                *t = IGNORE;
            }
        }
        batch.loss_positions = batch.targets.iter().filter(|&&t| t != IGNORE).count();
    }
    batch
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

/// Best GFLOP/s of an n×n by n×n matrix product in `dtype` through candle on `device`.
pub fn matmul_ceiling_gflops(
    n: usize,
    repeats: usize,
    device: &Device,
    dtype: DType,
) -> Result<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut rand = || -> Result<Tensor> {
        let data: Vec<f32> = (0..n * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Ok(Tensor::from_vec(data, (n, n), device)?.to_dtype(dtype)?)
    };
    let (a, b) = (rand()?, rand()?);
    a.matmul(&b)?;
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let t0 = Instant::now();
        a.matmul(&b)?;
        device.synchronize()?;
        best = best.min(t0.elapsed().as_secs_f64());
    }
    Ok(2.0 * (n as f64).powi(3) / best / 1e9)
}

/// Peak resident memory of this process (Linux `VmHWM`), in MB.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Greedy tokens/s of `generate` (KV cache) on a freshly initialised model of the
/// spec's shape, its context widened to fit the prompt and `tokens`.
fn generation_tokens_per_s(
    spec: &GptConfig,
    (tokens, seed): (usize, u64),
    device: &Device,
    precision: Precision,
) -> Result<f64> {
    let config = GptConfig {
        n_positions: spec.n_positions.max(tokens + 1),
        dropout: 0.0,
        ..spec.clone()
    };
    let mut model = Gpt::init(&config, seed, device)?;
    model.set_compute_dtype(precision.compute_dtype());
    time_generation(&model, tokens, seed)
}

/// Greedy tokens/s of `model` from a one-token prompt: the median of three runs of
/// `tokens` new tokens, after one untimed run.
fn time_generation(model: &Gpt, tokens: usize, seed: u64) -> Result<f64> {
    ensure!(
        tokens < model.config.n_positions,
        "--generate-tokens {tokens} does not fit the model's context of {}",
        model.config.n_positions
    );
    let opts = SamplingOptions {
        max_new_tokens: tokens,
        temperature: 1.0,
        top_k: None,
        top_p: None,
        greedy: true,
        stop_token: None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    generate(model, &[0], &opts, &mut rng)?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let out = generate(model, &[0], &opts, &mut rng)?;
        ensure!(out.len() == tokens + 1, "generation stopped early");
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(tokens as f64 / median(&times))
}

/// A GGUF's greedy generation speed with its products quantised (a quantised model
/// does not train: the training figures are NaN, `null` in JSON).
pub fn run_gguf(path: &Path, opts: &BenchOptions) -> Result<BenchReport> {
    let (model, _) = crate::model::gguf::read(path, &opts.device.open()?)?;
    let generate_tokens_per_s = Some(time_generation(&model, opts.generate_tokens, opts.seed)?);
    Ok(BenchReport {
        preset: path.display().to_string(),
        tokens_per_s: f64::NAN,
        ms_per_step: f64::NAN,
        ms_min: f64::NAN,
        ms_max: f64::NAN,
        peak_rss_mb: peak_rss_mb().unwrap_or(f64::NAN),
        gflops: f64::NAN,
        ceiling_gflops: f64::NAN,
        mfu: f64::NAN,
        generate_tokens_per_s,
    })
}

/// Times `opts.steps` training steps after `opts.warmup`, then generation.
pub fn run(spec: &BenchSpec, opts: &BenchOptions) -> Result<BenchReport> {
    ensure!(opts.steps > 0, "--steps must be at least 1");
    let device = opts.device.open()?;
    let mut model = Model::init(&spec.model, opts.seed, &device)?;
    model.set_compute_dtype(spec.precision.compute_dtype());
    let mut opt = AdamW::new(spec.adamw, &model.params())?;
    let mut stepper = Stepper::new(
        Rc::new(SingleProcess),
        (0, spec.precision),
        &model,
        &mut opt,
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut times = Vec::with_capacity(opts.steps);
    for i in 0..opts.warmup + opts.steps {
        let batches = (0..spec.grad_accum)
            .map(|_| random_batch(&mut rng, spec))
            .collect();
        let t0 = Instant::now();
        let out = stepper.step(
            &model,
            &mut opt,
            batches,
            (None, None),
            (spec.grad_clip, 1e-3),
            false,
        )?;
        // A GPU runs ahead of the host: the step ends when its work does.
        device.synchronize()?;
        ensure!(
            (out.applied || out.overflowed) && out.loss.is_finite(),
            "step {i}: non-finite loss"
        );
        if i >= opts.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let seconds = median(&times);
    let tokens_per_s = spec.tokens_per_step() as f64 / seconds;
    let gflops = spec.model.flops_per_token(spec.block_size) * tokens_per_s / 1e9;
    let peak_rss_mb = peak_rss_mb().unwrap_or(f64::NAN);
    let ceiling_gflops = matmul_ceiling_gflops(2048, 5, &device, spec.precision.compute_dtype())?;
    // Generation is a causal LM's alone.
    let generate_tokens_per_s = match (&spec.model, opts.generate_tokens) {
        (ModelConfig::Gpt(c), n) if n > 0 => Some(generation_tokens_per_s(
            c,
            (n, opts.seed),
            &device,
            spec.precision,
        )?),
        _ => None,
    };
    Ok(BenchReport {
        preset: spec.name.clone(),
        tokens_per_s,
        ms_per_step: seconds * 1e3,
        ms_min: times[0] * 1e3,
        ms_max: times[times.len() - 1] * 1e3,
        peak_rss_mb,
        gflops,
        ceiling_gflops,
        mfu: gflops / ceiling_gflops,
        generate_tokens_per_s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The GPU preset is GPT-2 124M as the issue and `torch_ref.py --preset gpt2`
    /// have it: 12 × 12 × 768, context and sequence 1024, GPT-2's vocabulary, bf16.
    #[test]
    fn gpt2_preset_is_gpt2_124m_in_bf16() {
        let spec = BenchSpec::resolve("gpt2").unwrap();
        let ModelConfig::Gpt(c) = &spec.model else {
            panic!("a GPT-2")
        };
        assert_eq!(
            (c.n_layer, c.n_head, c.n_embd, c.n_positions, c.vocab_size),
            (12, 12, 768, 1024, 50257)
        );
        assert_eq!((spec.block_size, spec.batch_size), (1024, 16));
        assert_eq!(spec.precision, Precision::Bf16);
        // 124,439,808 weights (tied head), recounted from the shape.
        let (v, t, l, c) = (50257usize, 1024usize, 12usize, 768usize);
        let weights = v * c + t * c + l * (12 * c * c + 13 * c) + 2 * c;
        assert_eq!(weights, 124_439_808);
        let per_token = spec.model.flops_per_token(1024);
        assert!((per_token - (6 * weights + 12 * l * c * t) as f64).abs() / per_token < 0.01);
        assert_eq!(
            BenchSpec::resolve("small").unwrap().precision,
            Precision::F32
        );
    }
}
