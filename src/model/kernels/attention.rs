//! Causal self-attention straight from the fused `(B, T, 3C)` projection:
//! `softmax(q kᵀ/√d + causal mask) v` per head, heads merged into `(B, T, C)`.
//!
//! Only the lower triangle of the scores is ever computed, and the `T × T`
//! probabilities are never stored: like FlashAttention, the backward recomputes each
//! row's scores from q and k. There are no split/transpose copies and no mask tensor.
//! Keys and values are held transposed per head (`d × T`) so every inner loop is an
//! axpy over contiguous memory, which vectorises without reassociating sums.

use super::{axpy, contiguous, dot, output};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct CausalAttention {
    n_head: usize,
}

struct CausalAttentionBackward {
    n_head: usize,
}

/// Attention output `(B, T, C)` from `qkv (B, T, 3C)` (q, k, v side by side, each
/// `n_head` heads wide), differentiable.
pub fn causal_attention(qkv: &Tensor, n_head: usize) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(CausalAttention { n_head })
}

/// Shapes of one call: batch, time, channels, heads, head width.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    c: usize,
    h: usize,
    d: usize,
}

impl Dims {
    fn of(l: &Layout, n_head: usize, op: &str) -> Result<Self> {
        let (b, t, c3) = l.shape().dims3()?;
        if c3 % 3 != 0 || (c3 / 3) % n_head != 0 {
            candle_core::bail!("{op}: last dimension {c3} is not 3 × a multiple of {n_head}");
        }
        let c = c3 / 3;
        Ok(Dims {
            b,
            t,
            c,
            h: n_head,
            d: c / n_head,
        })
    }

    /// Where head `h`'s `d` values of time step `i` in batch row `b` start, in a
    /// `(B, T, parts·C)` tensor whose part `part` holds the heads (qkv: 3 parts).
    fn at(&self, parts: usize, part: usize, b: usize, h: usize, i: usize) -> usize {
        (b * self.t + i) * parts * self.c + part * self.c + h * self.d
    }

    /// Head `h` of batch row `b`, part `part` of `parts`, as `T × d` rows.
    fn gather(&self, x: &[f32], parts: usize, part: usize, b: usize, h: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.t * self.d);
        for i in 0..self.t {
            let at = self.at(parts, part, b, h, i);
            out.extend_from_slice(&x[at..at + self.d]);
        }
        out
    }

    /// The inverse of [`Self::gather`]: writes `T × d` rows back into `out`.
    fn scatter(
        &self,
        rows: &[f32],
        out: &mut [f32],
        parts: usize,
        part: usize,
        b: usize,
        h: usize,
    ) {
        for i in 0..self.t {
            let at = self.at(parts, part, b, h, i);
            out[at..at + self.d].copy_from_slice(&rows[i * self.d..(i + 1) * self.d]);
        }
    }

    fn transpose(&self, rows: &[f32]) -> Vec<f32> {
        let mut out = vec![0.0f32; rows.len()];
        for i in 0..self.t {
            for k in 0..self.d {
                out[k * self.t + i] = rows[i * self.d + k];
            }
        }
        out
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// Softmax probabilities of row `i` (positions `0..=i`) into `p`.
#[inline(always)]
fn probabilities(dims: &Dims, q_row: &[f32], kt: &[f32], i: usize, p: &mut [f32]) {
    let p = &mut p[..=i];
    p.fill(0.0);
    let scale = dims.scale();
    for (k, &qk) in q_row.iter().enumerate() {
        axpy(qk * scale, &kt[k * dims.t..k * dims.t + i + 1], p);
    }
    let max = p.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0.0f32;
    for x in p.iter_mut() {
        *x = super::fast_exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    p.iter_mut().for_each(|x| *x *= inv);
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous(s, l, self.name())?;
        let dims = Dims::of(l, self.n_head, self.name())?;
        let Dims { b, t, c, h, d } = dims;
        let heads: Vec<Vec<f32>> = (0..b * h)
            .into_par_iter()
            .map(|pair| {
                let (bi, hi) = (pair / h, pair % h);
                let q = dims.gather(qkv, 3, 0, bi, hi);
                let kt = dims.transpose(&dims.gather(qkv, 3, 1, bi, hi));
                let v = dims.gather(qkv, 3, 2, bi, hi);
                let mut y = vec![0.0f32; t * d];
                let mut p = vec![0.0f32; t];
                for i in 0..t {
                    probabilities(&dims, &q[i * d..(i + 1) * d], &kt, i, &mut p);
                    let y_row = &mut y[i * d..(i + 1) * d];
                    for (j, &pj) in p[..=i].iter().enumerate() {
                        axpy(pj, &v[j * d..(j + 1) * d], y_row);
                    }
                }
                y
            })
            .collect();
        let mut out = vec![0.0f32; b * t * c];
        for (pair, y) in heads.iter().enumerate() {
            dims.scatter(y, &mut out, 1, 0, pair / h, pair % h);
        }
        Ok(output(out, (b, t, c)))
    }

    fn bwd(&self, qkv: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op3_no_bwd(
            y,
            &dy.contiguous()?,
            &CausalAttentionBackward {
                n_head: self.n_head,
            },
        )?))
    }
}

impl CustomOp3 for CausalAttentionBackward {
    fn name(&self) -> &'static str {
        "fused-causal-attention-backward"
    }

    /// Inputs qkv, y, dy; output dqkv.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous(s1, l1, self.name())?;
        let y = contiguous(s2, l2, self.name())?;
        let dy = contiguous(s3, l3, self.name())?;
        let dims = Dims::of(l1, self.n_head, self.name())?;
        let Dims { b, t, c, h, d } = dims;
        let scale = dims.scale();
        let heads: Vec<[Vec<f32>; 3]> = (0..b * h)
            .into_par_iter()
            .map(|pair| {
                let (bi, hi) = (pair / h, pair % h);
                let q = dims.gather(qkv, 3, 0, bi, hi);
                let k = dims.gather(qkv, 3, 1, bi, hi);
                let v = dims.gather(qkv, 3, 2, bi, hi);
                let (kt, vt) = (dims.transpose(&k), dims.transpose(&v));
                let y = dims.gather(y, 1, 0, bi, hi);
                let dy = dims.gather(dy, 1, 0, bi, hi);
                let (mut dq, mut dk, mut dv) = (
                    vec![0.0f32; t * d],
                    vec![0.0f32; t * d],
                    vec![0.0f32; t * d],
                );
                let (mut p, mut ds) = (vec![0.0f32; t], vec![0.0f32; t]);
                for i in 0..t {
                    let row = i * d..(i + 1) * d;
                    probabilities(&dims, &q[row.clone()], &kt, i, &mut p);
                    let dy_row = &dy[row.clone()];
                    // dp_j = dy_i · v_j; ds_j = p_j (dp_j − dy_i · y_i).
                    let ds = &mut ds[..=i];
                    ds.fill(0.0);
                    for (kk, &g) in dy_row.iter().enumerate() {
                        axpy(g, &vt[kk * t..kk * t + i + 1], ds);
                    }
                    let centre = dot(dy_row, &y[row.clone()]);
                    for (s, &pj) in ds.iter_mut().zip(&p[..=i]) {
                        *s = pj * (*s - centre) * scale;
                    }
                    let dq_row = &mut dq[row.clone()];
                    for (j, &s) in ds.iter().enumerate() {
                        axpy(s, &k[j * d..(j + 1) * d], dq_row);
                    }
                    let q_row = &q[row];
                    for (j, (&s, &pj)) in ds.iter().zip(&p[..=i]).enumerate() {
                        axpy(s, q_row, &mut dk[j * d..(j + 1) * d]);
                        axpy(pj, dy_row, &mut dv[j * d..(j + 1) * d]);
                    }
                }
                [dq, dk, dv]
            })
            .collect();
        let mut out = vec![0.0f32; b * t * 3 * c];
        for (pair, parts) in heads.iter().enumerate() {
            for (part, g) in parts.iter().enumerate() {
                dims.scatter(g, &mut out, 3, part, pair / h, pair % h);
            }
        }
        Ok(output(out, (b, t, 3 * c)))
    }
}
