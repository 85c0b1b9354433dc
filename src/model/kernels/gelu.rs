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

/// `s = (1 + tanh u)/2` at `u = √(2/π)·(x + 0.044715·x³)`, and `1 − s`, computed
/// through the logistic `σ(2u)`: `1 − s = 1/(e²ᵘ + 1)`, `s = e²ᵘ·(1 − s)`. One
/// exponential, and neither `s` nor `1 − s` cancels where it is tiny.
#[inline(always)]
fn half_one_plus_tanh(x: f32) -> (f32, f32) {
    let u = SQRT_2_OVER_PI * x * (x * x).mul_add(COEF, 1.0);
    let e = super::fast_exp(2.0 * u);
    let rest = 1.0 / (e + 1.0);
    (e * rest, rest)
}

/// `y = gelu(x)`.
pub fn forward(x: &[f32], y: &mut [f32]) {
    in_parallel(x, y, forward_share);
}

/// `y = gelu(x)` on this thread (one share of a larger pass).
pub fn forward_share(x: &[f32], y: &mut [f32]) {
    each(x, y, |x, y| *y = x * half_one_plus_tanh(x).0);
}

/// `d ← d · gelu′(x)`: the gradient through GELU, in place.
pub fn backward(x: &[f32], d: &mut [f32]) {
    in_parallel(x, d, backward_share);
}

/// [`backward`] on this thread (one share of a larger pass).
pub fn backward_share(x: &[f32], d: &mut [f32]) {
    each(x, d, |x, d| {
        // With s = (1 + tanh u)/2: 1 − tanh² u = 4s(1 − s), so gelu′ = s + 2x·s(1 − s)·u′.
        let (s, rest) = half_one_plus_tanh(x);
        let du = SQRT_2_OVER_PI * (x * x).mul_add(3.0 * COEF, 1.0);
        *d *= s * (2.0 * x * rest).mul_add(du, 1.0);
    });
}

/// `share` over chunks of `x` and the matching chunks of `out`, in parallel.
fn in_parallel(x: &[f32], out: &mut [f32], share: fn(&[f32], &mut [f32])) {
    out[..x.len()]
        .par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(out, x)| share(x, out));
}

/// `f(x[i], &mut out[i])` for every element, in a loop compiled for AVX2/FMA.
#[inline(always)]
fn each(x: &[f32], out: &mut [f32], f: impl Fn(f32, &mut f32)) {
    super::simd(
        #[inline(always)]
        || {
            for (out, &x) in out.iter_mut().zip(x) {
                f(x, out);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// gelu(x), gelu′(x), and |2u| (an f32 rounding of 2u moves e²ᵘ by |2u|·ε).
    fn reference(x: f64) -> (f64, f64, f64) {
        let (s, c) = (SQRT_2_OVER_PI as f64, COEF as f64);
        let u = s * (x + c * x * x * x);
        // (1 + tanh u)/2 without the cancellation f64's tanh has where u ≪ 0.
        let half = 1.0 / (1.0 + (-2.0 * u).exp());
        let du = s * (1.0 + 3.0 * c * x * x);
        (
            x * half,
            half + 2.0 * x * half * (1.0 - half) * du,
            (2.0 * u).abs(),
        )
    }

    #[test]
    fn matches_float64_and_the_plain_loop_bit_for_bit() {
        let x: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 2.5e-3).collect(); // [-10, 10]
        let mut y = vec![0.0; x.len()];
        forward_share(&x, &mut y);
        let mut d = vec![1.0; x.len()];
        backward_share(&x, &mut d);
        for ((&x, &y), &d) in x.iter().zip(&y).zip(&d) {
            let (want_y, want_d, two_u) = reference(x as f64);
            // Relative in the far negative tail, where gelu is tiny but not zero (down
            // to the exponential's floor, e⁻⁸⁷), allowing for 2u's own rounding.
            let rel = 5e-7 + 2.0 * two_u * f32::EPSILON as f64;
            let tol = rel * want_y.abs().max(if x < -3.0 { 0.0 } else { 1.0 }) + 1e-36;
            assert!(
                (y as f64 - want_y).abs() <= tol,
                "gelu({x}) = {y}, want {want_y}"
            );
            assert!(
                (d as f64 - want_d).abs() <= 5e-7,
                "gelu'({x}) = {d}, want {want_d}"
            );
        }
        // The AVX2/FMA build of the loop and the plain one compute the same bits.
        let plain: Vec<f32> = x.iter().map(|&x| x * half_one_plus_tanh(x).0).collect();
        assert_eq!(y, plain);
    }
}
