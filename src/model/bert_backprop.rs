//! BERT's (and DistilBERT's) masked-LM loss and gradients by hand, the way
//! [`super::backprop`] does GPT-2's: one forward and one backward over activation
//! buffers kept across steps, no autograd graph, the same kernels
//! ([`super::kernels`]) the custom ops wrap.
//!
//! Per layer (post-LN): `qkv = h Wqkvᵀ + b` (the three projections packed into one
//! product), attention over each sequence's real keys, `m = h + a Woᵀ + bo` with the
//! residual folded into the product and the layer norm fused after it, then the
//! erf-GELU MLP the same way. The head runs on the labelled positions only.
//! [`super::Bert::masked_lm_loss_sum`] through candle's autograd is the reference
//! path; `tests/kernels.rs` holds the two to the same loss and gradients.

use super::backprop::{add_rows, pair_mut, weight_slices};
use super::bert::{Bert, LayerIndex, IGNORE};
use super::kernels::slices as k;
use super::kernels::{AttentionMask, GeluForm, WeightLayout};
use super::Kernels;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};
use rayon::prelude::*;
use std::ops::Range;

/// BERT stores its linear weights as `nn.Linear` does, (out, in).
const LINEAR: WeightLayout = WeightLayout::OutIn;

/// The buffers of one forward and backward; sized on first use and when the batch
/// shape changes.
#[derive(Default)]
pub struct Activations {
    /// Embeddings summed, before their layer norm.
    embedded: Vec<f32>,
    /// Hidden states entering each layer, and after the last (L + 1 buffers).
    hidden: Vec<Vec<f32>>,
    layers: Vec<LayerActivations>,
    /// The head, over the labelled rows: their hidden states, transform, GELU, norm.
    picked: Vec<f32>,
    transform: Vec<f32>,
    gelu: Vec<f32>,
    normed: Vec<f32>,
    logits: Vec<f32>,
    /// Backward scratch.
    d_hidden: Vec<f32>,
    d_narrow: Vec<f32>,
    d_other: Vec<f32>,
    d_wide: Vec<f32>,
    d_logits: Vec<f32>,
    d_head: Vec<f32>,
    /// The packed q/k/v projection's gradients (the weights are packed per layer).
    d_qkv_weight: Vec<f32>,
    d_qkv_bias: Vec<f32>,
}

#[derive(Default)]
struct LayerActivations {
    /// q, k, v weights and biases packed as one (3C, C) projection, once per step
    /// and read again by the backward.
    qkv_weight: Vec<f32>,
    qkv_bias: Vec<f32>,
    qkv: Vec<f32>,
    probs: Vec<f32>,
    attention: Vec<f32>,
    /// `h + attention output`, before the first layer norm; then that norm.
    middle: Vec<f32>,
    normed: Vec<f32>,
    fc: Vec<f32>,
    gelu: Vec<f32>,
    /// `normed + MLP output`, before the second layer norm.
    out: Vec<f32>,
}

fn size(buf: &mut Vec<f32>, len: usize) {
    buf.resize(len, 0.0);
}

/// Whether the hand-written step can stand in for autograd: a masked LM, f32 on the
/// CPU with the fused kernels, no dropout (right-padded sequences: the caller knows
/// their key lengths).
pub fn applies(model: &Bert, dropout: f32) -> bool {
    !model.config.is_classifier()
        && model.kernels == Kernels::Fused
        && model.dtype() == DType::F32
        && model.compute_dtype() == DType::F32
        && model.device().is_cpu()
        && dropout == 0.0
}

/// Σ of the cross-entropy over the positions of `ids` (`key_lengths.len()` sequences
/// concatenated, each with its number of real tokens) whose label is not [`IGNORE`],
/// and their count. Token types are all 0. With `grads = Some((buffers, scale))`,
/// also adds `scale · ∂Σloss/∂w` into each parameter's buffer ([`Bert::params`]).
pub fn loss_and_grads(
    model: &Bert,
    ids: &[u32],
    labels: &[u32],
    key_lengths: &[usize],
    grads: Option<(&mut [Vec<f32>], f32)>,
) -> Result<(f64, usize)> {
    // On a pool thread, as the GPT step (see there).
    rayon::scope(|_| step(model, ids, labels, key_lengths, grads))
}

fn step(
    model: &Bert,
    ids: &[u32],
    labels: &[u32],
    key_lengths: &[usize],
    grads: Option<(&mut [Vec<f32>], f32)>,
) -> Result<(f64, usize)> {
    let cfg = &model.config;
    let (c, f, vocab) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let (layers, heads) = (cfg.num_hidden_layers, cfg.num_attention_heads);
    let rows = key_lengths.len();
    ensure!(
        rows > 0 && !ids.is_empty() && ids.len().is_multiple_of(rows) && labels.len() == ids.len(),
        "{} token ids and {} labels do not split into {rows} sequences",
        ids.len(),
        labels.len()
    );
    let (n, t) = (ids.len(), ids.len() / rows);
    ensure!(
        t <= cfg.max_position_embeddings,
        "sequence of {t} tokens exceeds the {} positions of the model",
        cfg.max_position_embeddings
    );
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        bail!("token id {bad} is outside the vocabulary of {vocab}");
    }
    if let Some(bad) = labels.iter().find(|&&l| l != IGNORE && l as usize >= vocab) {
        bail!("label {bad} is outside the vocabulary of {vocab}");
    }
    let picked: Vec<usize> = (0..n).filter(|&i| labels[i] != IGNORE).collect();
    let targets: Vec<u32> = picked.iter().map(|&i| labels[i]).collect();
    let m = picked.len();
    let mask = AttentionMask::KeyLengths(key_lengths.to_vec());

    let params = model.params();
    let tensors: Vec<Tensor> = params.iter().map(|p| p.tensor().clone()).collect();
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let w = weight_slices(&guards)?;
    let index = model.param_index()?;
    let pair = |(weight, bias): (usize, usize)| (w[weight], w[bias]);
    let eps = cfg.layer_norm_eps as f32;

    let mut acts = model.activations.lock().unwrap_or_else(|e| e.into_inner());
    let a = &mut *acts;
    let backward = grads.is_some();
    size(&mut a.embedded, n * c);
    a.hidden.resize_with(layers + 1, Vec::new);
    a.hidden.iter_mut().for_each(|h| size(h, n * c));
    a.layers.resize_with(layers, Default::default);
    let probs = if backward {
        k::attention_saved_len((rows, t, heads))
    } else {
        0
    };
    for (l, at) in a.layers.iter_mut().zip(&index.layers) {
        size(&mut l.qkv_weight, 3 * c * c);
        size(&mut l.qkv_bias, 3 * c);
        pack_qkv(&w, at, c, (&mut l.qkv_weight, &mut l.qkv_bias));
        size(&mut l.qkv, 3 * n * c);
        size(&mut l.probs, probs);
        for buf in [&mut l.attention, &mut l.middle, &mut l.normed, &mut l.out] {
            size(buf, n * c);
        }
        size(&mut l.fc, n * f);
        size(&mut l.gelu, n * f);
    }
    for buf in [&mut a.picked, &mut a.transform, &mut a.gelu, &mut a.normed] {
        size(buf, m * c);
    }
    size(&mut a.logits, m * vocab);

    // Forward: embeddings (token type 0 for every position) and their layer norm.
    let (word, position) = (w[index.word], w[index.position]);
    let token_type = index.token_type.map(|i| &w[i][..c]);
    a.embedded
        .par_chunks_mut(c)
        .zip(ids.par_iter())
        .enumerate()
        .for_each(|(i, (x, &id))| {
            let (tok, pos) = (id as usize * c, (i % t) * c);
            x.iter_mut()
                .zip(&word[tok..tok + c])
                .zip(&position[pos..pos + c])
                .for_each(|((x, e), p)| *x = e + p);
            if let Some(tt) = token_type {
                x.iter_mut().zip(tt).for_each(|(x, t)| *x += t);
            }
        });
    let (ew, eb) = pair(index.embeddings_ln);
    k::layer_norm_forward(&a.embedded, ew, eb, eps, &mut a.hidden[0]);
    let erf_forward = k::gelu_erf_forward_share;
    for (l, at) in index.layers.iter().enumerate() {
        let (before, after) = a.hidden.split_at_mut(l + 1);
        let (h, next) = (&before[l], &mut after[0]);
        let b = &mut a.layers[l];
        let packed = (&b.qkv_weight[..], LINEAR);
        k::linear_forward(h, packed, &b.qkv_bias, None, &mut b.qkv, None);
        let keep = backward.then_some(&mut b.probs[..]);
        k::attention_forward(&b.qkv, (rows, t, heads), &mask, &mut b.attention, keep)?;
        let (wo, bo) = pair(at.attn_out);
        let (w1, b1) = pair(at.attn_ln);
        let ln = |x: &[f32], y: &mut [f32]| k::layer_norm_share(x, w1, b1, eps, y);
        let then = Some((&mut b.normed[..], &ln as _));
        k::linear_forward(&b.attention, (wo, LINEAR), bo, Some(h), &mut b.middle, then);
        let (wi, bi) = pair(at.ffn_in);
        let then = Some((&mut b.gelu[..], &erf_forward as _));
        k::linear_forward(&b.normed, (wi, LINEAR), bi, None, &mut b.fc, then);
        let (wp, bp) = pair(at.ffn_out);
        let (w2, b2) = pair(at.out_ln);
        let ln = |x: &[f32], y: &mut [f32]| k::layer_norm_share(x, w2, b2, eps, y);
        let then = Some((&mut next[..], &ln as _));
        k::linear_forward(&b.gelu, (wp, LINEAR), bp, Some(&b.normed), &mut b.out, then);
    }
    if m == 0 {
        return Ok((0.0, 0));
    }
    // The head, on the labelled rows.
    let last = &a.hidden[layers];
    for (dst, &i) in a.picked.chunks_exact_mut(c).zip(&picked) {
        dst.copy_from_slice(&last[i * c..(i + 1) * c]);
    }
    let (wt, bt) = pair(index.head_transform);
    let then = Some((&mut a.gelu[..], &erf_forward as _));
    k::linear_forward(&a.picked, (wt, LINEAR), bt, None, &mut a.transform, then);
    let (wn, bn) = pair(index.head_ln);
    k::layer_norm_forward(&a.gelu, wn, bn, eps, &mut a.normed);
    // The decoder is tied to the word embeddings: (vocab, C), an (out, in) weight.
    let decoder_bias = w[index.head_bias];
    k::linear_forward(
        &a.normed,
        (word, LINEAR),
        decoder_bias,
        None,
        &mut a.logits,
        None,
    );
    let Some((grads, scale)) = grads else {
        let loss = k::cross_entropy(&a.logits, &targets, vocab, None)?;
        return Ok((loss as f64, m));
    };
    ensure!(
        grads.len() == params.len(),
        "{} gradient buffers for {} parameters",
        grads.len(),
        params.len()
    );
    size(&mut a.d_logits, m * vocab);
    size(&mut a.d_head, m * c);
    for buf in [&mut a.d_hidden, &mut a.d_narrow, &mut a.d_other] {
        size(buf, n * c);
    }
    size(&mut a.d_wide, n * f.max(3 * c));
    size(&mut a.d_qkv_weight, 3 * c * c);
    size(&mut a.d_qkv_bias, 3 * c);
    let loss = k::cross_entropy(&a.logits, &targets, vocab, Some((&mut a.d_logits, scale)))?;

    // Backward, in reverse. The head: decoder (its weight gradient goes to the word
    // embeddings), layer norm, GELU (fused into the transform's dx), transform.
    let (dword, dbias) = pair_mut(grads, (index.word, index.head_bias));
    let (dn, dh) = (&mut a.d_narrow[..m * c], &mut a.d_head);
    k::linear_backward(
        &a.normed,
        (word, LINEAR),
        &a.d_logits,
        (dn, None),
        dword,
        dbias,
    );
    dh.fill(0.0);
    let (dw, db) = pair_mut(grads, index.head_ln);
    k::layer_norm_backward(&a.gelu, wn, dn, eps, dh, dw, db);
    k::gelu_backward(&a.transform, dh, GeluForm::Erf);
    let erf_backward = k::gelu_erf_backward_share;
    let (dw, db) = pair_mut(grads, index.head_transform);
    k::linear_backward(&a.picked, (wt, LINEAR), dh, (dn, None), dw, db);
    // Scatter the picked rows' gradient into the last hidden states' gradient.
    a.d_hidden.par_chunks_mut(1 << 14).for_each(|x| x.fill(0.0));
    for (g, &i) in dn.chunks_exact(c).zip(&picked) {
        a.d_hidden[i * c..(i + 1) * c].copy_from_slice(g);
    }
    for (l, at) in index.layers.iter().enumerate().rev() {
        let b = &a.layers[l];
        let h = &a.hidden[l];
        // Second layer norm: out = normed + gelu(fc) Wpᵀ + bp; d_hidden holds ∂/∂LN2(out).
        let (d_out, d_normed) = (&mut a.d_narrow, &mut a.d_other);
        d_out.fill(0.0);
        let (dw, db) = pair_mut(grads, at.out_ln);
        k::layer_norm_backward(&b.out, w[at.out_ln.0], &a.d_hidden, eps, d_out, dw, db);
        let fc = &b.fc;
        let gelu = |r: Range<usize>, d: &mut [f32]| erf_backward(&fc[r.start * f..r.end * f], d);
        let d_fc = &mut a.d_wide[..n * f];
        let (dw, db) = pair_mut(grads, at.ffn_out);
        k::linear_backward(
            &b.gelu,
            (w[at.ffn_out.0], LINEAR),
            d_out,
            (d_fc, Some(&gelu)),
            dw,
            db,
        );
        let (dw, db) = pair_mut(grads, at.ffn_in);
        k::linear_backward(
            &b.normed,
            (w[at.ffn_in.0], LINEAR),
            d_fc,
            (d_normed, None),
            dw,
            db,
        );
        // ∂/∂normed: the MLP's path plus the residual's.
        add(d_normed, d_out);
        // First layer norm: middle = h + attention Woᵀ + bo.
        let d_middle = &mut a.d_narrow;
        d_middle.fill(0.0);
        let (dw, db) = pair_mut(grads, at.attn_ln);
        k::layer_norm_backward(&b.middle, w[at.attn_ln.0], d_normed, eps, d_middle, dw, db);
        let d_attention = &mut a.d_other;
        let (dw, db) = pair_mut(grads, at.attn_out);
        k::linear_backward(
            &b.attention,
            (w[at.attn_out.0], LINEAR),
            d_middle,
            (d_attention, None),
            dw,
            db,
        );
        let dqkv = &mut a.d_wide[..3 * n * c];
        k::attention_backward(
            &b.qkv,
            (&b.attention, d_attention),
            (rows, t, heads),
            &mask,
            Some(&b.probs),
            dqkv,
        )?;
        a.d_qkv_weight.fill(0.0);
        a.d_qkv_bias.fill(0.0);
        let d_h = &mut a.d_hidden;
        let packed = (&b.qkv_weight[..], LINEAR);
        k::linear_backward(
            h,
            packed,
            dqkv,
            (d_h, None),
            &mut a.d_qkv_weight,
            &mut a.d_qkv_bias,
        );
        // ∂/∂h: the attention's path plus the residual's.
        add(d_h, d_middle);
        unpack_qkv_grads(grads, at, c, (&a.d_qkv_weight, &a.d_qkv_bias));
    }
    // Embeddings: their layer norm, then the tables row by row in order (deterministic).
    let d_embedded = &mut a.d_narrow;
    d_embedded.fill(0.0);
    let (dw, db) = pair_mut(grads, index.embeddings_ln);
    k::layer_norm_backward(&a.embedded, ew, &a.d_hidden, eps, d_embedded, dw, db);
    let d = &a.d_narrow;
    let (dword, dposition) = pair_mut(grads, (index.word, index.position));
    rayon::join(
        || add_rows(dword, d, c, &|i| ids[i] as usize),
        || add_rows(dposition, d, c, &|i| i % t),
    );
    if let Some(tt) = index.token_type {
        add_rows(&mut grads[tt], d, c, &|_| 0);
    }
    Ok((loss as f64, m))
}

/// `acc += x`, in parallel.
fn add(acc: &mut [f32], x: &[f32]) {
    acc.par_chunks_mut(1 << 14)
        .zip(x.par_chunks(1 << 14))
        .for_each(|(a, x)| a.iter_mut().zip(x).for_each(|(a, x)| *a += x));
}

/// q, k and v's (out, in) weights stacked into one (3C, C) weight, biases likewise.
fn pack_qkv(w: &[&[f32]], at: &LayerIndex, c: usize, (weight, bias): (&mut [f32], &mut [f32])) {
    for (part, (wi, bi)) in [at.query, at.key, at.value].into_iter().enumerate() {
        weight[part * c * c..(part + 1) * c * c].copy_from_slice(w[wi]);
        bias[part * c..(part + 1) * c].copy_from_slice(w[bi]);
    }
}

/// The packed projection's gradients added into q, k and v's own buffers.
fn unpack_qkv_grads(
    grads: &mut [Vec<f32>],
    at: &LayerIndex,
    c: usize,
    (weight, bias): (&[f32], &[f32]),
) {
    for (part, ids) in [at.query, at.key, at.value].into_iter().enumerate() {
        let (dw, db) = pair_mut(grads, ids);
        add(dw, &weight[part * c * c..(part + 1) * c * c]);
        add(db, &bias[part * c..(part + 1) * c]);
    }
}
