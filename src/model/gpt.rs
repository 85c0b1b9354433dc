//! GPT-2 as Hugging Face's `GPT2LMHeadModel` computes it, top to bottom.
//!
//! Pre-LayerNorm blocks, learned positions, causal self-attention, a 4× MLP with
//! tanh-GELU and an output head tied to the token embedding. Weights keep the HF
//! names and the Conv1D (in, out) layout, so loading and saving copy tensors as they
//! are and a linear layer is a plain `x @ W + b`.
//!
//! Two implementations of the per-element work, chosen by [`Kernels`]: `Composed`
//! builds layer norm, softmax, attention, GELU and the loss from basic tensor ops
//! (the reference path: candle's own fused layer norm and softmax are not recorded
//! for autograd, see `../shared/CANDLE-NOTES.md`); `Fused` runs our custom ops with
//! hand-written backward (`kernels/`). `tests/kernels.rs` holds them together and
//! `tests/model_grad.rs` checks every gradient against finite differences.

use super::layers::{
    apply_dropout, attend, split_heads, Dropout, Init, Kernels, LayerNorm, Linear, Param,
    ParamBuilder, Shape, WeightLayout,
};
use anyhow::{bail, ensure, Result};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Tensor};
use serde::{Deserialize, Serialize};

/// The architecture; serialised as GPT2Config keys by [`super::hf`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    pub vocab_size: usize,
    /// Context length (`n_positions` in HF, `block_size` in nanoGPT).
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub layer_norm_epsilon: f64,
    /// Without bias the bias tensors still exist (HF needs them) but stay zero.
    pub bias: bool,
    pub dropout: f32,
    /// A sequence classifier's label names, in id order (GPT2ForSequenceClassification:
    /// a `score` head read at each row's last non-pad token); empty for a causal LM.
    #[serde(default)]
    pub labels: Vec<String>,
    /// The padding id a classifier skips when it looks for each row's last token.
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl GptConfig {
    /// Whether this is a sequence classifier rather than a causal LM.
    pub fn is_classifier(&self) -> bool {
        !self.labels.is_empty()
    }

    pub fn validate(&self) -> Result<()> {
        Shape {
            vocab: ("vocab_size", self.vocab_size),
            positions: ("block_size (n_positions)", self.n_positions),
            layers: ("n_layer", self.n_layer),
            heads: ("n_head", self.n_head),
            width: ("n_embd", self.n_embd),
            ffn: ("4 × n_embd", 4 * self.n_embd),
            dropout: self.dropout,
            labels: self.labels.len(),
        }
        .validate()
    }

    /// Parameters counted as nanoGPT and llm.c count them for FLOPs: position
    /// embeddings excluded, the tied head counted once.
    pub fn non_embedding_params(&self) -> usize {
        let (c, l) = (self.n_embd, self.n_layer);
        let block =
            2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c);
        self.vocab_size * c + l * block + 2 * c
    }

    /// Training FLOPs per token: 6N for the weights plus 12·L·d·T for attention.
    pub fn flops_per_token(&self) -> f64 {
        6.0 * self.non_embedding_params() as f64
            + 12.0 * (self.n_layer * self.n_embd * self.n_positions) as f64
    }
}

/// Additive causal mask for `t` new positions attending over `t_total` (the last `t`
/// of which are the new ones): 0 where allowed, -inf in the future.
fn causal_mask(t: usize, t_total: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let past = t_total - t;
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..t_total).map(move |j| {
                if j <= past + i {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (t, t_total), device)?.to_dtype(dtype)?)
}

/// Keys and values of every layer for the tokens seen so far.
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        KvCache {
            layers: (0..n_layer).map(|_| None).collect(),
        }
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

struct Attention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
}

/// One cache slot (a layer's keys and values for one sequence) grown by `k`, `v`.
fn extend_cache(
    slot: &mut Option<(Tensor, Tensor)>,
    k: Tensor,
    v: Tensor,
) -> Result<(Tensor, Tensor)> {
    let (k, v) = match slot.as_ref() {
        Some((k_past, v_past)) => (
            Tensor::cat(&[k_past, &k], 2)?,
            Tensor::cat(&[v_past, &v], 2)?,
        ),
        None => (k, v),
    };
    *slot = Some((k.clone(), v.clone()));
    Ok((k, v))
}

impl Attention {
    /// Splits `(B, T, 3C)` projections into q, k, v of shape `(B, heads, T, head_dim)`.
    fn split_heads(&self, qkv: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = qkv.dim(2)? / 3;
        let part = |i: usize| split_heads(&qkv.narrow(2, i * c, c)?, self.n_head);
        Ok((part(0)?, part(1)?, part(2)?))
    }

    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mut dropout: Option<&mut Dropout>,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let qkv = self.c_attn.forward(x, kernels)?;
        // The fused kernel covers full causal self-attention without attention dropout.
        let attention_dropout = dropout.as_ref().is_some_and(|d| d.p > 0.0);
        let y = if cache.is_none() && !attention_dropout && kernels.fused_for(&qkv) {
            super::kernels::attention(&qkv, self.n_head, super::kernels::AttentionMask::Causal)?
        } else {
            let (q, k, v) = self.split_heads(&qkv)?;
            let (k, v) = match cache {
                Some(slot) => extend_cache(slot, k, v)?,
                None => (k, v),
            };
            attend(&q, &k, &v, mask, dropout.as_deref_mut())?
        };
        apply_dropout(self.c_proj.forward(&y, kernels)?, dropout)
    }

    /// One new token for each of B independent sequences (`x`: `(B, 1, C)`), each
    /// attending over its own cache: the projections run batched, attention per row.
    fn decode_rows(
        &self,
        x: &Tensor,
        slots: &mut [&mut Option<(Tensor, Tensor)>],
        kernels: Kernels,
    ) -> Result<Tensor> {
        let (q, k, v) = self.split_heads(&self.c_attn.forward(x, kernels)?)?;
        let mut rows = Vec::with_capacity(slots.len());
        for (i, slot) in slots.iter_mut().enumerate() {
            let (k, v) = extend_cache(slot, k.narrow(0, i, 1)?, v.narrow(0, i, 1)?)?;
            rows.push(attend(&q.narrow(0, i, 1)?, &k, &v, None, None)?);
        }
        self.c_proj.forward(&Tensor::cat(&rows, 0)?, kernels)
    }
}

struct Mlp {
    c_fc: Linear,
    c_proj: Linear,
}

impl Mlp {
    fn forward(
        &self,
        x: &Tensor,
        dropout: Option<&mut Dropout>,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let h = self.c_fc.forward(x, kernels)?;
        // Both are the tanh approximation (HF's "gelu_new").
        let h = if kernels.fused_for(&h) {
            super::kernels::gelu(&h, super::kernels::GeluForm::Tanh)?
        } else {
            h.gelu()?
        };
        apply_dropout(self.c_proj.forward(&h, kernels)?, dropout)
    }
}

struct Block {
    ln_1: LayerNorm,
    attn: Attention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn forward(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mut dropout: Option<&mut Dropout>,
        kernels: Kernels,
    ) -> Result<Tensor> {
        let x = (x + self.attn.forward(
            &self.ln_1.forward(x, kernels)?,
            mask,
            cache,
            dropout.as_deref_mut(),
            kernels,
        )?)?;
        Ok((&x
            + self
                .mlp
                .forward(&self.ln_2.forward(&x, kernels)?, dropout, kernels)?)?)
    }

    fn decode_rows(
        &self,
        x: &Tensor,
        slots: &mut [&mut Option<(Tensor, Tensor)>],
        kernels: Kernels,
    ) -> Result<Tensor> {
        let x = (x + self
            .attn
            .decode_rows(&self.ln_1.forward(x, kernels)?, slots, kernels)?)?;
        Ok((&x
            + self
                .mlp
                .forward(&self.ln_2.forward(&x, kernels)?, None, kernels)?)?)
    }
}

/// Positions in [`Gpt::params`] of each named weight; pairs are (weight, bias).
pub(super) struct ParamIndex {
    pub wte: usize,
    pub wpe: usize,
    pub blocks: Vec<BlockIndex>,
    pub ln_f: (usize, usize),
}

pub(super) struct BlockIndex {
    pub ln_1: (usize, usize),
    pub qkv: (usize, usize),
    pub attn_proj: (usize, usize),
    pub ln_2: (usize, usize),
    pub fc: (usize, usize),
    pub mlp_proj: (usize, usize),
}

pub struct Gpt {
    pub config: GptConfig,
    pub kernels: Kernels,
    /// Buffers of the hand-written training step, kept between steps.
    pub(super) activations: std::sync::Mutex<super::backprop::Activations>,
    wte: Param,
    wpe: Param,
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// A classifier's head, (labels, C), no bias.
    score: Option<Param>,
    /// The tied head quantised (a GGUF's `token_embd`), used for logits when set.
    lm_head: Option<QMatMul>,
    /// Mixed precision: the type activations and matmuls run in (`None`: the weights').
    compute: Option<DType>,
}

impl Gpt {
    /// Builds the model, asking `make(name, shape, init)` for each weight in HF order.
    /// Fresh initialisation and checkpoint loading both go through here, so names and
    /// shapes are defined in one place.
    pub fn build(
        config: &GptConfig,
        make: impl FnMut(&str, &[usize], Init) -> Result<Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let c = config.n_embd;
        let std = 0.02;
        // GPT-2 scales the residual projections by 1/sqrt(2·n_layer).
        let proj_std = std / (2.0 * config.n_layer as f64).sqrt();
        let (eps, bias) = (config.layer_norm_epsilon, config.bias);
        let conv1d = WeightLayout::InOut;
        let mut make = make;
        let mut root = ParamBuilder::root(&mut make);
        let mut t = root.pp("transformer");
        let wte = t
            .pp("wte")
            .param("weight", &[config.vocab_size, c], Init::Normal(std), true)?;
        let wpe = t
            .pp("wpe")
            .param("weight", &[config.n_positions, c], Init::Normal(std), true)?;
        let mut h = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let mut b = t.pp("h");
            let mut b = b.pp(i);
            h.push(Block {
                ln_1: b.pp("ln_1").layer_norm(c, eps, bias)?,
                attn: Attention {
                    c_attn: b
                        .pp("attn")
                        .pp("c_attn")
                        .linear(conv1d, c, 3 * c, std, bias)?,
                    c_proj: b
                        .pp("attn")
                        .pp("c_proj")
                        .linear(conv1d, c, c, proj_std, bias)?,
                    n_head: config.n_head,
                },
                ln_2: b.pp("ln_2").layer_norm(c, eps, bias)?,
                mlp: Mlp {
                    c_fc: b.pp("mlp").pp("c_fc").linear(conv1d, c, 4 * c, std, bias)?,
                    c_proj: b
                        .pp("mlp")
                        .pp("c_proj")
                        .linear(conv1d, 4 * c, c, proj_std, bias)?,
                },
            });
        }
        let ln_f = t.pp("ln_f").layer_norm(c, eps, bias)?;
        let score = match config.labels.len() {
            0 => None,
            k => Some(
                root.pp("score")
                    .param("weight", &[k, c], Init::Normal(std), true)?,
            ),
        };
        Ok(Gpt {
            config: config.clone(),
            kernels: Kernels::Fused,
            activations: Default::default(),
            wte,
            wpe,
            h,
            ln_f,
            score,
            lm_head: None,
            compute: None,
        })
    }

    /// Runs inference's matrix products quantised: `quantized(name)` gives the
    /// quantised form of the weight of that name (`transformer.h.0.attn.c_attn.weight`,
    /// …, `transformer.wte.weight` for the tied head), `(out, in)`, or `None` to keep
    /// the f32 product. Training steps do not run on a quantised model.
    pub fn set_quantized(
        &mut self,
        mut quantized: impl FnMut(&str) -> Result<Option<QMatMul>>,
    ) -> Result<()> {
        for block in &mut self.h {
            for linear in [
                &mut block.attn.c_attn,
                &mut block.attn.c_proj,
                &mut block.mlp.c_fc,
                &mut block.mlp.c_proj,
            ] {
                linear.quantized = quantized(&linear.weight.name)?;
            }
        }
        self.lm_head = quantized(&self.wte.name)?;
        Ok(())
    }

    /// Whether any matrix product runs quantised ([`Self::set_quantized`]).
    pub fn is_quantized(&self) -> bool {
        self.lm_head.is_some()
            || self.h.iter().any(|b| {
                [&b.attn.c_attn, &b.attn.c_proj, &b.mlp.c_fc, &b.mlp.c_proj]
                    .iter()
                    .any(|l| l.quantized.is_some())
            })
    }

    /// A freshly initialised model: GPT-2's init drawn from a seeded generator.
    pub fn init(config: &GptConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::build(config, super::layers::fresh(seed, device))
    }

    /// The same weights in another dtype (f64 for finite-difference checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let params = self.params();
        Self::build(&self.config, super::layers::copied(&params, dtype))
    }

    /// Every weight in HF order and naming (`transformer.…`).
    pub fn params(&self) -> Vec<&Param> {
        let mut out = vec![&self.wte, &self.wpe];
        for b in &self.h {
            out.extend([&b.ln_1.weight, &b.ln_1.bias]);
            out.extend([
                &b.attn.c_attn.weight,
                &b.attn.c_attn.bias,
                &b.attn.c_proj.weight,
                &b.attn.c_proj.bias,
            ]);
            out.extend([&b.ln_2.weight, &b.ln_2.bias]);
            out.extend([
                &b.mlp.c_fc.weight,
                &b.mlp.c_fc.bias,
                &b.mlp.c_proj.weight,
                &b.mlp.c_proj.bias,
            ]);
        }
        out.extend([&self.ln_f.weight, &self.ln_f.bias]);
        out.extend(self.score.as_ref());
        out
    }

    /// Where each named weight sits in [`Self::params`], found by identity rather
    /// than assumed from the order, so code that walks flat gradient buffers (the
    /// hand-written step) reads weights by name, as llm.c's `ParameterTensors` does.
    pub(super) fn param_index(&self) -> ParamIndex {
        let params = self.params();
        let at = super::layers::position_in(&params);
        let linear = |l: &Linear| (at(&l.weight), at(&l.bias));
        let norm = |l: &LayerNorm| (at(&l.weight), at(&l.bias));
        ParamIndex {
            wte: at(&self.wte),
            wpe: at(&self.wpe),
            blocks: self
                .h
                .iter()
                .map(|b| BlockIndex {
                    ln_1: norm(&b.ln_1),
                    qkv: linear(&b.attn.c_attn),
                    attn_proj: linear(&b.attn.c_proj),
                    ln_2: norm(&b.ln_2),
                    fc: linear(&b.mlp.c_fc),
                    mlp_proj: linear(&b.mlp.c_proj),
                })
                .collect(),
            ln_f: norm(&self.ln_f),
        }
    }

    pub fn device(&self) -> &Device {
        self.wte.tensor().device()
    }

    pub fn dtype(&self) -> DType {
        self.wte.tensor().dtype()
    }

    /// The type activations run in: the weights' unless mixed precision set another.
    pub fn compute_dtype(&self) -> DType {
        self.compute.unwrap_or(self.dtype())
    }

    /// Mixed precision: activations and matmuls in `dtype`, the weights (and so their
    /// gradients) staying in theirs; layer norm, softmax and the loss widen to f32.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute = (dtype != self.dtype()).then_some(dtype);
    }

    /// Logits `(B, T, vocab)` for token ids `(B, T)`. With a cache, `ids` continue the
    /// cached sequence and the cache grows; dropout applies only when given.
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        dropout: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let c = self.config.n_embd;
        let x = self.hidden_states(ids, cache, dropout)?;
        let logits = self.lm_logits(&x.reshape((b * t, c))?)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Next-token logits `(N, vocab)` for hidden states `(N, C)`: the tied head.
    pub fn lm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.lm_head {
            Some(q) => Ok(q.forward(&hidden.contiguous()?)?),
            None => {
                let wte = self.wte.tensor().to_dtype(hidden.dtype())?;
                Ok(hidden.matmul(&wte.t()?)?.to_dtype(self.dtype())?)
            }
        }
    }

    /// A classifier's logits `(B, labels)`: the score head at each row's last token
    /// that is not `pad_token_id` (the last position when none is set), as
    /// GPT2ForSequenceClassification reads it.
    pub fn classify_logits(&self, ids: &Tensor, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let Some(score) = &self.score else {
            bail!("this gpt2 is a causal LM, not a sequence classifier")
        };
        let (b, t) = ids.dims2()?;
        let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let last: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(r, row)| {
                let at = match self.config.pad_token_id {
                    Some(pad) => row.iter().rposition(|&id| id != pad).unwrap_or(0),
                    None => t - 1,
                };
                (r * t + at) as u32
            })
            .collect();
        let hidden = self.hidden_states(ids, None, dropout)?;
        let picked = hidden
            .reshape((b * t, self.config.n_embd))?
            .index_select(&Tensor::new(last, self.device())?, 0)?;
        let score = score.tensor().to_dtype(picked.dtype())?;
        Ok(picked.matmul(&score.t()?)?.to_dtype(self.dtype())?)
    }

    /// The last hidden states `(B, T, C)` (after the final layer norm). With a cache,
    /// `ids` continue the cached sequence and the cache grows; dropout applies only
    /// when given.
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        mut dropout: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let past = cache.as_ref().map_or(0, |c| c.len());
        if past + t > self.config.n_positions {
            bail!(
                "sequence of {} tokens exceeds the context of {}",
                past + t,
                self.config.n_positions
            );
        }
        let c = self.config.n_embd;
        let tok = self
            .wte
            .tensor()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c))?;
        let pos = self.wpe.tensor().narrow(0, past, t)?;
        let x = tok.broadcast_add(&pos)?.to_dtype(self.compute_dtype())?;
        let mut x = apply_dropout(x, dropout.as_deref_mut())?;
        let kernels = self.kernels;
        let mask = if t > 1 {
            Some(causal_mask(
                t,
                past + t,
                self.compute_dtype(),
                self.device(),
            )?)
        } else {
            None
        };
        let slots: Vec<Option<&mut Option<(Tensor, Tensor)>>> = match cache {
            Some(cache) => cache.layers.iter_mut().map(Some).collect(),
            None => self.h.iter().map(|_| None).collect(),
        };
        for (block, slot) in self.h.iter().zip(slots) {
            x = block.forward(&x, mask.as_ref(), slot, dropout.as_deref_mut(), kernels)?;
        }
        self.ln_f.forward(&x, kernels)
    }

    /// Σ of the next-token cross-entropy of `rows` sequences `ids` (concatenated)
    /// against `targets`, without gradients: the hand-written forward where it applies
    /// ([`super::backprop`]), else [`Self::loss_sum`]. Validation and `eval` score here.
    pub fn score(&self, ids: &[u32], targets: &[u32], rows: usize) -> Result<f64> {
        if super::backprop::applies(self, 0.0) {
            return super::backprop::loss_and_grads(self, ids, targets, rows, None);
        }
        ensure!(
            rows > 0 && ids.len().is_multiple_of(rows),
            "{} token ids do not split into {rows} sequences",
            ids.len()
        );
        let x = Tensor::from_vec(ids.to_vec(), (rows, ids.len() / rows), self.device())?;
        let y = Tensor::from_vec(targets.to_vec(), targets.len(), self.device())?;
        Ok(self
            .loss_sum(&x, &y, None)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?)
    }

    /// Σ of the next-token cross-entropy of `ids (B, T)` against `targets (B·T)`, on
    /// this model's kernels, differentiable: the reference path of training.
    pub fn loss_sum(
        &self,
        ids: &Tensor,
        targets: &Tensor,
        dropout: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let logits = self
            .forward(ids, None, dropout)?
            .reshape((b * t, self.config.vocab_size))?;
        cross_entropy_sum(&logits, targets, self.kernels)
    }
}

impl Gpt {
    /// Next-token logits `(B, vocab)` for B independent sequences, one new token each,
    /// every sequence continuing its own cache (of any length). This is what lets a
    /// server decode many requests in one pass.
    pub fn decode_step(&self, tokens: &[u32], caches: &mut [&mut KvCache]) -> Result<Tensor> {
        ensure!(
            tokens.len() == caches.len() && !tokens.is_empty(),
            "one token per cache, at least one"
        );
        let positions: Vec<u32> = caches.iter().map(|c| c.len() as u32).collect();
        if let Some(&p) = positions
            .iter()
            .find(|&&p| p as usize >= self.config.n_positions)
        {
            bail!(
                "sequence of {} tokens exceeds the context of {}",
                p + 1,
                self.config.n_positions
            );
        }
        let (b, c) = (tokens.len(), self.config.n_embd);
        let device = self.device();
        let tok = self
            .wte
            .tensor()
            .index_select(&Tensor::new(tokens, device)?, 0)?;
        let pos = self
            .wpe
            .tensor()
            .index_select(&Tensor::new(positions, device)?, 0)?;
        let mut x = (tok + pos)?
            .to_dtype(self.compute_dtype())?
            .reshape((b, 1, c))?;
        for (layer, block) in self.h.iter().enumerate() {
            let mut slots: Vec<&mut Option<(Tensor, Tensor)>> = caches
                .iter_mut()
                .map(|cache| &mut cache.layers[layer])
                .collect();
            x = block.decode_rows(&x, &mut slots, self.kernels)?;
        }
        let x = self.ln_f.forward(&x, self.kernels)?.reshape((b, c))?;
        self.lm_logits(&x)
    }
}

/// Sum over positions of the cross-entropy of `logits (N, V)` against `targets (N)`.
/// Callers divide by the token count they normalise over (the whole accumulation
/// window in training), which is what makes gradient accumulation exact.
pub fn cross_entropy_sum(logits: &Tensor, targets: &Tensor, kernels: Kernels) -> Result<Tensor> {
    if kernels.fused_for(logits) {
        return Ok(super::kernels::cross_entropy_sum(logits, targets)?);
    }
    Ok(cross_entropy_rows(logits, targets)?.sum_all()?)
}

/// Each row's cross-entropy `(N, 1)`, differentiable: the unfused reference, and
/// what a weighted loss multiplies. 16-bit logits are widened to f32 first.
pub fn cross_entropy_rows(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = &logits.to_dtype(super::layers::widened(logits.dtype()))?;
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let log_sum_exp = shifted.exp()?.sum_keepdim(1)?.log()?;
    let picked = shifted.gather(&targets.unsqueeze(1)?, 1)?;
    Ok((log_sum_exp - picked)?)
}
