//! `x @ W + b` as one op (W stored (in, out), HF's Conv1D layout). The bias (plus,
//! in the hand-written step, the residual it adds to) is written into the output
//! first and the matrix product accumulates onto it in the same `gemm` call candle's
//! matmul makes, so there is no separate bias pass and, in training, no second
//! `(rows, out)` activation kept alive for backward. The backward is two products
//! and a column sum over fixed row chunks.

use super::{contiguous3, matmul, output, packed3, unpack3, Grads3, ROWS_PER_CHUNK};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Linear;
struct LinearBackward;

/// `x (rows, in) @ weight (in, out) + bias (out)`, differentiable in all three.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear)
}

/// `y = base + x @ w + b`, with `base` (a residual stream, as wide as `y`) optional;
/// `y` may not alias `base`.
pub fn forward(x: &[f32], w: &[f32], b: &[f32], base: Option<&[f32]>, y: &mut [f32]) {
    let n_out = b.len();
    let n_in = w.len() / n_out;
    let rows = x.len() / n_in;
    let y = &mut y[..rows * n_out];
    let chunk = n_out * ROWS_PER_CHUNK;
    match base {
        Some(base) => y
            .par_chunks_mut(chunk)
            .zip(base.par_chunks(chunk))
            .for_each(|(y, base)| {
                for (y, base) in y.chunks_exact_mut(n_out).zip(base.chunks_exact(n_out)) {
                    y.iter_mut()
                        .zip(base.iter().zip(b))
                        .for_each(|(y, (r, b))| *y = r + b);
                }
            }),
        None => y.par_chunks_mut(chunk).for_each(|y| {
            y.chunks_exact_mut(n_out).for_each(|y| y.copy_from_slice(b));
        }),
    }
    matmul(
        (rows, n_out, n_in),
        (y, n_out),
        true,
        (x, 1, n_in),
        (w, 1, n_out),
        true,
    );
}

/// Given `dy`: `dx = dy Wᵀ` (overwritten), `dw += xᵀ dy`, `db += Σ_rows dy`.
pub fn backward(x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], dw: &mut [f32], db: &mut [f32]) {
    let n_out = db.len();
    let n_in = w.len() / n_out;
    let rows = x.len() / n_in;
    // The two products cost the same: one per thread beats splitting each in two.
    rayon::join(
        || {
            matmul(
                (rows, n_in, n_out),
                (dx, n_in),
                false,
                (dy, 1, n_out),
                (w, n_out, 1),
                false,
            )
        },
        || {
            matmul(
                (n_in, n_out, rows),
                (dw, n_out),
                true,
                (x, n_in, 1),
                (dy, 1, n_out),
                false,
            );
            for row in dy.chunks_exact(n_out) {
                db.iter_mut().zip(row).for_each(|(p, x)| *p += x);
            }
        },
    );
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "fused-linear"
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
        let (rows, n_in) = l1.shape().dims2()?;
        let (w_in, n_out) = l2.shape().dims2()?;
        if w_in != n_in || b.len() != n_out {
            candle_core::bail!(
                "{}: ({rows}, {n_in}) @ ({w_in}, {n_out}) + ({})",
                self.name(),
                b.len()
            );
        }
        let mut y = vec![0.0f32; rows * n_out];
        forward(x, w, b, None, &mut y);
        Ok(output(y, (rows, n_out)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Grads3> {
        let packed = x.apply_op3_no_bwd(w, &dy.contiguous()?, &LinearBackward)?;
        unpack3(&packed, [x, w, b])
    }
}

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "fused-linear-backward"
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
        let n_out = l2.shape().dims2()?.1;
        Ok(packed3((x.len(), w.len(), n_out), |dx, dw, db| {
            backward(x, w, dy, dx, dw, db)
        }))
    }
}
