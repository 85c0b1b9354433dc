//! Evaluation over a whole token file: every token after the first is predicted
//! exactly once, from up to a full context of preceding tokens (non-overlapping
//! windows), so the figure does not depend on batch size.

use crate::data::TokenShard;
use crate::model::Gpt;
use anyhow::{ensure, Result};
use serde::Serialize;

#[derive(Debug, Clone, Copy, Serialize)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    pub tokens: usize,
}

/// Mean next-token loss over every token of `shard` after the first.
pub fn evaluate(model: &Gpt, shard: &TokenShard, batch_windows: usize) -> Result<EvalResult> {
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
    })
}
