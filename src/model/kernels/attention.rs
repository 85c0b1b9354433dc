//! Self-attention straight from the fused `(B, T, 3C)` projection:
//! `softmax(q kᵀ/√d + mask) v` per head, heads merged into `(B, T, C)`. The mask is
//! causal (GPT-2) or bidirectional over each sequence's first `n` keys, the rest
//! being right padding (BERT's key-padding mask): [`AttentionMask`].
//!
//! Per head, queries go in tiles of [`MR`] rows; a tile's scores are computed only
//! against the keys it may see — up to its last row when causal, so what lies above
//! the diagonal (half of the `T × T` scores) is never computed, and never the
//! padding keys. The hand-written training step lets the
//! forward keep the probabilities (`B·H·T²` floats, small beside the activations at
//! GPT-2's block sizes); the autograd op keeps none, and its backward recomputes them
//! tile by tile from q and k (as FlashAttention does) into a per-thread `T × T`
//! buffer. Either way the backward holds a head's whole P, so dK and dV are products
//! over all the query rows that see a key tile at once.
//!
//! The products are [`tile::product`](super::tile::product)'s register tiles: they
//! read q, v, y, dy and the transposes of P and dS in place through strides; only K
//! (forward) and V (backward) are copied, transposed, once per head. No mask
//! tensor, no head split copies; each head's output goes to a buffer kept across
//! calls and is merged into `(B, T, ·)` in parallel. Softmax, masking and
//! `dS = P ∘ (dP − rowsum(dY ∘ Y))` are plain vectorised loops.

use super::tile::{product, MR};
use super::{contiguous, contiguous3, dot, output};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

/// One head's rows of an activation: row `i` starts at `data[i * stride]`.
type View<'a> = (&'a [f32], usize);

/// Which keys each query sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttentionMask {
    /// Row i sees keys 0..=i.
    Causal,
    /// Every row of sequence b sees keys `0..lengths[b]`; the others are padding.
    KeyLengths(Vec<usize>),
}

impl AttentionMask {
    fn span(&self, b: usize) -> Span {
        match self {
            AttentionMask::Causal => Span::Causal,
            AttentionMask::KeyLengths(n) => Span::Keys(n[b]),
        }
    }

    fn check(&self, b: usize, t: usize) -> Result<()> {
        if let AttentionMask::KeyLengths(n) = self {
            if n.len() != b || n.iter().any(|&n| n == 0 || n > t) {
                candle_core::bail!("attention: key lengths {n:?} do not fit {b} sequences of {t}");
            }
        }
        Ok(())
    }
}

/// Each sequence's number of real tokens, where an attention mask (`rows × t`, 1 =
/// attend, 0 = padding) is ones then zeros with at least one token: what
/// [`AttentionMask::KeyLengths`] takes. `None` for any other mask.
pub fn right_padded_lengths(mask: &[u32], t: usize) -> Option<Vec<usize>> {
    if t == 0 || !mask.len().is_multiple_of(t) {
        return None;
    }
    mask.chunks_exact(t)
        .map(|row| {
            let n = row.iter().take_while(|&&m| m == 1).count();
            (n > 0 && row[n..].iter().all(|&m| m == 0)).then_some(n)
        })
        .collect()
}

/// The keys of one sequence, as the tiles see them.
#[derive(Clone, Copy)]
enum Span {
    Causal,
    Keys(usize),
}

impl Span {
    /// Keys a tile of query rows ending (exclusive) at `i1` reads.
    fn keys(self, i1: usize) -> usize {
        match self {
            Span::Causal => i1,
            Span::Keys(n) => n,
        }
    }

    /// Keys query row `i` attends to (a prefix of the keys).
    fn live(self, i: usize) -> usize {
        match self {
            Span::Causal => i + 1,
            Span::Keys(n) => n,
        }
    }

    /// The first query row that sees key `j`.
    fn first_row(self, j: usize) -> usize {
        match self {
            Span::Causal => j,
            Span::Keys(_) => 0,
        }
    }

    /// Keys that any row sees, of a sequence of `t`.
    fn key_end(self, t: usize) -> usize {
        match self {
            Span::Causal => t,
            Span::Keys(n) => n,
        }
    }
}

struct Attention {
    n_head: usize,
    mask: AttentionMask,
}

struct AttentionBackward {
    n_head: usize,
    mask: AttentionMask,
}

/// Attention output `(B, T, C)` from `qkv (B, T, 3C)` (q, k, v side by side, each
/// `n_head` heads wide) under `mask`, differentiable.
pub fn attention(qkv: &Tensor, n_head: usize, mask: AttentionMask) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(Attention { n_head, mask })
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
        Self::new(b, t, c3, n_head, op)
    }

    fn new(b: usize, t: usize, c3: usize, n_head: usize, op: &str) -> Result<Self> {
        if n_head == 0 || !c3.is_multiple_of(3) || !(c3 / 3).is_multiple_of(n_head) {
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

    /// Head `h` of batch row `b`, part `part` of `parts`, read in place.
    fn view<'a>(&self, x: &'a [f32], parts: usize, part: usize, b: usize, h: usize) -> View<'a> {
        (&x[self.at(parts, part, b, h, 0)..], parts * self.c)
    }

    /// Writes each head's `P` blocks of `T × d` rows (`staged`, in `(B, H, P, T, d)`
    /// order) into their columns of `out (B, T, P·C)`, a batch row per task: in
    /// parallel, so no thread idles (and falls asleep) through a serial copy between
    /// two parallel kernels.
    fn gather<const P: usize>(&self, staged: &[f32], out: &mut [f32]) {
        let Dims { t, c, d, .. } = *self;
        out[..self.b * t * P * c]
            .par_chunks_mut(t * P * c)
            .zip(staged.par_chunks(t * P * c))
            .for_each(|(out, heads)| {
                for (hi, parts) in heads.chunks_exact(P * t * d).enumerate() {
                    for (part, rows) in parts.chunks_exact(t * d).enumerate() {
                        for (i, row) in rows.chunks_exact(d).enumerate() {
                            let at = self.at(P, part, 0, hi, i);
                            out[at..at + d].copy_from_slice(row);
                        }
                    }
                }
            });
    }

    fn scale(&self) -> f32 {
        1.0 / (self.d as f32).sqrt()
    }
}

/// Query rows `(i0, i1)` of the tiles a sequence of `t` is processed in. Keys are cut
/// the same way, and a tile's rows attend to keys `0..span.keys(i1)` (`0..i1` when
/// causal): so every product reads P and dS only where a tile wrote them, and where a
/// row may not look they hold zeros.
fn tiles(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(MR).map(move |i0| (i0, (i0 + MR).min(t)))
}

/// Probabilities `P (rows i0..i1) × (keys 0..span.keys(i1))` of one tile of queries
/// into `p` (row stride given): scaled scores against `kt` (the head's keys
/// transposed, `d × t`), softmax over the keys each row sees, zeros after them.
#[inline(always)]
fn tile_probabilities(
    dims: &Dims,
    span: Span,
    (q, q_rs): View,
    kt: &[f32],
    (i0, i1): (usize, usize),
    (p, p_rs): (&mut [f32], usize),
) {
    let (d, t) = (dims.d, dims.t);
    let n = span.keys(i1);
    let q_tile = (&q[i0 * q_rs..], q_rs, 1);
    product((i1 - i0, n, d), (p, p_rs), q_tile, (kt, t));
    let scale = dims.scale();
    for r in 0..i1 - i0 {
        let row = &mut p[r * p_rs..r * p_rs + n];
        let (live, masked) = row.split_at_mut(span.live(i0 + r));
        masked.fill(0.0);
        let max = super::max(live) * scale;
        for x in live.iter_mut() {
            *x = super::fast_exp(*x * scale - max);
        }
        let inv = 1.0 / super::sum(live);
        live.iter_mut().for_each(|x| *x *= inv);
    }
}

/// A head's `t` rows of `d` (row stride given) transposed into `out` (`d × t`),
/// eight rows at a time so each write is a run of eight floats (one column at a time
/// strides `out` by `t`, and at t = 256 those writes fought over the same L1 sets).
#[inline(always)]
fn transpose((x, x_rs): View, (t, d): (usize, usize), out: &mut Vec<f32>) {
    out.resize(d * t, 0.0);
    for i0 in (0..t).step_by(8) {
        let rows = 8.min(t - i0);
        for j in 0..d {
            let run = &mut out[j * t + i0..j * t + i0 + rows];
            for (r, o) in run.iter_mut().enumerate() {
                *o = x[(i0 + r) * x_rs + j];
            }
        }
    }
}

thread_local! {
    /// Per-thread buffers: a transposed operand (`d × T`), then `T × T` scratch for
    /// P and dS.
    static SCRATCH: std::cell::RefCell<[Vec<f32>; 3]> = Default::default();
}

/// The output rows (`T × d`, into `y`) of head `hi` in batch row `bi`. With `saved`
/// (the head's `T × T` share of the probabilities buffer), each row's causal prefix
/// of P is left there for the backward; otherwise one tile's P at a time is scratch.
#[inline(always)]
fn forward_head(
    dims: &Dims,
    span: Span,
    qkv: &[f32],
    bi: usize,
    hi: usize,
    saved: Option<&mut [f32]>,
    y: &mut [f32],
) {
    let Dims { t, d, .. } = *dims;
    let (q, k, (v, v_rs)) = (
        dims.view(qkv, 3, 0, bi, hi),
        dims.view(qkv, 3, 1, bi, hi),
        dims.view(qkv, 3, 2, bi, hi),
    );
    // Taken out of the thread-local rather than borrowed in a closure: a closure
    // would be compiled apart from the caller's AVX2 and FMA features.
    let mut buffers = SCRATCH.take();
    let [kt, scratch, _] = &mut buffers;
    transpose(k, (t, d), kt);
    let (p, keep) = match saved {
        Some(p) => (p, true),
        None => {
            scratch.resize(MR * t, 0.0);
            (&mut scratch[..], false)
        }
    };
    for (i0, i1) in tiles(t) {
        let p = if keep { &mut p[i0 * t..] } else { &mut p[..] };
        tile_probabilities(dims, span, q, kt, (i0, i1), (p, t));
        product(
            (i1 - i0, d, span.keys(i1)),
            (&mut y[i0 * d..], d),
            (p, t, 1),
            (v, v_rs),
        );
    }
    SCRATCH.set(buffers);
}

/// dq, dk, dv (each `T × d`, one after another into `grads`) of head `hi` in batch
/// row `bi`, from the forward's probabilities where it kept them (`saved`), else
/// recomputing them from q and k.
#[inline(always)]
fn backward_head(
    dims: &Dims,
    span: Span,
    qkv: &[f32],
    (y, dy): (&[f32], &[f32]),
    (bi, hi): (usize, usize),
    saved: Option<&[f32]>,
    grads: &mut [f32],
) {
    let Dims { t, d, .. } = *dims;
    let qkv = (
        dims.view(qkv, 3, 0, bi, hi),
        dims.view(qkv, 3, 1, bi, hi),
        dims.view(qkv, 3, 2, bi, hi),
    );
    let (y, dy) = (dims.view(y, 1, 0, bi, hi), dims.view(dy, 1, 0, bi, hi));
    let (dq, rest) = grads.split_at_mut(t * d);
    let (dk, dv) = rest.split_at_mut(t * d);
    // P and dS of every query row: only each tile's rows up to its last key are
    // ever written or read, so the thread's buffers are reused without clearing.
    let mut buffers = SCRATCH.take();
    let [transposed, p_scratch, ds] = &mut buffers;
    ds.resize(t * t, 0.0);
    let p = match saved {
        Some(p) => p,
        None => {
            transpose(qkv.1, (t, d), transposed);
            p_scratch.resize(t * t, 0.0);
            for (i0, i1) in tiles(t) {
                let p = &mut p_scratch[i0 * t..];
                tile_probabilities(dims, span, qkv.0, transposed, (i0, i1), (p, t));
            }
            p_scratch
        }
    };
    transpose(qkv.2, (t, d), transposed);
    backward_tiles(dims, span, qkv, (y, dy), (p, ds, transposed), [dq, dk, dv]);
    SCRATCH.set(buffers);
}

#[inline(always)]
fn backward_tiles(
    dims: &Dims,
    span: Span,
    (q, k, _): (View, View, View),
    ((y, y_rs), (dy, dy_rs)): (View, View),
    (p, ds, vt): (&[f32], &mut [f32], &[f32]),
    [dq, dk, dv]: [&mut [f32]; 3],
) {
    let Dims { t, d, .. } = *dims;
    let scale = dims.scale();
    for (i0, i1) in tiles(t) {
        let (rows, n) = (i1 - i0, span.keys(i1));
        // dP = dY Vᵀ, then dS = P ∘ (dP − dY·Y) / √d (zero where masked, as P is).
        let dy_tile = (&dy[i0 * dy_rs..], dy_rs, 1);
        product((rows, n, d), (&mut ds[i0 * t..], t), dy_tile, (vt, t));
        for i in i0..i1 {
            let centre = dot(&dy[i * dy_rs..i * dy_rs + d], &y[i * y_rs..i * y_rs + d]);
            let (ds_row, p_row) = (&mut ds[i * t..i * t + n], &p[i * t..i * t + n]);
            for (s, &pj) in ds_row.iter_mut().zip(p_row) {
                *s = pj * (*s - centre) * scale;
            }
        }
        // dQ = dS K for this tile's rows.
        let ds_tile = (&ds[i0 * t..], t, 1);
        product((rows, d, n), (&mut dq[i0 * d..], d), ds_tile, k);
    }
    // dK = dSᵀ Q and dV = Pᵀ dY, a tile of keys at a time over the query rows that
    // see them (rows j0.. for keys j0..j1 when causal, all rows otherwise), the
    // transposes read through strides.
    let key_end = span.key_end(t);
    for (j0, j1) in tiles(key_end) {
        let first = span.first_row(j0);
        let (keys, rows) = (j1 - j0, t - first);
        let at = first * t + j0;
        let (ds_t, p_t) = ((&ds[at..], 1, t), (&p[at..], 1, t));
        let q_rows = (&q.0[first * q.1..], q.1);
        product((keys, d, rows), (&mut dk[j0 * d..], d), ds_t, q_rows);
        let dy_rows = (&dy[first * dy_rs..], dy_rs);
        product((keys, d, rows), (&mut dv[j0 * d..], d), p_t, dy_rows);
    }
    // Padding keys take no part: their gradients are zero.
    dk[key_end * d..].fill(0.0);
    dv[key_end * d..].fill(0.0);
}

/// Length of the probabilities buffer [`forward`] can keep for [`backward`].
pub fn saved_len((b, t, n_head): (usize, usize, usize)) -> usize {
    b * n_head * t * t
}

/// Attention output `y (B, T, C)` from `qkv (B, T, 3C)`, heads in parallel. With
/// `saved` ([`saved_len`] long), the softmax probabilities are kept there so the
/// backward need not recompute them.
pub fn forward(
    qkv: &[f32],
    (b, t, n_head): (usize, usize, usize),
    mask: &AttentionMask,
    y: &mut [f32],
    saved: Option<&mut [f32]>,
) -> Result<()> {
    let dims = Dims::new(b, t, qkv.len() / (b * t).max(1), n_head, "attention")?;
    mask.check(b, t)?;
    let h = dims.h;
    let head = |pair: usize, p: Option<&mut [f32]>, y: &mut [f32]| {
        let span = mask.span(pair / h);
        super::simd(
            #[inline(always)]
            || forward_head(&dims, span, qkv, pair / h, pair % h, p, y),
        )
    };
    staged(b * t * dims.c, |staged| {
        let per_head = staged.par_chunks_mut(t * dims.d).enumerate();
        match saved {
            Some(p) => {
                check_saved(p.len(), (b, t, n_head))?;
                let p = p.par_chunks_mut(t * t);
                per_head
                    .zip(p)
                    .for_each(|((pair, y), p)| head(pair, Some(p), y));
            }
            None => per_head.for_each(|(pair, y)| head(pair, None, y)),
        }
        dims.gather::<1>(staged, y);
        Ok(())
    })
}

/// Runs `f` on a buffer of `len` floats (contents unspecified) kept from one call
/// to the next, so its pages are not mapped and zeroed afresh every time (that
/// took a sixth of attention's time when each head had its own new vectors).
fn staged<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    static BUFFER: Mutex<Vec<f32>> = Mutex::new(Vec::new());
    let mut buffer = std::mem::take(&mut *BUFFER.lock().unwrap_or_else(|e| e.into_inner()));
    buffer.resize(len, 0.0);
    let out = f(&mut buffer[..len]);
    *BUFFER.lock().unwrap_or_else(|e| e.into_inner()) = buffer;
    out
}

fn check_saved(len: usize, dims: (usize, usize, usize)) -> Result<()> {
    if len != saved_len(dims) {
        candle_core::bail!(
            "attention: {len} saved probabilities, expected {}",
            saved_len(dims)
        );
    }
    Ok(())
}

/// `dqkv (B, T, 3C)` (overwritten) from `qkv`, the forward's output `y`, `dy`, and
/// the probabilities the forward `saved` (recomputed when `None`).
pub fn backward(
    qkv: &[f32],
    (y, dy): (&[f32], &[f32]),
    (b, t, n_head): (usize, usize, usize),
    mask: &AttentionMask,
    saved: Option<&[f32]>,
    dqkv: &mut [f32],
) -> Result<()> {
    let dims = Dims::new(b, t, qkv.len() / (b * t).max(1), n_head, "attention")?;
    mask.check(b, t)?;
    if let Some(p) = saved {
        check_saved(p.len(), (b, t, n_head))?;
    }
    let h = dims.h;
    staged(3 * b * t * dims.c, |staged| {
        staged
            .par_chunks_mut(3 * t * dims.d)
            .enumerate()
            .for_each(|(pair, grads)| {
                let p = saved.map(|p| &p[pair * t * t..(pair + 1) * t * t]);
                let at = (pair / h, pair % h);
                let span = mask.span(pair / h);
                super::simd(
                    #[inline(always)]
                    || backward_head(&dims, span, qkv, (y, dy), at, p, grads),
                )
            });
        dims.gather::<3>(staged, dqkv);
    });
    Ok(())
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let qkv = contiguous(s, l, self.name())?;
        let Dims { b, t, c, .. } = Dims::of(l, self.n_head, self.name())?;
        let mut out = vec![0.0f32; b * t * c];
        forward(qkv, (b, t, self.n_head), &self.mask, &mut out, None)?;
        Ok(output(out, (b, t, c)))
    }

    fn bwd(&self, qkv: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(qkv.apply_op3_no_bwd(
            y,
            &dy.contiguous()?,
            &AttentionBackward {
                n_head: self.n_head,
                mask: self.mask.clone(),
            },
        )?))
    }
}

impl CustomOp3 for AttentionBackward {
    fn name(&self) -> &'static str {
        "fused-attention-backward"
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
        let [qkv, y, dy] = contiguous3(self.name(), [(s1, l1), (s2, l2), (s3, l3)])?;
        let Dims { b, t, c, .. } = Dims::of(l1, self.n_head, self.name())?;
        let mut out = vec![0.0f32; b * t * 3 * c];
        backward(
            qkv,
            (y, dy),
            (b, t, self.n_head),
            &self.mask,
            None,
            &mut out,
        )?;
        Ok(output(out, (b, t, 3 * c)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_probabilities_give_the_recomputed_backward_bit_for_bit() {
        let (b, t, h, c) = (2, 45, 3, 12);
        let wave = |n: usize, s: f32| (0..n).map(|i| ((i as f32) * s).sin()).collect::<Vec<f32>>();
        let (qkv, dy) = (wave(b * t * 3 * c, 0.37), wave(b * t * c, 0.91));
        let dims = (b, t, h);
        let mut y = vec![0.0; b * t * c];
        let causal = &AttentionMask::Causal;
        forward(&qkv, dims, causal, &mut y, None).unwrap();
        let (mut y_kept, mut probs) = (vec![0.0; b * t * c], vec![0.0; saved_len(dims)]);
        forward(&qkv, dims, causal, &mut y_kept, Some(&mut probs)).unwrap();
        assert_eq!(y, y_kept);
        // Each kept row is a distribution over its causal prefix.
        for (r, row) in probs.chunks_exact(t).enumerate() {
            let i = r % t;
            let total: f32 = row[..=i].iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "row {r} sums to {total}");
        }
        let mut recomputed = vec![0.0; b * t * 3 * c];
        backward(&qkv, (&y, &dy), dims, causal, None, &mut recomputed).unwrap();
        let mut kept = vec![0.0; b * t * 3 * c];
        backward(&qkv, (&y, &dy), dims, causal, Some(&probs), &mut kept).unwrap();
        assert_eq!(recomputed, kept);
        let short = &probs[1..];
        let err = backward(&qkv, (&y, &dy), dims, causal, Some(short), &mut kept).unwrap_err();
        assert!(err.to_string().contains("saved probabilities"), "{err}");
    }
}
