//! `x @ W + b` as one op (W stored (in, out), HF's Conv1D layout). The bias is
//! written into the output first and the matrix product accumulates onto it in the
//! same `gemm` call candle's matmul makes, so there is no separate bias pass and, in
//! training, no second `(rows, out)` activation kept alive for backward (with the
//! bias as its own op, autograd held both the product and the biased copy). The
//! backward is two candle matmuls and a column sum over fixed row chunks.

use super::{contiguous, contiguous3, output, ROWS_PER_CHUNK};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

struct Linear;
struct ColumnSum;

/// `x (rows, in) @ weight (in, out) + bias (out)`, differentiable in all three.
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&weight.contiguous()?, &bias.contiguous()?, Linear)
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
        let mut y: Vec<f32> = Vec::with_capacity(rows * n_out);
        for _ in 0..rows {
            y.extend_from_slice(b);
        }
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            Parallelism::Rayon(threads)
        } else {
            Parallelism::None
        };
        // SAFETY: y is rows × n_out, x rows × n_in and w n_in × n_out, all row-major
        // and contiguous, as the strides passed say.
        unsafe {
            gemm::gemm(
                rows,
                n_out,
                n_in,
                y.as_mut_ptr(),
                1,
                n_out as isize,
                true,
                x.as_ptr(),
                1,
                n_in as isize,
                w.as_ptr(),
                1,
                n_out as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                parallelism,
            )
        };
        Ok(output(y, (rows, n_out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let dx = dy.matmul(&w.t()?)?;
        let dw = x.t()?.matmul(&dy)?;
        let db = dy.apply_op1_no_bwd(&ColumnSum)?.reshape(b.shape())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp1 for ColumnSum {
    fn name(&self) -> &'static str {
        "column-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let c = l.dims().last().copied().unwrap_or(1);
        let partials: Vec<Vec<f32>> = x
            .par_chunks(c * ROWS_PER_CHUNK)
            .map(|rows| {
                let mut part = vec![0.0f32; c];
                for row in rows.chunks_exact(c) {
                    part.iter_mut().zip(row).for_each(|(p, x)| *p += x);
                }
                part
            })
            .collect();
        let mut sum = vec![0.0f32; c];
        for part in &partials {
            sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
        }
        Ok(output(sum, c))
    }
}
