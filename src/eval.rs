//! Evaluation over a whole token file, the same figure at any batch size.
//!
//! A causal LM: every token after the first is predicted exactly once, from up to a
//! full context of preceding tokens (non-overlapping windows). A masked LM: every
//! `[CLS] block [SEP]` sequence of the file once, masked as in training by a
//! generator seeded from a fixed seed and the sequence's index; loss, perplexity and
//! accuracy over the masked positions.

use crate::data::labelled::{
    classification_batch, labels_to_model, read_meta, Framing, LabelledSplit,
};
use crate::data::{Batch, MaskedLmBatcher, MaskingSpec, TextTokenizer, TokenShard};
use crate::metrics::ClassificationReport;
use crate::model::{Bert, Gpt, Model};
use anyhow::{anyhow, ensure, Result};
use candle_core::{DType, Tensor, D};
use serde::Serialize;
use std::path::Path;

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
            anyhow::bail!("a sequence classifier is evaluated on a prepared classification directory (prepare --task classify), not a token file")
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
        let Some((logits, targets)) =
            model.labelled_logits(&ids, None, mask.as_ref(), &b.targets, None)?
        else {
            continue;
        };
        let labels: Vec<u32> = targets.to_vec1()?;
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

/// How `model` takes a classification example: padded with the model's
/// `pad_token_id`, cut to its context and, given a BERT `tokenizer`, wrapped in its
/// [CLS] … [SEP]. Without a tokenizer, sequences are taken as given.
pub fn framing(model: &Model, tokenizer: Option<&TextTokenizer>) -> Result<Framing> {
    Ok(match model {
        Model::Bert(m) => Framing {
            wrap: tokenizer.map(|t| text_wrap(model, t)).transpose()?.flatten(),
            pad: m.config.pad_token_id,
            max_len: m.config.max_position_embeddings,
        },
        Model::Gpt(m) => Framing {
            wrap: None,
            pad: m.config.pad_token_id.ok_or_else(|| {
                anyhow!("config.json has no pad_token_id: a GPT-2 classifier needs one to pad its batches")
            })?,
            max_len: m.config.n_positions,
        },
    })
}

/// What text is wrapped in before `model` reads it: BERT's ([CLS], [SEP]) from the
/// tokenizer; nothing for GPT-2.
pub fn text_wrap(model: &Model, tokenizer: &TextTokenizer) -> Result<Option<(u32, u32)>> {
    match model {
        Model::Bert(_) => tokenizer
            .bert_specials()
            .map(|s| Some((s.cls, s.sep)))
            .ok_or_else(|| anyhow!("a BERT model needs a BERT tokenizer ([CLS] [SEP])")),
        Model::Gpt(_) => Ok(None),
    }
}

/// A classifier's figures over a set of labelled examples.
#[derive(Debug, Clone, Serialize)]
pub struct ClassifierEval {
    /// Mean cross-entropy over the examples.
    pub loss: f64,
    pub examples: usize,
    /// The model's label names: the order of the per-class figures.
    pub labels: Vec<String>,
    #[serde(flatten)]
    pub report: ClassificationReport,
}

/// Evaluates a classifier on `split` of the classification data in `dir`, batches of
/// `batch` examples framed as `framing` says. The data's labels are matched to the
/// model's by name; one the model does not know is an error.
pub fn evaluate_classifier(
    model: &Model,
    dir: &Path,
    split: &str,
    framing: &Framing,
    batch: usize,
) -> Result<ClassifierEval> {
    let meta = read_meta(dir)?;
    let to_model = labels_to_model(&meta.labels, model.labels(), &dir.join("meta.json"))?;
    let data = LabelledSplit::open(dir, split, meta.labels.len())?;
    ensure!(!data.is_empty(), "{}: no {split} examples", dir.display());
    let batch = batch.max(1);
    let batches = (0..data.len()).step_by(batch).map(|start| {
        let examples: Vec<(Vec<u32>, u32)> = (start..data.len().min(start + batch))
            .map(|i| {
                let (ids, label) = data.example(i);
                (ids, to_model[label as usize])
            })
            .collect();
        classification_batch(&examples, framing)
    });
    classifier_figures(model, batches)
}

/// Loss and scikit-learn's figures of `model`'s most likely labels over `batches`
/// (one label per sequence, in the model's label order).
pub fn classifier_figures(
    model: &Model,
    batches: impl Iterator<Item = Batch>,
) -> Result<ClassifierEval> {
    let (mut truth, mut predicted, mut total) = (Vec::new(), Vec::new(), 0.0);
    for b in batches {
        let logits = model.classify_logits(&b, None)?;
        let labels = Tensor::from_slice(&b.targets, b.batch_size, model.device())?;
        total += crate::model::cross_entropy_sum(&logits, &labels, crate::model::Kernels::Fused)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        let best: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        predicted.extend(best.iter().map(|&p| p as usize));
        truth.extend(b.targets.iter().map(|&t| t as usize));
    }
    ensure!(!truth.is_empty(), "no examples to evaluate");
    let known = model.labels();
    Ok(ClassifierEval {
        loss: total / truth.len() as f64,
        examples: truth.len(),
        labels: known.to_vec(),
        report: ClassificationReport::new(&truth, &predicted, known.len())?,
    })
}

/// What a causal LM's continuations of `prompts` score against reference streams
/// `refs`, by each of `metrics` (sacreBLEU's BLEU or chrF). Each prompt is continued
/// greedily for up to `max_new_tokens` tokens, stopping at end-of-text; the segment
/// scored is the continuation's first line, as references are one line each.
pub fn continuation_scores(
    model: &Gpt,
    tokenizer: &TextTokenizer,
    prompts: &[String],
    refs: &[Vec<String>],
    metrics: &[crate::metrics::generation::ScoreOptions],
    max_new_tokens: usize,
) -> Result<(Vec<String>, Vec<crate::metrics::generation::Score>)> {
    use crate::generate::{generate, SamplingOptions};
    use rand::SeedableRng;
    let opts = SamplingOptions {
        max_new_tokens,
        temperature: 1.0,
        top_k: None,
        top_p: None,
        greedy: true,
        stop_token: Some(tokenizer.eot_id()),
    };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let mut hyps = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.iter().enumerate() {
        let ids = tokenizer
            .encode(prompt)
            .map_err(|e| anyhow!("prompt {}: {e}", i + 1))?;
        ensure!(!ids.is_empty(), "prompt {}: no tokens", i + 1);
        let room = model.config.n_positions.saturating_sub(ids.len());
        if room == 0 || max_new_tokens == 0 {
            hyps.push(String::new());
            continue;
        }
        let out = generate(
            model,
            &ids,
            &SamplingOptions {
                max_new_tokens: max_new_tokens.min(room),
                ..opts.clone()
            },
            &mut rng,
        )?;
        let new: Vec<u32> = out[ids.len()..]
            .iter()
            .copied()
            .filter(|&t| t != tokenizer.eot_id())
            .collect();
        let text = tokenizer.decode(&new)?;
        hyps.push(text.lines().next().unwrap_or("").to_string());
    }
    let scores = metrics
        .iter()
        .map(|m| crate::metrics::generation::corpus_score(&hyps, refs, m))
        .collect::<Result<_>>()?;
    Ok((hyps, scores))
}
