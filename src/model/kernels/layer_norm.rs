//! Layer norm over the last dimension with weight and bias. The composed version is
//! ten tensor ops forward and about twenty backward; here each direction is one pass
//! over the rows. The backward recomputes each row's mean and 1/σ (cheaper than
//! storing them); the op returns dx, dweight and dbias packed in one buffer.

use super::{contiguous3, output, packed3, unpack3, Grads3, ROWS_PER_CHUNK};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct LayerNorm {
    eps: f32,
}

struct LayerNormBackward {
    eps: f32,
}

/// `(x − mean) / √(var + eps) · weight + bias` over the last dimension, differentiable
/// in all three inputs.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

/// Mean and 1/σ of one row (two passes: the centred variance, as PyTorch computes it).
#[inline(always)]
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = super::sum(x) / n;
    let var = super::sum_by(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `y = layer_norm(x)` row by row, rows as wide as `w`.
pub fn forward(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let c = w.len();
    y[..x.len()]
        .par_chunks_mut(c * ROWS_PER_CHUNK)
        .zip(x.par_chunks(c * ROWS_PER_CHUNK))
        .for_each(|(y, x)| forward_share(x, w, b, eps, y));
}

/// [`forward`] on this thread (one share of the rows).
pub fn forward_share(x: &[f32], w: &[f32], b: &[f32], eps: f32, y: &mut [f32]) {
    let c = w.len();
    super::simd(
        #[inline(always)]
        || {
            for (y, x) in y.chunks_exact_mut(c).zip(x.chunks_exact(c)) {
                let (mean, rstd) = moments(x, eps);
                for i in 0..c {
                    y[i] = (x[i] - mean) * rstd * w[i] + b[i];
                }
            }
        },
    )
}

/// Given `dy`: `dx += ∂/∂x` (added, so a residual stream's gradient collects it in
/// place), `dw += Σ dy·x̂`, `db += Σ dy`.
pub fn backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    eps: f32,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let c = w.len();
    // Each chunk of rows returns its [dweight | dbias] partial; added in chunk order.
    let partials: Vec<Vec<f32>> = dx[..x.len()]
        .par_chunks_mut(c * ROWS_PER_CHUNK)
        .zip(x.par_chunks(c * ROWS_PER_CHUNK))
        .zip(dy.par_chunks(c * ROWS_PER_CHUNK))
        .map(|((dx, x), dy)| {
            super::simd(
                #[inline(always)]
                || {
                    let mut part = vec![0.0f32; 2 * c];
                    let (mut xhat, mut g) = (vec![0.0f32; c], vec![0.0f32; c]);
                    for ((dx, x), dy) in dx
                        .chunks_exact_mut(c)
                        .zip(x.chunks_exact(c))
                        .zip(dy.chunks_exact(c))
                    {
                        let (mean, rstd) = moments(x, eps);
                        for i in 0..c {
                            xhat[i] = (x[i] - mean) * rstd;
                            g[i] = dy[i] * w[i];
                            part[i] += dy[i] * xhat[i];
                            part[c + i] += dy[i];
                        }
                        let mean_g = super::sum(&g) / c as f32;
                        let mean_gx = super::dot(&g, &xhat) / c as f32;
                        for i in 0..c {
                            dx[i] += rstd * (g[i] - mean_g - xhat[i] * mean_gx);
                        }
                    }
                    part
                },
            )
        })
        .collect();
    for part in &partials {
        dw.iter_mut().zip(&part[..c]).for_each(|(d, p)| *d += p);
        db.iter_mut().zip(&part[c..]).for_each(|(d, p)| *d += p);
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, w, b] = contiguous3(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let c = l1.dims().last().copied().unwrap_or(1);
        if w.len() != c || b.len() != c {
            candle_core::bail!("{}: weight/bias must have {c} values", self.name());
        }
        let mut y = vec![0.0f32; x.len()];
        forward(x, w, b, self.eps, &mut y);
        Ok(output(y, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Grads3> {
        let packed =
            x.apply_op3_no_bwd(w, &dy.contiguous()?, &LayerNormBackward { eps: self.eps })?;
        unpack3(&packed, [x, w, b])
    }
}

impl CustomOp3 for LayerNormBackward {
    fn name(&self) -> &'static str {
        "fused-layer-norm-backward"
    }

    /// Inputs x, weight, dy; output `[dx | dweight | dbias]` flattened.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let [x, w, dy] = contiguous3(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        Ok(packed3((x.len(), w.len(), w.len()), |dx, dw, db| {
            backward(x, w, dy, self.eps, dx, dw, db)
        }))
    }
}
