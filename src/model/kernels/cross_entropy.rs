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
    let (n, v) = l1.shape().dims2()?;
    if targets.len() != n {
        candle_core::bail!("{op}: {n} rows of logits but {} targets", targets.len());
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= v) {
        candle_core::bail!("{op}: target {t} is outside the vocabulary of {v}");
    }
    Ok((logits, targets, v))
}

/// The row's maximum and log Σ exp(x − max).
#[inline(always)]
fn log_sum_exp(row: &[f32]) -> (f32, f32) {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum: f32 = row.iter().map(|&x| super::fast_exp(x - max)).sum();
    (max, sum.ln())
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
        let partials: Vec<f32> = logits
            .par_chunks(v * ROWS_PER_CHUNK)
            .zip(targets.par_chunks(ROWS_PER_CHUNK))
            .map(|(rows, targets)| {
                super::simd(|| {
                    rows.chunks_exact(v)
                        .zip(targets)
                        .map(|(row, &t)| {
                            let (max, lse) = log_sum_exp(row);
                            lse - (row[t as usize] - max)
                        })
                        .sum()
                })
            })
            .collect();
        Ok(output(vec![partials.iter().sum()], ()))
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
        grad.par_chunks_mut(v * ROWS_PER_CHUNK)
            .zip(logits.par_chunks(v * ROWS_PER_CHUNK))
            .zip(targets.par_chunks(ROWS_PER_CHUNK))
            .for_each(|((grad, rows), targets)| {
                super::simd(|| {
                    for ((g, row), &t) in grad
                        .chunks_exact_mut(v)
                        .zip(rows.chunks_exact(v))
                        .zip(targets)
                    {
                        let (max, lse) = log_sum_exp(row);
                        for (g, &x) in g.iter_mut().zip(row) {
                            *g = super::fast_exp(x - max - lse);
                        }
                        g[t as usize] -= 1.0;
                    }
                })
            });
        Ok(output(grad, l1.shape().clone()))
    }
}
