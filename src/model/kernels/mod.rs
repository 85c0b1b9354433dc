//! Fused CPU kernels as candle custom ops, each with a hand-written backward.
//!
//! One file per kernel family, as in llm.c. Each op is the fast path of a function
//! that `gpt.rs` also composes from basic tensor ops (the reference path); the tests
//! here and `tests/kernels.rs` hold the two to the same forward values and gradients.
//! The ops take f32 tensors on the CPU (the model falls back to the reference path
//! for anything else) and run in parallel over rows (attention: over heads) with
//! rayon; their loops are compiled for AVX2 and FMA where the CPU has them ([`simd`]).
//!
//! Reductions across rows (LayerNorm's weight gradient, the loss sum) go over fixed
//! chunks whose partial results are added in order, so results do not depend on the
//! number of threads or on scheduling: training stays bit-for-bit reproducible.

mod attention;
mod cross_entropy;
mod gelu;
mod layer_norm;
mod linear;
mod tile;

pub use attention::{attention, right_padded_lengths, AttentionMask};
pub use cross_entropy::cross_entropy_sum;
pub use gelu::{gelu, GeluForm};
pub use layer_norm::layer_norm;
pub use linear::{linear, WeightLayout};

/// The same kernels on plain slices, for the hand-written training step
/// ([`crate::model::backprop`]); the custom ops above are thin wrappers around them.
pub(crate) mod slices {
    pub use super::attention::{
        backward as attention_backward, forward as attention_forward,
        saved_len as attention_saved_len,
    };
    pub use super::cross_entropy::loss_and_grad as cross_entropy;
    pub use super::gelu::{
        backward as gelu_backward, backward_share as gelu_backward_share,
        erf_backward_share as gelu_erf_backward_share, erf_forward_share as gelu_erf_forward_share,
        forward_share as gelu_forward_share,
    };
    pub use super::layer_norm::{
        backward as layer_norm_backward, forward as layer_norm_forward,
        forward_share as layer_norm_share,
    };
    pub use super::linear::{backward as linear_backward, forward as linear_forward};
    pub use super::matmul;
}

use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};

/// The f32 data a contiguous tensor's layout covers.
fn contiguous<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The f32 data of a `CustomOp3`'s three contiguous inputs, in order.
fn contiguous3<'a>(op: &str, inputs: [(&'a CpuStorage, &Layout); 3]) -> Result<[&'a [f32]; 3]> {
    let [(s1, l1), (s2, l2), (s3, l3)] = inputs;
    Ok([
        contiguous(s1, l1, op)?,
        contiguous(s2, l2, op)?,
        contiguous(s3, l3, op)?,
    ])
}

/// A backward op's output `[dx | dw | db]`, one buffer with `db` `db_len` long (candle
/// ops return one tensor): `fill` writes the three parts; [`unpack3`] splits it again.
fn packed3(
    (x_len, w_len, db_len): (usize, usize, usize),
    fill: impl FnOnce(&mut [f32], &mut [f32], &mut [f32]),
) -> (CpuStorage, Shape) {
    let len = x_len + w_len + db_len;
    let mut out = vec![0.0f32; len];
    let (dx, rest) = out.split_at_mut(x_len);
    let (dw, db) = rest.split_at_mut(w_len);
    fill(dx, dw, db);
    output(out, len)
}

/// A backward op's packed `[d1 | d2 | d3]` output split into gradients shaped like
/// the three inputs `like`.
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);
fn unpack3(packed: &Tensor, like: [&Tensor; 3]) -> Result<Grads3> {
    let mut at = 0;
    let mut next = |t: &Tensor| -> Result<Option<Tensor>> {
        let n = t.elem_count();
        let g = packed.narrow(0, at, n)?.reshape(t.shape())?;
        at += n;
        Ok(Some(g))
    };
    Ok((next(like[0])?, next(like[1])?, next(like[2])?))
}

fn output(data: Vec<f32>, shape: impl Into<Shape>) -> (CpuStorage, Shape) {
    (CpuStorage::F32(data), shape.into())
}

/// Rows per unit of parallel work whose partial sums are combined in order.
const ROWS_PER_CHUNK: usize = 32;

/// `gemm`'s parallelism for one product: the rayon pool's threads, or none. (Not
/// candle's `get_num_threads`, which rereads the CPU mask from /proc and /sys on
/// every call when RAYON_NUM_THREADS is unset.)
fn parallelism(parallel: bool) -> gemm::Parallelism {
    let threads = rayon::current_num_threads();
    if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    }
}

/// `dst (m × n) [+]= lhs (m × k) · rhs (k × n)`. `dst` is row-major with row stride
/// `dst_rs`; each operand is `(data, column stride, row stride)`, so transposes and
/// strided views are free. `parallel`
/// splits the product over the pool's threads (off where the caller already runs in
/// parallel, as attention does over heads).
pub fn matmul(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (&mut [f32], usize),
    accumulate: bool,
    (lhs, lhs_cs, lhs_rs): (&[f32], usize, usize),
    (rhs, rhs_cs, rhs_rs): (&[f32], usize, usize),
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.chunks_mut(dst_rs.max(1))
                .take(m)
                .for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    let last = |rows: usize, rs: usize, cols: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst_rs >= n && dst.len() > last(m, dst_rs, n, 1));
    assert!(lhs.len() > last(m, lhs_rs, k, lhs_cs) && rhs.len() > last(k, rhs_rs, n, rhs_cs));
    // SAFETY: the asserts above keep every index gemm forms inside the three slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism(parallel),
        )
    }
}

/// Whether the fused kernels can run on `t` (f32 on the CPU).
pub fn supports(t: &Tensor) -> bool {
    t.dtype() == candle_core::DType::F32 && t.device().is_cpu()
}

/// Runs `f` compiled for AVX2 and FMA when the CPU has them (the kernels' loops then
/// run 8 lanes wide instead of SSE2's 4). No reassociation is enabled and fused
/// multiply-adds appear only where the code asks for them (`mul_add`), so every lane
/// computes the same IEEE operations in the same order: results are bit-identical on
/// either path, and on machines without AVX2 (where `mul_add` is libm's exact `fmaf`).
#[inline(always)]
fn simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        if has_avx2_fma() {
            // SAFETY: the CPU was just checked to support AVX2 and FMA.
            return unsafe { avx2(f) };
        }
    }
    f()
}

/// Whether this CPU has AVX2 and FMA (cached by std after the first call).
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `Σ a[i]·b[i]` with eight independent partial sums: the loop vectorises and the
/// summation order is fixed by this code, not by the compiler.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0.0;
    for (x, y) in ra.iter().zip(rb) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// `Σ f(x)` with eight independent partial sums (vectorises; order fixed by this code).
#[inline(always)]
fn sum_by(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    for c in chunks {
        for k in 0..8 {
            acc[k] += f(c[k]);
        }
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    sum_by(x, |v| v)
}

/// The largest element (−∞ for none), eight lanes at a time. NaN-free inputs are
/// assumed, as `f32::max`'s NaN rule is what keeps the compiler from vectorising.
#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let mut tail = f32::NEG_INFINITY;
    for &v in chunks.remainder() {
        tail = if v > tail { v } else { tail };
    }
    for c in chunks {
        for k in 0..8 {
            acc[k] = if c[k] > acc[k] { c[k] } else { acc[k] };
        }
    }
    acc.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

/// `eˣ` to about 2e-7 relative error, branch-free so loops over it vectorise (libm's
/// `expf` is a call per element). Range reduction `x = n·ln2 + r`, |r| ≤ ln2/2, a
/// degree-6 Taylor polynomial for `eʳ` (Horner, fused multiply-adds), and `2ⁿ` built
/// in the exponent bits.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x.mul_add(std::f32::consts::LOG2_E, ROUND);
    let n = shifted - ROUND;
    // n as an integer, read from the bits (`as i32` saturates, which is scalar code).
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let r = (-n).mul_add(LN2_LO, (-n).mul_add(LN2_HI, x));
    let p = r.mul_add(1.0 / 720.0, 1.0 / 120.0);
    let p = r.mul_add(p, 1.0 / 24.0);
    let p = r.mul_add(p, 1.0 / 6.0);
    let p = r.mul_add(p, 0.5);
    let p = r.mul_add(p, 1.0);
    let p = r.mul_add(p, 1.0);
    p * f32::from_bits(((n_int + 127) as u32) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_matches_libm() {
        let mut worst_exp = 0.0f64;
        for i in -200_000..=200_000 {
            let x = i as f32 * 4.35e-4; // [-87, 87]
            let e = (x as f64).exp();
            worst_exp = worst_exp.max(((fast_exp(x) as f64 - e) / e).abs());
        }
        assert!(worst_exp < 5e-7, "exp relative error {worst_exp}");
        assert_eq!(fast_exp(-1000.0), fast_exp(-87.0));
        assert!(fast_exp(1000.0).is_finite());
    }

    #[test]
    fn sum_and_max_match_the_plain_loops() {
        for n in [0, 1, 7, 8, 9, 64, 77] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37) % 11) as f32 - 5.5).collect();
            let want: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((sum(&x) as f64 - want).abs() < 1e-4, "sum of {n}");
            let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), want_max, "max of {n}");
        }
    }

    #[test]
    fn dot_matches_f64() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let want: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
        assert!((dot(&a, &b) as f64 - want).abs() < 1e-5);
    }
}
