//! Sampling with a KV cache: temperature, top-k, top-p, greedy; stops at end-of-text.

use crate::model::{Gpt, KvCache};
use anyhow::{ensure, Result};
use candle_core::Tensor;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone)]
pub struct SamplingOptions {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub greedy: bool,
    /// Generation ends after emitting this token (end-of-text).
    pub stop_token: Option<u32>,
}

impl SamplingOptions {
    pub fn validate(&self) -> Result<()> {
        ensure!(
            self.greedy || self.temperature > 0.0,
            "temperature must be > 0 (use --greedy for argmax)"
        );
        ensure!(self.top_k != Some(0), "top-k must be at least 1");
        ensure!(
            self.top_p.is_none_or(|p| p > 0.0 && p <= 1.0),
            "top-p must be in (0, 1]"
        );
        Ok(())
    }
}

/// A token's log-probability under the model's own distribution (before temperature,
/// top-k and top-p), and the `top.len()` most likely tokens there, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f64,
    pub top: Vec<(u32, f64)>,
}

/// Log-softmax of one row of logits (in f64) at `token`, with the `top_n` best tokens.
pub fn token_logprob(logits: &[f32], token: u32, top_n: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let log_total = max
        + logits
            .iter()
            .map(|&x| (x as f64 - max).exp())
            .sum::<f64>()
            .ln();
    let lp = |i: usize| logits[i] as f64 - log_total;
    let mut top: Vec<usize> = Vec::with_capacity(top_n + 1);
    if top_n > 0 {
        for i in 0..logits.len() {
            // Insertion into a short sorted list: the vocabulary is scanned once.
            if top.len() < top_n || logits[i] > logits[*top.last().expect("non-empty")] {
                let at = top.partition_point(|&j| logits[j] >= logits[i]);
                top.insert(at, i);
                top.truncate(top_n);
            }
        }
    }
    TokenLogprob {
        token,
        logprob: lp(token as usize),
        top: top.into_iter().map(|i| (i as u32, lp(i))).collect(),
    }
}

/// Picks the next token from one row of logits.
pub fn sample_next(logits: &[f32], opts: &SamplingOptions, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = |xs: &[f32]| {
        xs.iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
                if x > best.1 {
                    (i, x)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if opts.greedy {
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = opts.top_k {
        order.truncate(k);
    }
    let max = logits[order[0]] as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / opts.temperature).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = opts.top_p {
        // Keep the smallest prefix (by probability) whose mass reaches top_p.
        let mut mass = 0.0;
        let keep = probs.iter().position(|&p| {
            mass += p;
            mass >= top_p
        });
        let keep = keep.map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (&i, &p) in order.iter().zip(&probs) {
        r -= p;
        if r <= 0.0 {
            return i as u32;
        }
    }
    order[probs.len() - 1] as u32
}

/// Continues `prompt`; returns prompt and new tokens. Past the context length the
/// oldest tokens fall out of view (the cache is rebuilt over the last window), as in
/// nanoGPT's cropping.
pub fn generate(
    model: &Gpt,
    prompt: &[u32],
    opts: &SamplingOptions,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<u32>> {
    opts.validate()?;
    ensure!(
        !prompt.is_empty(),
        "the prompt is empty: give at least one token"
    );
    let vocab = model.config.vocab_size;
    ensure!(
        prompt.iter().all(|&t| (t as usize) < vocab),
        "prompt token ids must be below the vocabulary size {vocab}"
    );
    let ctx = model.config.n_positions;
    let device = model.device();
    let mut tokens = prompt.to_vec();
    let mut cache = KvCache::new(model.config.n_layer);
    let mut fresh: &[u32] = &tokens[tokens.len().saturating_sub(ctx)..];
    let mut fresh_owned;
    for _ in 0..opts.max_new_tokens {
        let input = Tensor::new(fresh, device)?.unsqueeze(0)?;
        let logits = model.forward(&input, Some(&mut cache), None)?;
        let last = logits
            .narrow(1, fresh.len() - 1, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let next = sample_next(&last, opts, rng);
        tokens.push(next);
        if Some(next) == opts.stop_token {
            break;
        }
        if cache.len() < ctx {
            fresh_owned = vec![next];
        } else {
            cache = KvCache::new(model.config.n_layer);
            fresh_owned = tokens[tokens.len() - ctx..].to_vec();
        }
        fresh = &fresh_owned;
    }
    Ok(tokens)
}

#[cfg(test)]
mod logprob_tests {
    use super::*;

    #[test]
    fn logprobs_are_log_softmax_with_the_best_alternatives() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5];
        let z: f64 = logits.iter().map(|&x| (x as f64).exp()).sum();
        let lp = token_logprob(&logits, 2, 3);
        assert!((lp.logprob - (-2.0 - z.ln())).abs() < 1e-12);
        // Ties keep the lower id first; the list is best first.
        assert_eq!(
            lp.top.iter().map(|t| t.0).collect::<Vec<_>>(),
            vec![1, 3, 0]
        );
        assert!((lp.top[2].1 - (1.0 - z.ln())).abs() < 1e-12);
        assert!(token_logprob(&logits, 0, 0).top.is_empty());
        let total: f64 = (0..5)
            .map(|t| token_logprob(&logits, t, 0).logprob.exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-12);
    }
}
