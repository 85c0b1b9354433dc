//! BERT and DistilBERT masked language models as Hugging Face's `BertForMaskedLM` and
//! `DistilBertForMaskedLM` compute them, top to bottom.
//!
//! Word + position (+ token type, BERT only) embeddings and a layer norm; post-LN
//! encoder blocks of bidirectional self-attention with a key-padding mask and an
//! erf-GELU MLP; the masked-LM head (dense → GELU → layer norm → a decoder tied to the
//! word embeddings, with its own bias). The two families differ only in names and in
//! token types, so one model serves both: [`BertFlavor`] picks the module tree whose
//! names the weights carry, and linear weights keep `nn.Linear`'s (out, in) layout,
//! so loading and saving copy tensors as they are.
//!
//! The per-element work runs on the reference (composed) ops, except layer norm and
//! the loss, which take the fused kernels under [`Kernels::Fused`]; the causal
//! attention and tanh-GELU kernels do not apply here.

use super::kernels::AttentionMask;
use super::layers::{
    apply_dropout, attend, split_heads, Dropout, Init, Kernels, LayerNorm, Linear, MakeParam,
    Param, ParamBuilder, Shape, WeightLayout,
};
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// Which module tree (and so which weight names) the model has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BertFlavor {
    Bert,
    DistilBert,
}

/// Where each weight sits in a flavor's module tree, relative to the encoder root
/// (embeddings, layers) or the model root (head).
struct ModuleNames {
    root: &'static str,
    layers: &'static str,
    query: &'static str,
    key: &'static str,
    value: &'static str,
    attn_out: &'static str,
    attn_ln: &'static str,
    ffn_in: &'static str,
    ffn_out: &'static str,
    out_ln: &'static str,
    head_transform: &'static str,
    head_ln: &'static str,
    /// Module and name of the decoder's bias.
    head_bias: (&'static str, &'static str),
}

const BERT_NAMES: ModuleNames = ModuleNames {
    root: "bert",
    layers: "encoder.layer",
    query: "attention.self.query",
    key: "attention.self.key",
    value: "attention.self.value",
    attn_out: "attention.output.dense",
    attn_ln: "attention.output.LayerNorm",
    ffn_in: "intermediate.dense",
    ffn_out: "output.dense",
    out_ln: "output.LayerNorm",
    head_transform: "cls.predictions.transform.dense",
    head_ln: "cls.predictions.transform.LayerNorm",
    head_bias: ("cls.predictions", "bias"),
};

const DISTILBERT_NAMES: ModuleNames = ModuleNames {
    root: "distilbert",
    layers: "transformer.layer",
    query: "attention.q_lin",
    key: "attention.k_lin",
    value: "attention.v_lin",
    attn_out: "attention.out_lin",
    attn_ln: "sa_layer_norm",
    ffn_in: "ffn.lin1",
    ffn_out: "ffn.lin2",
    out_ln: "output_layer_norm",
    head_transform: "vocab_transform",
    head_ln: "vocab_layer_norm",
    head_bias: ("vocab_projector", "bias"),
};

impl ModuleNames {
    /// A layer's modules, in one order for every flavor.
    fn layer_modules(&self) -> [&'static str; 8] {
        [
            self.query,
            self.key,
            self.value,
            self.attn_out,
            self.attn_ln,
            self.ffn_in,
            self.ffn_out,
            self.out_ln,
        ]
    }

    /// The head's modules (transform, layer norm, decoder bias), in one order.
    fn head_modules(&self) -> [String; 3] {
        [
            self.head_transform.to_string(),
            self.head_ln.to_string(),
            format!("{}.{}", self.head_bias.0, self.head_bias.1),
        ]
    }
}

impl BertFlavor {
    /// Where the weight `name` of a model of this flavor sits in a `teacher` model
    /// whose layer `keep[i]` became layer `i`: the same module under the teacher's
    /// flavor's names (BERT's `attention.self.query` for DistilBERT's
    /// `attention.q_lin`, …). `None` for a weight the teacher has no counterpart of.
    pub fn teacher_name(self, name: &str, teacher: BertFlavor, keep: &[usize]) -> Option<String> {
        let (s, t) = (self.names(), teacher.names());
        if let Some(rest) = name.strip_prefix(&format!("{}.", s.root)) {
            if let Some(rest) = rest.strip_prefix(&format!("{}.", s.layers)) {
                let (index, rest) = rest.split_once('.')?;
                let layer = *keep.get(index.parse::<usize>().ok()?)?;
                let (module, weight) = rest.rsplit_once('.')?;
                let at = s.layer_modules().iter().position(|m| *m == module)?;
                let module = t.layer_modules()[at];
                return Some(format!("{}.{}.{layer}.{module}.{weight}", t.root, t.layers));
            }
            return Some(format!("{}.{rest}", t.root));
        }
        let head = s.head_modules();
        let at = head
            .iter()
            .position(|m| name == m || name.starts_with(&format!("{m}.")))?;
        Some(name.replacen(&head[at], &t.head_modules()[at], 1))
    }

    fn names(self) -> &'static ModuleNames {
        match self {
            BertFlavor::Bert => &BERT_NAMES,
            BertFlavor::DistilBert => &DISTILBERT_NAMES,
        }
    }

    /// The prefix every encoder weight carries in a `save_pretrained` file.
    pub fn root(self) -> &'static str {
        self.names().root
    }

    /// config.json's `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            BertFlavor::Bert => "bert",
            BertFlavor::DistilBert => "distilbert",
        }
    }
}

/// The architecture; serialised as BertConfig / DistilBertConfig keys by [`super::hf`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub flavor: BertFlavor,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Token types (segments); 0 for DistilBERT, which has none.
    pub type_vocab_size: usize,
    pub layer_norm_eps: f64,
    pub dropout: f32,
    pub pad_token_id: u32,
    /// A sequence classifier's label names, in id order; empty for a masked LM.
    #[serde(default)]
    pub labels: Vec<String>,
}

impl BertConfig {
    /// Whether this is a sequence classifier (`…ForSequenceClassification`) rather
    /// than a masked LM.
    pub fn is_classifier(&self) -> bool {
        !self.labels.is_empty()
    }

    pub fn validate(&self) -> Result<()> {
        Shape {
            vocab: ("vocab_size", self.vocab_size),
            positions: ("max_position_embeddings", self.max_position_embeddings),
            layers: ("num_hidden_layers", self.num_hidden_layers),
            heads: ("num_attention_heads", self.num_attention_heads),
            width: ("hidden_size", self.hidden_size),
            ffn: ("intermediate_size", self.intermediate_size),
            dropout: self.dropout,
            labels: self.labels.len(),
        }
        .validate()?;
        ensure!(
            (self.pad_token_id as usize) < self.vocab_size,
            "pad_token_id {} is outside the vocabulary of {}",
            self.pad_token_id,
            self.vocab_size
        );
        ensure!(
            self.type_vocab_size <= 1 << 10,
            "type_vocab_size = {} is beyond the supported maximum of 1024",
            self.type_vocab_size
        );
        Ok(())
    }

    /// Parameters that take part in the products of a token's forward pass: the
    /// encoder's linear layers, the head's transform and the tied decoder.
    pub fn non_embedding_params(&self) -> usize {
        let (c, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let layer = 4 * (c * c + c) + (c * f + f) + (f * c + c) + 4 * c;
        self.num_hidden_layers * layer + (c * c + c) + 2 * c + v * c + v
    }

    /// Training FLOPs per token at sequence length `seq`: 6N for the weights plus
    /// 12·L·d·T for attention, counting the decoder over every position (as the
    /// nanoGPT/llm.c convention does; a loss over the masked positions alone does less).
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        6.0 * self.non_embedding_params() as f64
            + 12.0 * (self.num_hidden_layers * self.hidden_size * seq) as f64
    }
}

struct EncoderLayer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    ffn_in: Linear,
    ffn_out: Linear,
    out_ln: LayerNorm,
}

/// Everything a forward pass is run under: kernels, the heads, the key mask.
struct Pass<'a> {
    kernels: Kernels,
    n_head: usize,
    /// Additive `(B, 1, 1, T)` mask: 0 for real keys, a large negative for padding.
    mask: Option<&'a Tensor>,
    /// The same mask as each sequence's number of keys, where the padding is all on
    /// the right (what the fused attention takes).
    key_lengths: Option<Vec<usize>>,
}

impl EncoderLayer {
    /// Post-LN: `x = LN(x + attention(x))`, then `x = LN(x + mlp(x))`.
    fn forward(
        &self,
        x: &Tensor,
        pass: &Pass,
        mut dropout: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let k = pass.kernels;
        let (q, key, v) = (
            self.query.forward(x, k)?,
            self.key.forward(x, k)?,
            self.value.forward(x, k)?,
        );
        let attention_dropout = dropout.as_ref().is_some_and(|d| d.p > 0.0);
        let context = match &pass.key_lengths {
            Some(lengths) if !attention_dropout && k.fused_for(x) => {
                let qkv = Tensor::cat(&[&q, &key, &v], 2)?;
                let mask = AttentionMask::KeyLengths(lengths.clone());
                super::kernels::attention(&qkv, pass.n_head, mask)?
            }
            _ => {
                let heads = |t: &Tensor| split_heads(t, pass.n_head);
                let mask = pass.mask;
                attend(
                    &heads(&q)?,
                    &heads(&key)?,
                    &heads(&v)?,
                    mask,
                    dropout.as_deref_mut(),
                )?
            }
        };
        let a = apply_dropout(self.attn_out.forward(&context, k)?, dropout.as_deref_mut())?;
        let x = self.attn_ln.forward(&(x + a)?, k)?;
        let h = gelu_erf(&self.ffn_in.forward(&x, k)?, k)?;
        let o = apply_dropout(self.ffn_out.forward(&h, k)?, dropout)?;
        self.out_ln.forward(&(x + o)?, k)
    }
}

/// The masked-LM head: dense → GELU → layer norm → tied decoder + bias.
struct MlmHead {
    transform: Linear,
    ln: LayerNorm,
    bias: Param,
}

/// A sequence classifier's head on the [CLS] position: BERT's tanh pooler, or
/// DistilBERT's pre-classifier with ReLU, then the classifier.
struct ClassifierHead {
    pool: Linear,
    classifier: Linear,
}

enum Head {
    MaskedLm(MlmHead),
    Classifier(ClassifierHead),
}

/// Positions in [`Bert::params`] of each named weight; pairs are (weight, bias).
pub(super) struct BertIndex {
    pub word: usize,
    pub position: usize,
    pub token_type: Option<usize>,
    pub embeddings_ln: (usize, usize),
    pub layers: Vec<LayerIndex>,
    pub head_transform: (usize, usize),
    pub head_ln: (usize, usize),
    pub head_bias: usize,
}

pub(super) struct LayerIndex {
    pub query: (usize, usize),
    pub key: (usize, usize),
    pub value: (usize, usize),
    pub attn_out: (usize, usize),
    pub attn_ln: (usize, usize),
    pub ffn_in: (usize, usize),
    pub ffn_out: (usize, usize),
    pub out_ln: (usize, usize),
}

/// A BERT or DistilBERT masked language model; weights as named fields, in the way
/// of llm.c's `ParameterTensors`.
pub struct Bert {
    pub config: BertConfig,
    pub kernels: Kernels,
    /// Buffers of the hand-written training step, kept between steps.
    pub(super) activations: Box<std::sync::Mutex<super::bert_backprop::Activations>>,
    word_embeddings: Param,
    position_embeddings: Param,
    token_type_embeddings: Option<Param>,
    embeddings_ln: LayerNorm,
    layers: Vec<EncoderLayer>,
    head: Head,
    /// Mixed precision: the type activations and matmuls run in (`None`: the weights').
    compute: Option<DType>,
}

impl Bert {
    /// Builds the model, asking `make(name, shape, init)` for each weight in the
    /// order transformers lists them.
    pub fn build(
        config: &BertConfig,
        mut make: impl FnMut(&str, &[usize], Init) -> Result<Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let names = config.flavor.names();
        let (c, f, eps) = (
            config.hidden_size,
            config.intermediate_size,
            config.layer_norm_eps,
        );
        let std = 0.02;
        let dense = |b: &mut ParamBuilder, n_in, n_out| {
            b.linear(WeightLayout::OutIn, n_in, n_out, std, true)
        };
        let make: &mut MakeParam = &mut make;
        let mut root = ParamBuilder::root(make);
        let mut enc = root.pp(names.root);
        let mut emb = enc.pp("embeddings");
        let embedding = |b: &mut ParamBuilder, name: &str, rows: usize| {
            b.pp(name)
                .param("weight", &[rows, c], Init::Normal(std), true)
        };
        let word_embeddings = embedding(&mut emb, "word_embeddings", config.vocab_size)?;
        let position_embeddings = embedding(
            &mut emb,
            "position_embeddings",
            config.max_position_embeddings,
        )?;
        let token_type_embeddings = match config.flavor {
            BertFlavor::Bert => Some(embedding(
                &mut emb,
                "token_type_embeddings",
                config.type_vocab_size,
            )?),
            BertFlavor::DistilBert => None,
        };
        let embeddings_ln = emb.pp("LayerNorm").layer_norm(c, eps, true)?;
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let mut all = enc.pp(names.layers);
            let mut l = all.pp(i);
            layers.push(EncoderLayer {
                query: dense(&mut l.pp(names.query), c, c)?,
                key: dense(&mut l.pp(names.key), c, c)?,
                value: dense(&mut l.pp(names.value), c, c)?,
                attn_out: dense(&mut l.pp(names.attn_out), c, c)?,
                attn_ln: l.pp(names.attn_ln).layer_norm(c, eps, true)?,
                ffn_in: dense(&mut l.pp(names.ffn_in), c, f)?,
                ffn_out: dense(&mut l.pp(names.ffn_out), f, c)?,
                out_ln: l.pp(names.out_ln).layer_norm(c, eps, true)?,
            });
        }
        let head = if config.is_classifier() {
            // BertForSequenceClassification: bert.pooler.dense, classifier;
            // DistilBertForSequenceClassification: pre_classifier, classifier.
            let pool = match config.flavor {
                BertFlavor::Bert => dense(&mut enc.pp("pooler").pp("dense"), c, c)?,
                BertFlavor::DistilBert => dense(&mut root.pp("pre_classifier"), c, c)?,
            };
            let classifier = dense(&mut root.pp("classifier"), c, config.labels.len())?;
            Head::Classifier(ClassifierHead { pool, classifier })
        } else {
            let (bias_module, bias_name) = names.head_bias;
            let bias = |root: &mut ParamBuilder| {
                root.pp(bias_module)
                    .param(bias_name, &[config.vocab_size], Init::Zeros, true)
            };
            // transformers lists BERT's decoder bias first and DistilBERT's last.
            let early_bias = match config.flavor {
                BertFlavor::Bert => Some(bias(&mut root)?),
                BertFlavor::DistilBert => None,
            };
            let transform = dense(&mut root.pp(names.head_transform), c, c)?;
            let ln = root.pp(names.head_ln).layer_norm(c, eps, true)?;
            let bias = match early_bias {
                Some(b) => b,
                None => bias(&mut root)?,
            };
            Head::MaskedLm(MlmHead {
                transform,
                ln,
                bias,
            })
        };
        Ok(Bert {
            config: config.clone(),
            kernels: Kernels::Fused,
            activations: Default::default(),
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_ln,
            layers,
            head,
            compute: None,
        })
    }

    /// A freshly initialised model: BERT's init (normal 0.02, zero biases, unit layer
    /// norms) drawn from a seeded generator.
    pub fn init(config: &BertConfig, seed: u64, device: &Device) -> Result<Self> {
        Self::build(config, super::layers::fresh(seed, device))
    }

    /// The same weights in another dtype (f64 for finite-difference checks).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let params = self.params();
        Self::build(&self.config, super::layers::copied(&params, dtype))
    }

    /// Every weight, named as `save_pretrained` names it, in transformers' order.
    pub fn params(&self) -> Vec<&Param> {
        let mut out = vec![&self.word_embeddings, &self.position_embeddings];
        out.extend(self.token_type_embeddings.as_ref());
        out.extend([&self.embeddings_ln.weight, &self.embeddings_ln.bias]);
        for l in &self.layers {
            for lin in [&l.query, &l.key, &l.value, &l.attn_out] {
                out.extend([&lin.weight, &lin.bias]);
            }
            out.extend([&l.attn_ln.weight, &l.attn_ln.bias]);
            for lin in [&l.ffn_in, &l.ffn_out] {
                out.extend([&lin.weight, &lin.bias]);
            }
            out.extend([&l.out_ln.weight, &l.out_ln.bias]);
        }
        match (&self.head, self.config.flavor) {
            (Head::Classifier(h), _) => {
                for lin in [&h.pool, &h.classifier] {
                    out.extend([&lin.weight, &lin.bias]);
                }
            }
            (Head::MaskedLm(h), flavor) => {
                let head = [
                    &h.transform.weight,
                    &h.transform.bias,
                    &h.ln.weight,
                    &h.ln.bias,
                ];
                if flavor == BertFlavor::Bert {
                    out.push(&h.bias);
                    out.extend(head);
                } else {
                    out.extend(head);
                    out.push(&h.bias);
                }
            }
        }
        out
    }

    /// Where each named weight sits in [`Self::params`], found by identity (see
    /// `Gpt::param_index`).
    /// A masked LM's only: the hand-written step covers that head.
    pub(super) fn param_index(&self) -> Result<BertIndex> {
        let head = self.mlm_head()?;
        let params = self.params();
        let at = super::layers::position_in(&params);
        let linear = |l: &Linear| (at(&l.weight), at(&l.bias));
        let norm = |l: &LayerNorm| (at(&l.weight), at(&l.bias));
        Ok(BertIndex {
            word: at(&self.word_embeddings),
            position: at(&self.position_embeddings),
            token_type: self.token_type_embeddings.as_ref().map(&at),
            embeddings_ln: norm(&self.embeddings_ln),
            layers: self
                .layers
                .iter()
                .map(|l| LayerIndex {
                    query: linear(&l.query),
                    key: linear(&l.key),
                    value: linear(&l.value),
                    attn_out: linear(&l.attn_out),
                    attn_ln: norm(&l.attn_ln),
                    ffn_in: linear(&l.ffn_in),
                    ffn_out: linear(&l.ffn_out),
                    out_ln: norm(&l.out_ln),
                })
                .collect(),
            head_transform: linear(&head.transform),
            head_ln: norm(&head.ln),
            head_bias: at(&head.bias),
        })
    }

    fn mlm_head(&self) -> Result<&MlmHead> {
        match &self.head {
            Head::MaskedLm(h) => Ok(h),
            Head::Classifier(_) => bail!(
                "this {} is a sequence classifier, not a masked LM",
                self.config.flavor.model_type()
            ),
        }
    }

    pub fn device(&self) -> &Device {
        self.word_embeddings.tensor().device()
    }

    pub fn dtype(&self) -> DType {
        self.word_embeddings.tensor().dtype()
    }

    /// The type activations run in: the weights' unless mixed precision set another.
    pub fn compute_dtype(&self) -> DType {
        self.compute.unwrap_or(self.dtype())
    }

    /// Mixed precision, as [`super::Gpt::set_compute_dtype`].
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        self.compute = (dtype != self.dtype()).then_some(dtype);
    }

    /// The additive key mask `(B, 1, 1, T)` for an attention mask `(B, T)` of 1s
    /// (attend) and 0s (padding), as transformers builds it (the dtype's minimum).
    fn additive_mask(&self, attention_mask: &Tensor) -> Result<Tensor> {
        let (b, t) = attention_mask.dims2()?;
        let dtype = self.compute_dtype();
        let keep = attention_mask.to_dtype(dtype)?;
        let min = match dtype {
            DType::F64 => f64::MIN,
            // The 16-bit types' most negative finite values.
            DType::F16 => -65504.0,
            DType::BF16 => -3.3895313892515355e38,
            _ => f32::MIN as f64,
        };
        Ok(((1.0 - keep)? * min)?.reshape((b, 1, 1, t))?)
    }

    /// Last hidden states `(B, T, C)` for token ids `(B, T)`, with token types (BERT;
    /// zeros when absent) and an attention mask (all ones when absent).
    pub fn hidden_states(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        mut dropout: Option<&mut Dropout>,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            bail!(
                "sequence of {t} tokens exceeds the {} positions of the model",
                self.config.max_position_embeddings
            );
        }
        let c = self.config.hidden_size;
        let words = self
            .word_embeddings
            .tensor()
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c))?;
        let positions = self.position_embeddings.tensor().narrow(0, 0, t)?;
        let mut x = words.broadcast_add(&positions)?;
        if let Some(table) = &self.token_type_embeddings {
            let types = match token_types {
                Some(tt) => tt.flatten_all()?,
                None => Tensor::zeros(b * t, DType::U32, self.device())?,
            };
            x = (x + table.tensor().index_select(&types, 0)?.reshape((b, t, c))?)?;
        } else if token_types.is_some() {
            bail!("DistilBERT has no token types");
        }
        let x = x.to_dtype(self.compute_dtype())?;
        let mut x = apply_dropout(
            self.embeddings_ln.forward(&x, self.kernels)?,
            dropout.as_deref_mut(),
        )?;
        let mask = attention_mask.map(|m| self.additive_mask(m)).transpose()?;
        let key_lengths = match attention_mask {
            Some(m) => {
                let m: Vec<u32> = m.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
                super::kernels::right_padded_lengths(&m, t)
            }
            None => Some(vec![t; b]),
        };
        let pass = Pass {
            kernels: self.kernels,
            n_head: self.config.num_attention_heads,
            mask: mask.as_ref(),
            key_lengths,
        };
        for layer in &self.layers {
            x = layer.forward(&x, &pass, dropout.as_deref_mut())?;
        }
        Ok(x)
    }

    /// A classifier's logits `(B, labels)` from the hidden states `(B, T, C)`, read at
    /// each sequence's first position ([CLS]): BERT's pooler (dense, tanh) or
    /// DistilBERT's pre-classifier (dense, ReLU), then the classifier.
    pub fn classify_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let Head::Classifier(head) = &self.head else {
            bail!(
                "this {} is a masked LM, not a sequence classifier",
                self.config.flavor.model_type()
            )
        };
        let cls = hidden.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?;
        let pooled = head.pool.forward(&cls, self.kernels)?;
        let pooled = match self.config.flavor {
            BertFlavor::Bert => pooled.tanh()?,
            BertFlavor::DistilBert => pooled.relu()?,
        };
        Ok(head
            .classifier
            .forward(&pooled, self.kernels)?
            .to_dtype(self.dtype())?)
    }

    /// Masked-LM logits `(…, vocab)` for hidden states `(…, C)`.
    pub fn mlm_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let c = self.config.hidden_size;
        let rows = hidden.elem_count() / c;
        let head = self.mlm_head()?;
        let h = head
            .transform
            .forward(&hidden.reshape((rows, c))?, self.kernels)?;
        let h = gelu_erf(&h, self.kernels)?;
        let h = head.ln.forward(&h, self.kernels)?;
        let words = self.word_embeddings.tensor().to_dtype(h.dtype())?;
        let logits = h
            .matmul(&words.t()?)?
            .broadcast_add(&head.bias.tensor().to_dtype(h.dtype())?)?
            .to_dtype(self.dtype())?;
        let mut out = dims;
        *out.last_mut().unwrap() = self.config.vocab_size;
        Ok(logits.reshape(out)?)
    }

    /// Masked-LM logits `(M, vocab)` at the `M` positions whose label is not
    /// [`IGNORE`], and those labels (`None` when no position has one). The head runs
    /// on those positions alone.
    pub fn labelled_logits(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        labels: &[u32],
        dropout: Option<&mut Dropout>,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let (b, t) = ids.dims2()?;
        ensure!(labels.len() == b * t, "one label per position");
        let (rows, targets): (Vec<u32>, Vec<u32>) = labels
            .iter()
            .enumerate()
            .filter(|(_, &l)| l != IGNORE)
            .map(|(i, &l)| (i as u32, l))
            .unzip();
        if let Some(&bad) = targets
            .iter()
            .find(|&&l| l as usize >= self.config.vocab_size)
        {
            bail!(
                "label {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            );
        }
        if rows.is_empty() {
            return Ok(None);
        }
        let hidden = self.hidden_states(ids, token_types, attention_mask, dropout)?;
        let device = self.device();
        let picked = hidden
            .reshape((b * t, self.config.hidden_size))?
            .index_select(&Tensor::new(rows, device)?, 0)?;
        Ok(Some((
            self.mlm_logits(&picked)?,
            Tensor::new(targets, device)?,
        )))
    }

    /// Σ of the cross-entropy over the positions whose label is not [`IGNORE`], and
    /// their count, differentiable (see [`Self::labelled_logits`]).
    pub fn masked_lm_loss_sum(
        &self,
        ids: &Tensor,
        token_types: Option<&Tensor>,
        attention_mask: Option<&Tensor>,
        labels: &[u32],
        dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, usize)> {
        match self.labelled_logits(ids, token_types, attention_mask, labels, dropout)? {
            Some((logits, targets)) => Ok((
                super::cross_entropy_sum(&logits, &targets, self.kernels)?,
                targets.elem_count(),
            )),
            None => Ok((Tensor::zeros((), self.dtype(), self.device())?, 0)),
        }
    }
}

/// BERT's GELU (the exact, erf form): the fused kernel where it runs.
fn gelu_erf(x: &Tensor, kernels: Kernels) -> Result<Tensor> {
    if kernels.fused_for(x) {
        return Ok(super::kernels::gelu(x, super::kernels::GeluForm::Erf)?);
    }
    Ok(x.gelu_erf()?)
}

/// The label of a position that takes no part in the loss (transformers' −100).
pub const IGNORE: u32 = u32::MAX;
