//! Softmax + cross-entropy in one pass per row, summed over rows. The backward is
//! `softmax(logits) − onehot(target)`, computed from the logits again; no
//! probabilities are kept between the passes.

use super::{output, ROWS_PER_CHUNK};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct CrossEntropySum;
struct CrossEntropyBackward;

/// Σ over rows of −log softmax(logits)[target], for `logits (N, V)` f32 and
/// `targets (N)` u32; differentiable in the logits.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    logits
        .contiguous()?
        .apply_op2(&targets.contiguous()?, CrossEntropySum)
}

fn inputs<'a>(
    op: &str,
    s1: &'a CpuStorage,
    l1: &Layout,
    s2: &'a CpuStorage,
    l2: &Layout,
) -> Result<(&'a [f32], &'a [u32], usize)> {
    let logits = super::contiguous(s1, l1, op)?;
    let Some((a, b)) = l2.contiguous_offsets() else {
        candle_core::bail!("{op}: targets must be contiguous")
    };
    let targets = &s2.as_slice::<u32>()?[a..b];
    let (_, v) = l1.shape().dims2()?;
    Ok((logits, targets, v))
}

/// The row's maximum and log Σ exp(x − max).
#[inline(always)]
fn log_sum_exp(row: &[f32], scratch: &mut [f32]) -> (f32, f32) {
    let max = super::max(row);
    let e = &mut scratch[..row.len()];
    e.iter_mut()
        .zip(row)
        .for_each(|(e, &x)| *e = super::fast_exp(x - max));
    (max, super::sum(e).ln())
}

/// Σ over the rows of `logits (N, vocab)` of −log softmax(row)[target]; with `grad`
/// `(buffer, scale)` also writes `scale · (softmax(row) − onehot(target))` into the
/// buffer, in the same pass.
pub fn loss_and_grad(
    logits: &[f32],
    targets: &[u32],
    vocab: usize,
    grad: Option<(&mut [f32], f32)>,
) -> Result<f32> {
    let n = logits.len() / vocab.max(1);
    if targets.len() != n {
        candle_core::bail!(
            "cross-entropy: {n} rows of logits but {} targets",
            targets.len()
        );
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("cross-entropy: target {t} is outside the vocabulary of {vocab}");
    }
    let chunk = vocab * ROWS_PER_CHUNK;
    let rows = |rows: &[f32], targets: &[u32], mut grad: Option<(&mut [f32], f32)>| {
        super::simd(
            #[inline(always)]
            || {
                let mut loss = 0.0f32;
                let mut scratch = vec![0.0f32; vocab];
                for (r, (row, &t)) in rows.chunks_exact(vocab).zip(targets).enumerate() {
                    let (max, lse) = log_sum_exp(row, &mut scratch);
                    loss += lse - (row[t as usize] - max);
                    if let Some((g, scale)) = grad.as_mut() {
                        let g = &mut g[r * vocab..(r + 1) * vocab];
                        for (g, &x) in g.iter_mut().zip(row) {
                            *g = super::fast_exp(x - max - lse) * *scale;
                        }
                        g[t as usize] -= *scale;
                    }
                }
                loss
            },
        )
    };
    let partials: Vec<f32> = match grad {
        Some((g, scale)) => g[..logits.len()]
            .par_chunks_mut(chunk)
            .zip(logits.par_chunks(chunk))
            .zip(targets.par_chunks(ROWS_PER_CHUNK))
            .map(|((g, l), t)| rows(l, t, Some((g, scale))))
            .collect(),
        None => logits
            .par_chunks(chunk)
            .zip(targets.par_chunks(ROWS_PER_CHUNK))
            .map(|(l, t)| rows(l, t, None))
            .collect(),
    };
    Ok(partials.iter().sum())
}

impl CustomOp2 for CrossEntropySum {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, targets, v) = inputs(self.name(), s1, l1, s2, l2)?;
        Ok(output(vec![loss_and_grad(logits, targets, v, None)?], ()))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _loss: &Tensor,
        dloss: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = logits.apply_op2_no_bwd(targets, &CrossEntropyBackward)?;
        Ok((Some(g.broadcast_mul(dloss)?), None))
    }
}

impl CustomOp2 for CrossEntropyBackward {
    fn name(&self) -> &'static str {
        "fused-cross-entropy-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (logits, targets, v) = inputs(self.name(), s1, l1, s2, l2)?;
        let mut grad = vec![0.0f32; logits.len()];
        loss_and_grad(logits, targets, v, Some((&mut grad, 1.0)))?;
        Ok(output(grad, l1.shape().clone()))
    }
}
