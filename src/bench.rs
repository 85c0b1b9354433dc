//! `lmforge bench`: how fast a training step and KV-cache generation run here.
//!
//! A step is exactly what `train` does per optimizer step (forward, backward, clip,
//! AdamW through [`accumulate_gradients`] and [`DataParallel::update`]) on random
//! tokens; the report gives the median and spread after warm-up, tokens/s, achieved
//! GFLOP/s against a matrix-product ceiling measured through the same stack, peak
//! memory and greedy generation speed. `bench/torch_ref.py` measures PyTorch the same
//! way and `bench/compare.sh` puts the two side by side.

use crate::data::Batch;
use crate::generate::{generate, SamplingOptions};
use crate::model::{Gpt, GptConfig, Model};
use crate::train::distributed::SingleProcess;
use crate::train::optim::{AdamW, AdamWConfig};
use crate::train::parallel::DataParallel;
use crate::train::trainer::accumulate_gradients;
use crate::train::TrainConfig;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::path::Path;
use std::rc::Rc;
use std::time::Instant;

/// The shakespeare-char alphabet size: the vocabulary of the built-in presets.
const PRESET_VOCAB: usize = 65;

/// What to time: a model shape, a batch and the optimizer settings.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub name: String,
    pub model: GptConfig,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub grad_clip: f64,
    pub adamw: AdamWConfig,
}

impl BenchSpec {
    /// `small` / `medium` (the shapes `bench/torch_ref.py` knows) or a TOML preset.
    pub fn resolve(preset: &str) -> Result<Self> {
        let (name, cfg) = match preset {
            "small" | "medium" => {
                let mut cfg = TrainConfig::from_toml(crate::DEFAULT_PRESET)?;
                if preset == "medium" {
                    (cfg.n_layer, cfg.n_head, cfg.n_embd) = (6, 6, 384);
                    (cfg.block_size, cfg.batch_size) = (256, 16);
                }
                (preset.to_string(), cfg)
            }
            path if path.ends_with(".toml") => {
                (path.to_string(), TrainConfig::from_file(Path::new(path))?)
            }
            other => bail!("unknown preset {other:?}: use small, medium or a .toml file"),
        };
        cfg.validate()?;
        let vocab = match cfg.tokenizer.strip_prefix("bpe:") {
            Some(n) => n
                .parse()
                .with_context(|| format!("{name}: tokenizer {:?}", cfg.tokenizer))?,
            None => PRESET_VOCAB,
        };
        let model = match cfg.model_config(vocab, None)? {
            crate::model::ModelConfig::Gpt(c) => c,
            _ => bail!("{name}: bench times gpt2 models only so far"),
        };
        Ok(BenchSpec {
            name,
            model,
            batch_size: cfg.batch_size,
            grad_accum: cfg.grad_accum,
            grad_clip: cfg.grad_clip,
            adamw: cfg.adamw(),
        })
    }

    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.grad_accum * self.model.n_positions
    }
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub steps: usize,
    pub warmup: usize,
    /// Greedy tokens to generate from a one-token prompt (0: skip).
    pub generate_tokens: usize,
    pub seed: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            steps: 20,
            warmup: 5,
            generate_tokens: 256,
            seed: 1337,
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

fn random_batch(rng: &mut ChaCha8Rng, rows: usize, cols: usize, vocab: usize) -> Batch {
    let mut draw = || {
        (0..rows * cols)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect()
    };
    Batch::causal(draw(), draw(), rows, cols, 1)
}

fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        0.5 * (sorted[n / 2 - 1] + sorted[n / 2])
    }
}

/// Best f32 GFLOP/s of an n×n by n×n matrix product through candle.
pub fn matmul_ceiling_gflops(n: usize, repeats: usize) -> Result<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut rand = || -> Result<Tensor> {
        let data: Vec<f32> = (0..n * n).map(|_| rng.random_range(-1.0..1.0)).collect();
        Ok(Tensor::from_vec(data, (n, n), &Device::Cpu)?)
    };
    let (a, b) = (rand()?, rand()?);
    a.matmul(&b)?;
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let t0 = Instant::now();
        a.matmul(&b)?;
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
fn generation_tokens_per_s(spec: &BenchSpec, tokens: usize, seed: u64) -> Result<f64> {
    let config = GptConfig {
        n_positions: spec.model.n_positions.max(tokens + 1),
        dropout: 0.0,
        ..spec.model.clone()
    };
    let model = Gpt::init(&config, seed, &Device::Cpu)?;
    let opts = SamplingOptions {
        max_new_tokens: tokens,
        temperature: 1.0,
        top_k: None,
        top_p: None,
        greedy: true,
        stop_token: None,
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    generate(&model, &[0], &opts, &mut rng)?;
    let mut times = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        let out = generate(&model, &[0], &opts, &mut rng)?;
        ensure!(out.len() == tokens + 1, "generation stopped early");
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(tokens as f64 / median(&times))
}

/// Times `opts.steps` training steps after `opts.warmup`, then generation.
pub fn run(spec: &BenchSpec, opts: &BenchOptions) -> Result<BenchReport> {
    ensure!(opts.steps > 0, "--steps must be at least 1");
    let model = Model::Gpt(Gpt::init(&spec.model, opts.seed, &Device::Cpu)?);
    let params = model.params();
    let mut opt = AdamW::new(spec.adamw, &params);
    let mut dp = DataParallel::new(Rc::new(SingleProcess), 0, &params, &mut opt);
    let mut grads: Vec<Vec<f32>> = params
        .iter()
        .map(|p| vec![0.0; p.tensor().elem_count()])
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let (rows, cols, vocab) = (
        spec.batch_size,
        spec.model.n_positions,
        spec.model.vocab_size,
    );
    let mut times = Vec::with_capacity(opts.steps);
    for i in 0..opts.warmup + opts.steps {
        let batches = (0..spec.grad_accum)
            .map(|_| random_batch(&mut rng, rows, cols, vocab))
            .collect();
        let t0 = Instant::now();
        let loss = accumulate_gradients(&model, batches, None, &mut grads)?;
        let (_, applied) = dp.update(&params, &mut opt, &mut grads, spec.grad_clip, 1e-3, true)?;
        ensure!(applied && loss.is_finite(), "step {i}: non-finite loss");
        if i >= opts.warmup {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(f64::total_cmp);
    let seconds = median(&times);
    let tokens_per_s = spec.tokens_per_step() as f64 / seconds;
    let gflops = spec.model.flops_per_token() * tokens_per_s / 1e9;
    let peak_rss_mb = peak_rss_mb().unwrap_or(f64::NAN);
    let ceiling_gflops = matmul_ceiling_gflops(2048, 5)?;
    let generate_tokens_per_s = match opts.generate_tokens {
        0 => None,
        n => Some(generation_tokens_per_s(spec, n, opts.seed)?),
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
