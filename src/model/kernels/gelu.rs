//! GELU in both of its forms: tanh-GELU (GPT-2's, HF's "gelu_new"),
//! `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, and the exact erf form (BERT's,
//! HF's "gelu"), `x·Φ(x)` with Φ the standard normal CDF. The composed versions
//! spend most of their time in the backward's chain of elementwise ops; here forward
//! and backward are one pass each.

use super::{contiguous, output};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const COEF: f32 = 0.044_715;
const CHUNK: usize = 4096;

/// Which GELU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GeluForm {
    /// The tanh approximation (GPT-2).
    Tanh,
    /// The exact form through erf (BERT).
    Erf,
}

impl GeluForm {
    fn shares(self) -> (Share, Share) {
        match self {
            GeluForm::Tanh => (forward_share, backward_share),
            GeluForm::Erf => (erf_forward_share, erf_backward_share),
        }
    }
}

type Share = fn(&[f32], &mut [f32]);

struct Gelu(GeluForm);
struct GeluBackward(GeluForm);

/// GELU of a contiguous f32 tensor, differentiable.
pub fn gelu(x: &Tensor, form: GeluForm) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu(form))
}

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1/√(2π).
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `(Φ(x), φ(x))`: the standard normal CDF through erfc (Numerical Recipes' `erfcc`,
/// fractional error below 1.2e-7 everywhere, so the far negative tail keeps its
/// relative accuracy), and the density. One exponential each, both vectorisable.
// The coefficients as published, though f32 keeps fewer digits of some.
#[allow(clippy::excessive_precision)]
#[inline(always)]
fn normal_cdf_and_density(x: f32) -> (f32, f32) {
    let z = x.abs() * FRAC_1_SQRT_2;
    let t = 1.0 / z.mul_add(0.5, 1.0);
    let poly = [
        -0.822_152_23,
        1.488_515_87,
        -1.135_203_98,
        0.278_868_07,
        -0.186_288_06,
        0.096_784_18,
        0.374_091_96,
        1.000_023_68,
        -1.265_512_23,
    ]
    .iter()
    .fold(0.170_872_77f32, |acc, &c| acc.mul_add(t, c));
    let tail = 0.5 * t * super::fast_exp((-z).mul_add(z, poly));
    let cdf = if x < 0.0 { tail } else { 1.0 - tail };
    let density = FRAC_1_SQRT_2PI * super::fast_exp(-0.5 * x * x);
    (cdf, density)
}

/// `y = x·Φ(x)` on this thread (one share of a larger pass).
pub fn erf_forward_share(x: &[f32], y: &mut [f32]) {
    each(x, y, |x, y| *y = x * normal_cdf_and_density(x).0);
}

/// `d ← d · (Φ(x) + x·φ(x))` on this thread.
pub fn erf_backward_share(x: &[f32], d: &mut [f32]) {
    each(x, d, |x, d| {
        let (cdf, density) = normal_cdf_and_density(x);
        *d *= x.mul_add(density, cdf);
    });
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
pub fn forward(x: &[f32], y: &mut [f32], form: GeluForm) {
    in_parallel(x, y, form.shares().0);
}

/// `y = gelu(x)` (tanh form) on this thread (one share of a larger pass).
pub fn forward_share(x: &[f32], y: &mut [f32]) {
    each(x, y, |x, y| *y = x * half_one_plus_tanh(x).0);
}

/// `d ← d · gelu′(x)`: the gradient through GELU, in place.
pub fn backward(x: &[f32], d: &mut [f32], form: GeluForm) {
    in_parallel(x, d, form.shares().1);
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
fn in_parallel(x: &[f32], out: &mut [f32], share: Share) {
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
        forward(x, &mut y, self.0);
        Ok(output(y, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &dy.contiguous()?,
            &GeluBackward(self.0),
        )?))
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
        backward(x, &mut dx, self.0);
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

    #[test]
    fn erf_form_matches_float64() {
        let x: Vec<f32> = (-4000..=4000).map(|i| i as f32 * 2.5e-3).collect(); // [-10, 10]
        let mut y = vec![0.0; x.len()];
        erf_forward_share(&x, &mut y);
        let mut d = vec![1.0; x.len()];
        erf_backward_share(&x, &mut d);
        for ((&x, &y), &d) in x.iter().zip(&y).zip(&d) {
            let xf = x as f64;
            let cdf = 0.5 * libm::erfc(-xf / std::f64::consts::SQRT_2);
            let density = (-0.5 * xf * xf).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let (want_y, want_d) = (xf * cdf, cdf + xf * density);
            // Relative where gelu is tiny (the negative tail), absolute near 1 elsewhere;
            // erfc's argument x²/2 is rounded in f32, which moves the tail by x²·ε.
            let rel = 1e-6 + xf * xf * f32::EPSILON as f64;
            let tol = rel * want_y.abs().max(if x < -3.0 { 0.0 } else { 1.0 }) + 1e-36;
            assert!(
                (y as f64 - want_y).abs() <= tol,
                "gelu({x}) = {y}, want {want_y}"
            );
            assert!(
                (d as f64 - want_d).abs() <= 1e-6,
                "gelu'({x}) = {d}, want {want_d}"
            );
        }
        let plain: Vec<f32> = x.iter().map(|&x| x * normal_cdf_and_density(x).0).collect();
        assert_eq!(y, plain);
    }
}
