//! tanh-GELU (HF's "gelu_new"): `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
//! The composed version spends most of its time in the backward's chain of
//! elementwise ops; here forward and backward are one pass each.

use super::{contiguous, output};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const COEF: f32 = 0.044_715;
const CHUNK: usize = 4096;

struct Gelu;
struct GeluBackward;

/// tanh-GELU of a contiguous f32 tensor, differentiable.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

/// `y = gelu(x)`.
pub fn forward(x: &[f32], y: &mut [f32]) {
    y[..x.len()]
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| forward_share(x, y));
}

/// `y = gelu(x)` on this thread (one share of a larger pass).
pub fn forward_share(x: &[f32], y: &mut [f32]) {
    super::simd(
        #[inline(always)]
        || {
            for (y, &x) in y.iter_mut().zip(x) {
                let u = SQRT_2_OVER_PI * (x + COEF * x * x * x);
                *y = 0.5 * x * (1.0 + super::fast_tanh(u));
            }
        },
    )
}

/// `d ← d · gelu′(x)`: the gradient through GELU, in place.
pub fn backward(x: &[f32], d: &mut [f32]) {
    d[..x.len()]
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(d, x)| backward_share(x, d));
}

/// [`backward`] on this thread (one share of a larger pass).
pub fn backward_share(x: &[f32], d: &mut [f32]) {
    super::simd(
        #[inline(always)]
        || {
            for (d, &x) in d.iter_mut().zip(x) {
                let u = SQRT_2_OVER_PI * (x + COEF * x * x * x);
                let t = super::fast_tanh(u);
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * COEF * x * x);
                *d *= 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du;
            }
        },
    )
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s, l, self.name())?;
        let mut y = vec![0.0f32; x.len()];
        forward(x, &mut y);
        Ok(output(y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&dy.contiguous()?, &GeluBackward)?))
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "fused-gelu-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous(s1, l1, self.name())?;
        let mut dx = contiguous(s2, l2, self.name())?.to_vec();
        backward(x, &mut dx);
        Ok(output(dx, l1.shape().clone()))
    }
}
