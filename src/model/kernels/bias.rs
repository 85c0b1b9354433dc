//! `x + b` broadcast over rows. candle's backward reduces the gradient over rows with
//! a strided generic reduction (8% of a small training step in the profile); here it
//! is a column sum over fixed row chunks, added in order.

use super::{contiguous, output, ROWS_PER_CHUNK};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct BiasAdd;
struct ColumnSum;

/// `x (…, C) + bias (C)`, differentiable in both.
pub fn bias_add(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&bias.contiguous()?, BiasAdd)
}

impl CustomOp2 for BiasAdd {
    fn name(&self) -> &'static str {
        "fused-bias-add"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let b = contiguous(s2, l2, self.name())?;
        let c = b.len();
        if l1.dims().last() != Some(&c) {
            candle_core::bail!("{}: bias of {c} for rows of {:?}", self.name(), l1.dims());
        }
        let mut y = x.to_vec();
        y.par_chunks_mut(c * ROWS_PER_CHUNK).for_each(|rows| {
            for row in rows.chunks_exact_mut(c) {
                row.iter_mut().zip(b).for_each(|(y, b)| *y += b);
            }
        });
        Ok(output(y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let db = dy.contiguous()?.apply_op1_no_bwd(&ColumnSum)?;
        Ok((Some(dy.clone()), Some(db.reshape(bias.shape())?)))
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
