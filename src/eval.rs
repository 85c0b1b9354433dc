//! Evaluation over a whole token file, the same figure at any batch size.
//!
//! A causal LM: every token after the first is predicted exactly once, from up to a
//! full context of preceding tokens (non-overlapping windows). A masked LM: every
//! `[CLS] block [SEP]` sequence of the file once, masked as in training by a
//! generator seeded from a fixed seed and the sequence's index; loss, perplexity and
//! accuracy over the masked positions.

use crate::data::{MaskedLmBatcher, MaskingSpec, TextTokenizer, TokenShard};
use crate::model::{Bert, Gpt, Model};
use anyhow::{anyhow, ensure, Result};
use candle_core::{DType, Tensor, D};
use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    /// Tokens of the file (causal LM) or masked positions scored (masked LM).
    pub tokens: usize,
    /// Masked LM: the share of masked positions whose most likely token is right.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
}

/// The seed evaluation masks with, whatever the run's seed.
pub const EVAL_MASK_SEED: u64 = 0x5EED;

/// Evaluates `model` over `shard` (`tokenizer`: a masked LM's special tokens).
pub fn evaluate(
    model: &Model,
    shard: TokenShard,
    tokenizer: Option<&TextTokenizer>,
    batch: usize,
) -> Result<EvalResult> {
    match model {
        Model::Gpt(m) => evaluate_causal(m, &shard, batch),
        Model::Bert(m) if m.config.is_classifier() => {
            anyhow::bail!("evaluating a sequence classifier on a token file is not supported yet")
        }
        Model::Bert(m) => {
            let specials = tokenizer.and_then(|t| t.bert_specials()).ok_or_else(|| {
                anyhow!("a masked LM is evaluated with its tokenizer's [PAD] [CLS] [SEP] [MASK] ids: the model directory needs vocab.txt or tokenizer.json")
            })?;
            let spec = MaskingSpec {
                specials,
                vocab_size: m.config.vocab_size,
                probability: 0.15,
            };
            let seq = m.config.max_position_embeddings;
            evaluate_masked(m, &MaskedLmBatcher::new(shard, seq, batch, spec, 0)?)
        }
    }
}

/// Masked-token loss and accuracy over every sequence of `batches`.
fn evaluate_masked(model: &Bert, batches: &MaskedLmBatcher) -> Result<EvalResult> {
    let (mut total, mut right, mut count) = (0.0, 0usize, 0usize);
    let device = model.device();
    for b in batches.every_sequence(EVAL_MASK_SEED) {
        let shape = (b.batch_size, b.block_size);
        let ids = Tensor::from_slice(&b.inputs, shape, device)?;
        let mask = b
            .attention_mask
            .as_ref()
            .map(|m| Tensor::from_slice(m, shape, device))
            .transpose()?;
        let hidden = model.hidden_states(&ids, None, mask.as_ref(), None)?;
        let (rows, labels): (Vec<u32>, Vec<u32>) = b
            .targets
            .iter()
            .enumerate()
            .filter(|(_, &l)| l != crate::model::bert::IGNORE)
            .map(|(i, &l)| (i as u32, l))
            .unzip();
        if rows.is_empty() {
            continue;
        }
        let picked = hidden
            .reshape((b.batch_size * b.block_size, model.config.hidden_size))?
            .index_select(&Tensor::new(rows, device)?, 0)?;
        let logits = model.mlm_logits(&picked)?;
        let targets = Tensor::new(labels.as_slice(), device)?;
        total += crate::model::cross_entropy_sum(&logits, &targets, model.kernels)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let best: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        right += best.iter().zip(&labels).filter(|(a, b)| a == b).count();
        count += labels.len();
    }
    ensure!(count > 0, "no masked positions to evaluate");
    let loss = total / count as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens: count,
        accuracy: Some(right as f64 / count as f64),
    })
}

/// Mean next-token loss over every token of `shard` after the first.
fn evaluate_causal(model: &Gpt, shard: &TokenShard, batch_windows: usize) -> Result<EvalResult> {
    let n = shard.len();
    ensure!(
        n >= 2,
        "{}: needs at least 2 tokens to evaluate, has {n}",
        shard.path().display()
    );
    let ctx = model.config.n_positions;
    let predicted = n - 1;
    let full = predicted / ctx;
    let mut total = 0.0;
    let mut w = 0;
    while w < full {
        let rows = batch_windows.min(full - w);
        let mut inputs = Vec::with_capacity(rows * ctx);
        let mut targets = Vec::with_capacity(rows * ctx);
        for r in 0..rows {
            let start = (w + r) * ctx;
            let window = shard.slice(start, start + ctx + 1);
            inputs.extend_from_slice(&window[..ctx]);
            targets.extend_from_slice(&window[1..]);
        }
        total += model.score(&inputs, &targets, rows)?;
        w += rows;
    }
    let rest = predicted - full * ctx;
    if rest > 0 {
        let window = shard.slice(full * ctx, n);
        total += model.score(&window[..rest], &window[1..], 1)?;
    }
    let loss = total / predicted as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens: n,
        accuracy: None,
    })
}
