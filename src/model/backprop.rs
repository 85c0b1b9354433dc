//! GPT-2's loss and gradients by hand, as llm.c computes them: one forward and one
//! backward over activation buffers that are allocated once and reused, with no
//! autograd graph in between.
//!
//! This is the fast path of the f32 CPU training step; [`Gpt::loss_sum`] through
//! candle's autograd is the reference path, and `tests/kernels.rs` holds the two to
//! the same loss and gradients. The per-element work is the kernels of
//! [`super::kernels`] (the same functions the custom ops wrap); what this file adds
//! is what autograd cannot: every activation lives in a buffer kept across steps,
//! the residual adds are folded into the output projections (`res + x W + b` is one
//! `gemm` onto a prefilled buffer), the residual stream's gradient collects each
//! branch in place, and nothing walks a graph or sums gradients tensor by tensor.
//!
//! Weights are read where they lie in candle's storage and gradients are added into
//! the caller's flat buffers (one per parameter, as [`Gpt::params`] lists them); each
//! is found by name through `Gpt::param_index`, never by an assumed position.

use super::gpt::{BlockIndex, Gpt};
use super::kernels::slices as k;
use super::kernels::{AttentionMask, WeightLayout};

/// GPT-2 stores its linear weights (in, out), as HF's Conv1D does.
const CONV1D: WeightLayout = WeightLayout::InOut;
use super::Kernels;
use anyhow::{ensure, Context, Result};
use candle_core::{DType, Layout, Storage, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// The buffers of one forward and backward; sized on first use and when the batch
/// shape changes (a `Vec`'s capacity is kept, so shrinking never reallocates).
#[derive(Default)]
pub struct Activations {
    /// Residual stream entering each block, and after the last (L + 1 buffers).
    residual: Vec<Vec<f32>>,
    blocks: Vec<BlockActivations>,
    ln_f: Vec<f32>,
    logits: Vec<f32>,
    /// Backward scratch: the residual stream's gradient, then three work buffers.
    d_residual: Vec<f32>,
    d_narrow: Vec<f32>,
    d_wide: Vec<f32>,
    d_logits: Vec<f32>,
}

#[derive(Default)]
struct BlockActivations {
    ln_1: Vec<f32>,
    qkv: Vec<f32>,
    /// The attention's softmax probabilities (training only), kept for its backward.
    probs: Vec<f32>,
    attention: Vec<f32>,
    /// Residual stream between the attention and the MLP.
    middle: Vec<f32>,
    ln_2: Vec<f32>,
    fc: Vec<f32>,
    gelu: Vec<f32>,
}

/// Where the layer norm that opens the first of `blocks` writes: its ln_1, or ln_f
/// when no block is left.
fn ln_output<'a>(blocks: &'a mut [BlockActivations], ln_f: &'a mut [f32]) -> &'a mut [f32] {
    match blocks.first_mut() {
        Some(b) => &mut b.ln_1,
        None => ln_f,
    }
}

fn size(buf: &mut Vec<f32>, len: usize) {
    buf.resize(len, 0.0);
}

impl Activations {
    /// `tokens` rows of width `c`; `probs` attention probabilities per block (0
    /// when there is no backward to keep them for).
    fn fit(&mut self, tokens: usize, c: usize, vocab: usize, layers: usize, probs: usize) {
        let (n, backward) = (tokens * c, probs > 0);
        self.residual.resize_with(layers + 1, Vec::new);
        self.residual.iter_mut().for_each(|r| size(r, n));
        self.blocks.resize_with(layers, Default::default);
        for b in &mut self.blocks {
            size(&mut b.ln_1, n);
            size(&mut b.qkv, 3 * n);
            size(&mut b.probs, probs);
            size(&mut b.attention, n);
            size(&mut b.middle, n);
            size(&mut b.ln_2, n);
            size(&mut b.fc, 4 * n);
            size(&mut b.gelu, 4 * n);
        }
        size(&mut self.ln_f, n);
        size(&mut self.logits, tokens * vocab);
        if backward {
            size(&mut self.d_residual, n);
            size(&mut self.d_narrow, n);
            size(&mut self.d_wide, 4 * n);
            size(&mut self.d_logits, tokens * vocab);
        }
    }
}

/// Whether the hand-written step can stand in for autograd on `model`: f32 on the
/// CPU with the fused kernels, and no dropout (the reference path applies that).
pub fn applies(model: &Gpt, dropout: f32) -> bool {
    !model.config.is_classifier()
        && !model.is_quantized()
        && model.kernels == Kernels::Fused
        && model.dtype() == DType::F32
        && model.compute_dtype() == DType::F32
        && model.device().is_cpu()
        && dropout == 0.0
}

/// One block's weights, each `(weight, bias)`.
struct BlockWeights<'a> {
    ln_1: (&'a [f32], &'a [f32]),
    qkv: (&'a [f32], &'a [f32]),
    attn_proj: (&'a [f32], &'a [f32]),
    ln_2: (&'a [f32], &'a [f32]),
    fc: (&'a [f32], &'a [f32]),
    mlp_proj: (&'a [f32], &'a [f32]),
}

fn block_weights<'a>(w: &[&'a [f32]], at: &BlockIndex) -> BlockWeights<'a> {
    let pair = |(weight, bias): (usize, usize)| (w[weight], w[bias]);
    BlockWeights {
        ln_1: pair(at.ln_1),
        qkv: pair(at.qkv),
        attn_proj: pair(at.attn_proj),
        ln_2: pair(at.ln_2),
        fc: pair(at.fc),
        mlp_proj: pair(at.mlp_proj),
    }
}

/// An embedding table's gradient: row `i` of `d` (rows of `c`) added to the table's
/// row `row(i)`, in order, so the sums do not depend on scheduling.
pub(super) fn add_rows(table: &mut [f32], d: &[f32], c: usize, row: &dyn Fn(usize) -> usize) {
    for (i, g) in d.chunks_exact(c).enumerate() {
        let at = row(i) * c;
        table[at..at + c]
            .iter_mut()
            .zip(g)
            .for_each(|(t, g)| *t += g);
    }
}

/// A tensor's storage, locked for reading, and its layout.
pub(super) type Guard<'a> = (candle_core::StorageRef<'a>, &'a Layout);

/// The f32 data of each locked weight, read where it lies in candle's CPU storage.
pub(super) fn weight_slices<'a>(guards: &'a [Guard<'_>]) -> Result<Vec<&'a [f32]>> {
    guards
        .iter()
        .map(|(storage, layout)| -> Result<&[f32]> {
            let Storage::Cpu(cpu) = &**storage else {
                anyhow::bail!("the hand-written step runs on the CPU only")
            };
            let (a, b) = layout
                .contiguous_offsets()
                .context("weights must be contiguous")?;
            Ok(&cpu.as_slice::<f32>()?[a..b])
        })
        .collect()
}

/// The gradient buffers of two different parameters (a weight and its bias).
pub(super) fn pair_mut(grads: &mut [Vec<f32>], (i, j): (usize, usize)) -> (&mut [f32], &mut [f32]) {
    assert_ne!(i, j, "two different parameters");
    let (lo, hi) = (i.min(j), i.max(j));
    let (a, b) = grads.split_at_mut(hi);
    let (first, second) = (&mut a[lo], &mut b[0]);
    if i < j {
        (first, second)
    } else {
        (second, first)
    }
}

/// Σ of the next-token cross-entropy of `ids` (`rows` sequences, concatenated)
/// against `targets`. With `grads = Some((buffers, scale))`, also adds
/// `scale · ∂Σloss/∂w` into each trainable parameter's buffer ([`Gpt::params`]
/// order); untrainable ones (a bias-free model's zero biases) are zeroed.
pub fn loss_and_grads(
    model: &Gpt,
    ids: &[u32],
    targets: &[u32],
    rows: usize,
    grads: Option<(&mut [Vec<f32>], f32)>,
) -> Result<f64> {
    // The step runs on a pool thread, so each kernel's parallel loop starts on the
    // thread that asks for it instead of being injected into the pool from outside
    // while the caller sleeps (two thread wake-ups per kernel, costly in a VM).
    rayon::scope(|_| step(model, ids, targets, rows, grads))
}

fn step(
    model: &Gpt,
    ids: &[u32],
    targets: &[u32],
    rows: usize,
    grads: Option<(&mut [Vec<f32>], f32)>,
) -> Result<f64> {
    let cfg = &model.config;
    let (c, vocab, layers, heads) = (cfg.n_embd, cfg.vocab_size, cfg.n_layer, cfg.n_head);
    ensure!(
        rows > 0 && !ids.is_empty() && ids.len().is_multiple_of(rows),
        "{} token ids do not split into {rows} sequences",
        ids.len()
    );
    let t = ids.len() / rows;
    ensure!(
        t <= cfg.n_positions,
        "sequence of {t} tokens exceeds the context of {}",
        cfg.n_positions
    );
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        anyhow::bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    let params = model.params();
    let tensors: Vec<Tensor> = params.iter().map(|p| p.tensor().clone()).collect();
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let w = weight_slices(&guards)?;
    let mut acts = model.activations.lock().unwrap_or_else(|e| e.into_inner());
    let a = &mut *acts;
    let probs = match grads {
        Some(_) => k::attention_saved_len((rows, t, heads)),
        None => 0,
    };
    a.fit(ids.len(), c, vocab, layers, probs);
    let eps = cfg.layer_norm_epsilon as f32;
    let index = model.param_index();
    let (wte, wpe) = (w[index.wte], w[index.wpe]);
    // The layer norm at the start of block `l` (`l == layers`: ln_f).
    let ln_index = |l: usize| index.blocks.get(l).map_or(index.ln_f, |b| b.ln_1);
    let ln_at = |l: usize| {
        let (weight, bias) = ln_index(l);
        (w[weight], w[bias])
    };
    let ln_f = ln_at(layers);

    // Forward.
    a.residual[0]
        .par_chunks_mut(c)
        .zip(ids.par_iter())
        .enumerate()
        .for_each(|(i, (x, &id))| {
            let (tok, pos) = (id as usize * c, (i % t) * c);
            x.iter_mut()
                .zip(&wte[tok..tok + c])
                .zip(&wpe[pos..pos + c])
                .for_each(|((x, e), p)| *x = e + p);
        });
    // Layer norms run fused after the product that writes their input (the next
    // block's ln_1, or ln_f, after a block's MLP), except the first.
    let (w0, b0) = ln_at(0);
    let first = ln_output(&mut a.blocks, &mut a.ln_f);
    k::layer_norm_forward(&a.residual[0], w0, b0, eps, first);
    for l in 0..layers {
        let bw = block_weights(&w, &index.blocks[l]);
        let (before, after) = a.residual.split_at_mut(l + 1);
        let (x, out) = (&before[l], &mut after[0]);
        let (done, next) = a.blocks.split_at_mut(l + 1);
        let b = &mut done[l];
        let next_ln = ln_output(next, &mut a.ln_f);
        k::linear_forward(
            &b.ln_1,
            (bw.qkv.0, CONV1D),
            bw.qkv.1,
            None,
            &mut b.qkv,
            None,
        );
        k::attention_forward(
            &b.qkv,
            (rows, t, heads),
            &AttentionMask::Causal,
            &mut b.attention,
            (probs > 0).then_some(&mut b.probs[..]),
        )?;
        let ((wo, bo), (w2, b2)) = (bw.attn_proj, bw.ln_2);
        let ln_2 = |x: &[f32], y: &mut [f32]| k::layer_norm_share(x, w2, b2, eps, y);
        let then = Some((&mut b.ln_2[..], &ln_2 as _));
        k::linear_forward(&b.attention, (wo, CONV1D), bo, Some(x), &mut b.middle, then);
        let then = Some((&mut b.gelu[..], &k::gelu_forward_share as _));
        k::linear_forward(&b.ln_2, (bw.fc.0, CONV1D), bw.fc.1, None, &mut b.fc, then);
        let ((wp, bp), (wn, bn)) = (bw.mlp_proj, ln_at(l + 1));
        let ln_next = |x: &[f32], y: &mut [f32]| k::layer_norm_share(x, wn, bn, eps, y);
        let then = Some((&mut next_ln[..], &ln_next as _));
        k::linear_forward(&b.gelu, (wp, CONV1D), bp, Some(&b.middle), out, then);
    }
    let n = ids.len();
    // The head is tied to the token embedding: logits = ln_f · wteᵀ.
    k::matmul(
        (n, vocab, c),
        (&mut a.logits, vocab),
        false,
        (&a.ln_f, 1, c),
        (wte, c, 1),
        true,
    );
    let Some((grads, scale)) = grads else {
        return Ok(k::cross_entropy(&a.logits, targets, vocab, None)? as f64);
    };
    ensure!(
        grads.len() == params.len(),
        "{} gradient buffers for {} parameters",
        grads.len(),
        params.len()
    );
    let loss = k::cross_entropy(&a.logits, targets, vocab, Some((&mut a.d_logits, scale)))?;

    // Backward, in reverse.
    let (dl, dn) = (&a.d_logits, &mut a.d_narrow);
    k::matmul(
        (n, c, vocab),
        (dn, c),
        false,
        (dl, 1, vocab),
        (wte, 1, c),
        true,
    );
    k::matmul(
        (vocab, c, n),
        (&mut grads[0], c),
        true,
        (dl, vocab, 1),
        (&a.ln_f, 1, c),
        true,
    );
    a.d_residual
        .par_chunks_mut(1 << 14)
        .for_each(|chunk| chunk.fill(0.0));
    let (dw, db) = pair_mut(grads, index.ln_f);
    let x = &a.residual[layers];
    k::layer_norm_backward(x, ln_f.0, &a.d_narrow, eps, &mut a.d_residual, dw, db);
    for l in (0..layers).rev() {
        let at = &index.blocks[l];
        let bw = block_weights(&w, at);
        let b = &a.blocks[l];
        let (dres, dn, dwide) = (&mut a.d_residual, &mut a.d_narrow, &mut a.d_wide);
        // MLP: out = middle + gelu(fc(ln_2(middle))) Wp + bp.
        let (dw, db) = pair_mut(grads, at.mlp_proj);
        let wide = 4 * c;
        let gelu = |r: Range<usize>, d: &mut [f32]| {
            k::gelu_backward_share(&b.fc[r.start * wide..r.end * wide], d)
        };
        k::linear_backward(
            &b.gelu,
            (bw.mlp_proj.0, CONV1D),
            dres,
            (dwide, Some(&gelu)),
            dw,
            db,
        );
        let (dw, db) = pair_mut(grads, at.fc);
        k::linear_backward(&b.ln_2, (bw.fc.0, CONV1D), dwide, (dn, None), dw, db);
        let (dw, db) = pair_mut(grads, at.ln_2);
        k::layer_norm_backward(&b.middle, bw.ln_2.0, dn, eps, dres, dw, db);
        // Attention: middle = x + attention(qkv(ln_1(x))) Wo + bo.
        let (dw, db) = pair_mut(grads, at.attn_proj);
        k::linear_backward(
            &b.attention,
            (bw.attn_proj.0, CONV1D),
            dres,
            (dn, None),
            dw,
            db,
        );
        let dqkv = &mut dwide[..3 * n * c];
        k::attention_backward(
            &b.qkv,
            (&b.attention, dn),
            (rows, t, heads),
            &AttentionMask::Causal,
            Some(&b.probs),
            dqkv,
        )?;
        let (dw, db) = pair_mut(grads, at.qkv);
        k::linear_backward(&b.ln_1, (bw.qkv.0, CONV1D), dqkv, (dn, None), dw, db);
        let (dw, db) = pair_mut(grads, at.ln_1);
        k::layer_norm_backward(&a.residual[l], bw.ln_1.0, dn, eps, dres, dw, db);
    }
    // Embeddings: token and position tables side by side, each row by row in order
    // (deterministic).
    let (dwte, dwpe) = pair_mut(grads, (index.wte, index.wpe));
    let d = &a.d_residual;
    rayon::join(
        || add_rows(dwte, d, c, &|i| ids[i] as usize),
        || add_rows(dwpe, d, c, &|i| i % t),
    );
    for (p, g) in params.iter().zip(grads.iter_mut()) {
        if !p.trainable {
            g.fill(0.0);
        }
    }
    Ok(loss as f64)
}
