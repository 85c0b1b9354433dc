//! The training loop (nanoGPT's, in the open): sample a batch, forward, backward,
//! accumulate, clip, AdamW, log; evaluate and checkpoint on schedule.

use super::checkpoint::{self, TrainerState};
use super::metrics::{plot_losses, read_series, MetricsLog};
use super::optim::{clip_grad_norm, AdamW, AdamWConfig};
use super::schedule::lr_at;
use super::TrainConfig;
use crate::data::prepare::{expand_inputs, prepare, DataMeta, Source};
use crate::data::{Batch, Batcher, RngState, TextTokenizer, TokenShard, TokenizerSpec};
use crate::generate::{generate, SamplingOptions};
use crate::model::{cross_entropy_sum, hf, Dropout, Gpt};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tracing::info;

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub steps: usize,
    pub val_loss: f64,
    pub wall_s: f64,
    pub tokens_per_s: f64,
    pub checkpoint: PathBuf,
    pub sample: String,
}

/// Makes sure `cfg.data` holds prepared shards, preparing them from `cfg.corpus`.
pub fn ensure_prepared(cfg: &TrainConfig) -> Result<DataMeta> {
    let dir = Path::new(&cfg.data);
    let ready = ["train.bin", "val.bin", "tokenizer.json", "meta.json"]
        .iter()
        .all(|f| dir.join(f).exists());
    if ready {
        let meta = DataMeta::load(dir)?;
        if !cfg.corpus.is_empty() && meta.tokenizer != cfg.tokenizer {
            bail!(
                "{}: prepared with tokenizer {:?} but the config asks for {:?}; remove it or set data to another directory",
                dir.display(),
                meta.tokenizer,
                cfg.tokenizer
            );
        }
        return Ok(meta);
    }
    let sources = match cfg.corpus.as_str() {
        "" => bail!(
            "{}: no prepared data (run `lmforge prepare --out {}` or set corpus)",
            dir.display(),
            dir.display()
        ),
        "embedded:shakespeare" => {
            vec![Source::Embedded {
                name: "embedded:shakespeare".into(),
                text: crate::EMBEDDED_SHAKESPEARE,
            }]
        }
        path => expand_inputs(&[PathBuf::from(path)])?,
    };
    let spec: TokenizerSpec = cfg.tokenizer.parse()?;
    info!(
        "preparing {} from {} ({} tokenizer)",
        dir.display(),
        cfg.corpus,
        cfg.tokenizer
    );
    prepare(&sources, &spec, dir, cfg.val_fraction)
}

/// Mean loss over `batches` validation batches drawn with a fixed seed, so every
/// evaluation of a run sees the same tokens.
fn estimate_val_loss(model: &Gpt, val_path: &Path, cfg: &TrainConfig) -> Result<f64> {
    let shard = TokenShard::open(val_path, None)?;
    let mut batcher = Batcher::new(
        shard,
        cfg.block_size,
        cfg.batch_size,
        cfg.seed.wrapping_add(3),
    )?;
    let mut total = 0.0;
    for _ in 0..cfg.eval_batches {
        let b = batcher.next_batch();
        let n = b.inputs.len();
        let x = Tensor::from_vec(b.inputs, (b.batch_size, b.block_size), model.device())?;
        let y = Tensor::from_vec(b.targets, n, model.device())?;
        let logits = model
            .forward(&x, None, None)?
            .reshape((n, model.config.vocab_size))?;
        total += cross_entropy_sum(&logits, &y)?.to_scalar::<f32>()? as f64 / n as f64;
    }
    Ok(total / cfg.eval_batches as f64)
}

/// Forward and backward over the micro-batches of one optimizer step. Each
/// micro-batch's summed loss is divided by the token count of the whole window, so
/// 2 × 6 rows give the same gradient as 12 rows at once. Gradients are written into
/// `grads` (one buffer per parameter); returns the window's mean loss.
pub fn accumulate_gradients(
    model: &Gpt,
    batches: Vec<Batch>,
    mut dropout: Option<&mut Dropout>,
    grads: &mut [Vec<f32>],
) -> Result<f64> {
    let device = model.device();
    let vocab = model.config.vocab_size;
    let window_tokens: usize = batches.iter().map(|b| b.inputs.len()).sum();
    grads.iter_mut().for_each(|g| g.fill(0.0));
    let params = model.params();
    let mut loss = 0.0;
    for b in batches {
        let n = b.inputs.len();
        let x = Tensor::from_vec(b.inputs, (b.batch_size, b.block_size), device)?;
        let y = Tensor::from_vec(b.targets, n, device)?;
        let logits = model
            .forward(&x, None, dropout.as_deref_mut())?
            .reshape((n, vocab))?;
        let micro = (cross_entropy_sum(&logits, &y)? / window_tokens as f64)?;
        loss += micro
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        let store = micro.backward()?;
        for (p, acc) in params
            .iter()
            .zip(grads.iter_mut())
            .filter(|(p, _)| p.trainable)
        {
            // A trainable weight without a gradient means the graph was cut (a fused op
            // without backward): fail loudly instead of training it badly.
            let g = store
                .get(p.tensor())
                .ok_or_else(|| anyhow!("no gradient reached {}", p.name))?;
            for (a, x) in acc.iter_mut().zip(
                g.flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?,
            ) {
                *a += x;
            }
        }
    }
    Ok(loss)
}

/// Runs training as `cfg` says; with `resume`, continues from the newest checkpoint.
pub fn train(cfg: &TrainConfig, resume: bool) -> Result<RunSummary> {
    cfg.validate()?;
    let mut cfg = cfg.clone();
    let device = Device::Cpu;
    let run_dir = PathBuf::from(&cfg.out_dir);
    let resume_from = if resume {
        checkpoint::latest(&run_dir)?
    } else {
        None
    };
    if resume && resume_from.is_none() {
        bail!(
            "{}: nothing to resume (no checkpoints/latest)",
            run_dir.display()
        );
    }
    // Where the weights (and possibly the tokenizer) come from.
    let source = resume_from
        .clone()
        .or_else(|| (!cfg.init_from.is_empty()).then(|| PathBuf::from(&cfg.init_from)));
    let pretrained = match &source {
        Some(dir) => Some(hf::load(dir, &device)?),
        None => None,
    };

    let meta = ensure_prepared(&cfg)?;
    let data_dir = PathBuf::from(&cfg.data);
    let data_tokenizer = TextTokenizer::from_file(&data_dir.join("tokenizer.json"))?;
    let tokenizer = match &source {
        Some(dir) => match TextTokenizer::from_model_dir(dir)? {
            Some(t) if t.vocab_size() != data_tokenizer.vocab_size() => bail!(
                "{}: data was tokenized with a {}-token tokenizer, but {} has a {}-token one; prepare it with --tokenizer {}/tokenizer.json",
                data_dir.display(),
                data_tokenizer.vocab_size(),
                dir.display(),
                t.vocab_size(),
                dir.display()
            ),
            Some(t) => t,
            None => data_tokenizer,
        },
        None => data_tokenizer,
    };
    let model_cfg = match &pretrained {
        Some(m) => {
            // The pretrained model's shape wins; record it so checkpoints say the truth.
            let c = &m.config;
            (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.bias) =
                (c.n_layer, c.n_head, c.n_embd, c.bias);
            crate::model::GptConfig {
                dropout: cfg.dropout as f32,
                ..c.clone()
            }
        }
        None => cfg.model_config(tokenizer.vocab_size()),
    };
    let vocab = model_cfg.vocab_size;
    if cfg.block_size > model_cfg.n_positions {
        bail!(
            "block_size {} is larger than the model's context of {} positions",
            cfg.block_size,
            model_cfg.n_positions
        );
    }
    if meta.vocab_size > vocab {
        bail!(
            "{}: vocabulary of {} tokens does not fit the model's {}",
            data_dir.display(),
            meta.vocab_size,
            vocab
        );
    }
    let train_shard = TokenShard::open(&data_dir.join("train.bin"), Some(vocab))?;
    let val_path = data_dir.join("val.bin");
    TokenShard::open(&val_path, Some(vocab))?;
    cfg.resolve_epochs(train_shard.len());
    let cfg = &cfg;

    std::fs::create_dir_all(&run_dir)
        .with_context(|| format!("{}: cannot create", run_dir.display()))?;
    let adam_cfg = AdamWConfig {
        beta1: cfg.beta1,
        beta2: cfg.beta2,
        eps: 1e-8,
        weight_decay: cfg.weight_decay,
    };
    let mut loader = Batcher::new(
        train_shard,
        cfg.block_size,
        cfg.batch_size,
        cfg.seed.wrapping_add(1),
    )?;
    let mut dropout = Dropout {
        p: cfg.dropout as f32,
        rng: ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(2)),
    };

    let (model, mut opt, start, mut best_val) = match (&resume_from, pretrained) {
        (Some(dir), Some(mut model)) => {
            let state = checkpoint::load_state(dir)?;
            model.config.dropout = model_cfg.dropout;
            let mut opt = AdamW::new(adam_cfg, &model.params());
            checkpoint::load_optimizer(
                &dir.join(checkpoint::OPTIMIZER_FILE),
                &model.params(),
                &mut opt,
                state.adam_t,
            )?;
            loader.restore(&state.loader);
            dropout.rng = state.dropout.to_rng();
            info!("resuming {} at step {}", dir.display(), state.step);
            (model, opt, state.step, state.best_val_loss)
        }
        (_, pretrained) => {
            let model = match pretrained {
                Some(mut m) => {
                    info!("fine-tuning {}", cfg.init_from);
                    m.config.dropout = model_cfg.dropout;
                    m
                }
                None => Gpt::init(&model_cfg, cfg.seed, &device)?,
            };
            let opt = AdamW::new(adam_cfg, &model.params());
            (model, opt, 0, None)
        }
    };
    let params = model.params();
    let metrics_path = run_dir.join("metrics.jsonl");
    let mut log = MetricsLog::open(&metrics_path, resume_from.as_ref().map(|_| start))?;
    let flops_per_token = crate::model::GptConfig {
        n_positions: cfg.block_size,
        ..model_cfg.clone()
    }
    .flops_per_token();
    info!(
        "model: {} layers, {} heads, {} dims, context {}, vocab {}; {:.2}M parameters; {:.1} MFLOP/token; MFU against a peak of {} GFLOP/s",
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.block_size,
        vocab,
        params.iter().map(|p| p.tensor().elem_count()).sum::<usize>() as f64 / 1e6,
        flops_per_token / 1e6,
        cfg.peak_gflops
    );

    let save = |model: &Gpt,
                opt: &AdamW,
                step: usize,
                loader: &Batcher,
                dropout: &Dropout,
                best: Option<f64>| {
        let state = TrainerState {
            step,
            adam_t: opt.t,
            loader: loader.state(),
            dropout: RngState::of(&dropout.rng),
            best_val_loss: best,
            config: cfg.clone(),
        };
        checkpoint::save(&run_dir, model, opt, &tokenizer, &state)
    };

    let bar = ProgressBar::new(cfg.max_steps as u64).with_position(start as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
        )
        .map_err(|e| anyhow!("{e}"))?,
    );
    let run_start = Instant::now();
    let tokens_per_step = cfg.tokens_per_step();
    let mut val_loss = f64::NAN;
    let mut last_saved = None;
    let mut tokens_seen = 0usize;
    let evaluate = |step: usize,
                    train_loss: Option<f64>,
                    tok_s: f64,
                    bar: &ProgressBar,
                    log: &mut MetricsLog|
     -> Result<f64> {
        let v = estimate_val_loss(&model, &val_path, cfg)?;
        log.write(
            &json!({"step": step, "val_loss": v, "elapsed_s": run_start.elapsed().as_secs_f64()}),
        )?;
        bar.suspend(|| match train_loss {
            Some(l) => {
                info!("step {step}: train loss {l:.4}, val loss {v:.4}, {tok_s:.0} tokens/s")
            }
            None => info!("step {step}: val loss {v:.4}"),
        });
        let (train, val) = read_series(&metrics_path)?;
        plot_losses(&run_dir.join("loss.png"), &train, &val)?;
        Ok(v)
    };
    if start == 0 && cfg.eval_every > 0 {
        val_loss = evaluate(0, None, 0.0, &bar, &mut log)?;
    }

    let mut grads: Vec<Vec<f32>> = params
        .iter()
        .map(|p| vec![0.0; p.tensor().elem_count()])
        .collect();
    let mut rate = 0.0;
    for step in start..cfg.max_steps {
        let t0 = Instant::now();
        let lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps);
        let batches: Vec<Batch> = (0..cfg.grad_accum).map(|_| loader.next_batch()).collect();
        let loss = accumulate_gradients(&model, batches, Some(&mut dropout), &mut grads)?;
        let grad_norm = clip_grad_norm(&mut grads, cfg.grad_clip);
        opt.step(&params, &grads, lr)?;

        let done = step + 1;
        let dt = t0.elapsed().as_secs_f64();
        tokens_seen += tokens_per_step;
        let tok_s = tokens_per_step as f64 / dt;
        rate = if rate == 0.0 {
            tok_s
        } else {
            0.9 * rate + 0.1 * tok_s
        };
        let mfu = flops_per_token * tok_s / (cfg.peak_gflops * 1e9);
        log.write(&json!({
            "step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s,
            "ms_per_step": dt * 1e3, "mfu": mfu, "tokens": tokens_seen,
        }))?;
        bar.set_position(done as u64);
        if done % cfg.log_every.max(1) == 0 || done == cfg.max_steps {
            bar.set_message(format!(
                "loss {loss:.4} | {:.1}k tok/s | MFU {:.1}%",
                rate / 1e3,
                100.0 * mfu
            ));
        }
        if (cfg.eval_every > 0 && done % cfg.eval_every == 0) || done == cfg.max_steps {
            val_loss = evaluate(done, Some(loss), rate, &bar, &mut log)?;
            best_val = Some(best_val.map_or(val_loss, |b: f64| b.min(val_loss)));
        }
        if (cfg.save_every > 0 && done % cfg.save_every == 0) || done == cfg.max_steps {
            last_saved = Some(save(&model, &opt, done, &loader, &dropout, best_val)?);
        }
    }
    bar.finish_and_clear();
    let checkpoint = match last_saved {
        Some(p) => p,
        None => save(
            &model,
            &opt,
            cfg.max_steps.max(start),
            &loader,
            &dropout,
            best_val,
        )?,
    };
    let wall_s = run_start.elapsed().as_secs_f64();

    let sample = sample_text(&model, &tokenizer, cfg.sample_tokens, cfg.seed)?;
    Ok(RunSummary {
        steps: cfg.max_steps,
        val_loss,
        wall_s,
        tokens_per_s: tokens_seen as f64 / wall_s,
        checkpoint,
        sample,
    })
}

/// A sample that starts a fresh document (after end-of-text), nanoGPT's sampling
/// settings: temperature 0.8, top-k 200.
fn sample_text(model: &Gpt, tokenizer: &TextTokenizer, tokens: usize, seed: u64) -> Result<String> {
    let opts = SamplingOptions {
        max_new_tokens: tokens,
        temperature: 0.8,
        top_k: Some(200),
        top_p: None,
        greedy: false,
        stop_token: Some(tokenizer.eot_id()),
    };
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let ids = generate(model, &[tokenizer.eot_id()], &opts, &mut rng)?;
    let new: Vec<u32> = ids[1..]
        .iter()
        .copied()
        .filter(|&t| t != tokenizer.eot_id())
        .collect();
    let text = tokenizer.decode(&new)?;
    Ok(text.chars().take(tokens).collect())
}
