//! The one model layer every stage uses: a family chosen from config.json's
//! `model_type`, behind one interface — named parameters, the loss of a batch under
//! the family's objective, FLOPs per token — so the trainer, checkpoints, eval,
//! data parallelism and bench are written once for all of them.

use super::gpt::cross_entropy_rows;
use super::kernels::right_padded_lengths;
use super::{backprop, bert_backprop};
use super::{cross_entropy_sum, Bert, BertConfig, Dropout, Gpt, GptConfig, Kernels, Param};
use crate::data::Batch;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

/// How a batch of tokens becomes a loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Predict every next token (GPT-2).
    CausalLm,
    /// Predict the selected positions of a corrupted input (BERT, DistilBERT).
    MaskedLm,
    /// Predict one label per sequence (`…ForSequenceClassification`).
    Classify,
}

/// An architecture, as config.json describes it.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Gpt(GptConfig),
    Bert(BertConfig),
}

impl ModelConfig {
    /// config.json's `model_type`.
    pub fn model_type(&self) -> &'static str {
        match self {
            ModelConfig::Gpt(_) => "gpt2",
            ModelConfig::Bert(c) => c.flavor.model_type(),
        }
    }

    pub fn objective(&self) -> Objective {
        match self {
            ModelConfig::Bert(c) if c.is_classifier() => Objective::Classify,
            ModelConfig::Gpt(c) if c.is_classifier() => Objective::Classify,
            ModelConfig::Gpt(_) => Objective::CausalLm,
            ModelConfig::Bert(_) => Objective::MaskedLm,
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.vocab_size,
            ModelConfig::Bert(c) => c.vocab_size,
        }
    }

    /// The longest sequence the model takes.
    pub fn context_len(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.n_positions,
            ModelConfig::Bert(c) => c.max_position_embeddings,
        }
    }

    /// Training FLOPs per token at sequence length `seq` (6N + attention).
    pub fn flops_per_token(&self, seq: usize) -> f64 {
        match self {
            ModelConfig::Gpt(c) => GptConfig {
                n_positions: seq,
                ..c.clone()
            }
            .flops_per_token(),
            ModelConfig::Bert(c) => c.flops_per_token(seq),
        }
    }

    pub fn set_dropout(&mut self, p: f32) {
        match self {
            ModelConfig::Gpt(c) => c.dropout = p,
            ModelConfig::Bert(c) => c.dropout = p,
        }
    }

    /// The number of transformer layers.
    pub fn layers(&self) -> usize {
        match self {
            ModelConfig::Gpt(c) => c.n_layer,
            ModelConfig::Bert(c) => c.num_hidden_layers,
        }
    }

    /// The same architecture with `layers` layers; a BERT becomes a DistilBERT (no
    /// token types), as a distillation student.
    pub fn with_layers(&self, layers: usize) -> Self {
        match self {
            ModelConfig::Gpt(c) => ModelConfig::Gpt(GptConfig {
                n_layer: layers,
                ..c.clone()
            }),
            ModelConfig::Bert(c) => ModelConfig::Bert(BertConfig {
                flavor: super::BertFlavor::DistilBert,
                num_hidden_layers: layers,
                type_vocab_size: 0,
                ..c.clone()
            }),
        }
    }

    /// The same body as a sequence classifier over `labels` (`…ForSequenceClassification`);
    /// GPT-2 pads with `pad` unless its config names a pad token.
    pub fn set_classifier(&mut self, labels: Vec<String>, pad: u32) {
        match self {
            ModelConfig::Gpt(c) => {
                c.labels = labels;
                c.pad_token_id.get_or_insert(pad);
            }
            ModelConfig::Bert(c) => c.labels = labels,
        }
    }
}

/// A model of any family.
pub enum Model {
    Gpt(Gpt),
    Bert(Bert),
}

impl Model {
    /// A freshly initialised model of `config`, drawn from `seed`.
    pub fn init(config: &ModelConfig, seed: u64, device: &Device) -> Result<Self> {
        Ok(match config {
            ModelConfig::Gpt(c) => Model::Gpt(Gpt::init(c, seed, device)?),
            ModelConfig::Bert(c) => Model::Bert(Bert::init(c, seed, device)?),
        })
    }

    /// A copy of this model's weight `name`, if it has one of that shape.
    fn weight_copy(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        self.params()
            .iter()
            .find(|p| p.name == name && p.tensor().dims() == shape)
            .map(|p| Ok(p.tensor().copy()?))
            .transpose()
    }

    /// A model of `config` that takes every weight it shares with `self` (same name
    /// and shape) and draws the rest from `seed`: a pretrained body with a fresh task
    /// head, as transformers' `from_pretrained` gives one.
    pub fn with_new_head(&self, config: &ModelConfig, seed: u64) -> Result<Self> {
        let mut fresh = super::layers::fresh(seed, self.device());
        let make = |name: &str, shape: &[usize], init| match self.weight_copy(name, shape)? {
            Some(t) => Ok(t),
            None => fresh(name, shape, init),
        };
        Ok(match config {
            ModelConfig::Gpt(c) => Model::Gpt(Gpt::build(c, make)?),
            ModelConfig::Bert(c) => Model::Bert(Bert::build(c, make)?),
        })
    }

    /// A distillation student of `config` (fewer layers; a BERT teacher gives a
    /// DistilBERT) made from this teacher: student layer `i` is teacher layer
    /// `keep[i]`, embeddings and head are copied (BERT's token-type embedding of type 0
    /// folded into the positions, exact for single-segment inputs), and any weight the
    /// teacher has no same-shaped counterpart of is drawn from `seed`.
    pub fn distilled_student(
        &self,
        config: &ModelConfig,
        keep: &[usize],
        seed: u64,
    ) -> Result<Self> {
        let params = self.params();
        let find = |name: &str, shape: &[usize]| self.weight_copy(name, shape);
        let mut fresh = super::layers::fresh(seed, self.device());
        Ok(match (self, config) {
            (Model::Gpt(_), ModelConfig::Gpt(c)) => {
                let make = |name: &str, shape: &[usize], init| {
                    let teacher_name = match name.strip_prefix("transformer.h.") {
                        Some(rest) => {
                            let (i, rest) = rest.split_once('.').unwrap_or((rest, ""));
                            let layer = i.parse::<usize>().ok().and_then(|i| keep.get(i));
                            layer.map(|l| format!("transformer.h.{l}.{rest}"))
                        }
                        None => Some(name.to_string()),
                    };
                    match teacher_name.map(|n| find(&n, shape)).transpose()?.flatten() {
                        Some(t) => Ok(t),
                        None => fresh(name, shape, init),
                    }
                };
                Model::Gpt(Gpt::build(c, make)?)
            }
            (Model::Bert(teacher), ModelConfig::Bert(c)) => {
                let t_flavor = teacher.config.flavor;
                let segment = match params
                    .iter()
                    .find(|p| p.name.ends_with("embeddings.token_type_embeddings.weight"))
                {
                    Some(p) if c.flavor == super::BertFlavor::DistilBert => {
                        Some(p.tensor().narrow(0, 0, 1)?)
                    }
                    _ => None,
                };
                let make = |name: &str, shape: &[usize], init| {
                    let from = c
                        .flavor
                        .teacher_name(name, t_flavor, keep)
                        .map(|n| find(&n, shape))
                        .transpose()?
                        .flatten();
                    match (from, &segment) {
                        (Some(t), Some(seg)) if name.ends_with("position_embeddings.weight") => {
                            Ok(t.broadcast_add(seg)?)
                        }
                        (Some(t), _) => Ok(t),
                        (None, _) => fresh(name, shape, init),
                    }
                };
                Model::Bert(Bert::build(c, make)?)
            }
            _ => bail!("a student is of its teacher's family"),
        })
    }

    /// How a batch becomes this model's loss (without copying its config).
    pub fn objective(&self) -> Objective {
        match self {
            Model::Gpt(m) if m.config.is_classifier() => Objective::Classify,
            Model::Bert(m) if m.config.is_classifier() => Objective::Classify,
            Model::Gpt(_) => Objective::CausalLm,
            Model::Bert(_) => Objective::MaskedLm,
        }
    }

    pub fn config(&self) -> ModelConfig {
        match self {
            Model::Gpt(m) => ModelConfig::Gpt(m.config.clone()),
            Model::Bert(m) => ModelConfig::Bert(m.config.clone()),
        }
    }

    /// Every weight, named as transformers' `save_pretrained` names it.
    pub fn params(&self) -> Vec<&Param> {
        match self {
            Model::Gpt(m) => m.params(),
            Model::Bert(m) => m.params(),
        }
    }

    pub fn device(&self) -> &Device {
        match self {
            Model::Gpt(m) => m.device(),
            Model::Bert(m) => m.device(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Model::Gpt(m) => m.dtype(),
            Model::Bert(m) => m.dtype(),
        }
    }

    /// Mixed precision: activations and matmuls in `dtype`, weights unchanged.
    pub fn set_compute_dtype(&mut self, dtype: DType) {
        match self {
            Model::Gpt(m) => m.set_compute_dtype(dtype),
            Model::Bert(m) => m.set_compute_dtype(dtype),
        }
    }

    pub fn set_kernels(&mut self, kernels: Kernels) {
        match self {
            Model::Gpt(m) => m.kernels = kernels,
            Model::Bert(m) => m.kernels = kernels,
        }
    }

    /// Sets the dropout probability that training passes apply.
    pub fn set_dropout(&mut self, p: f32) {
        match self {
            Model::Gpt(m) => m.config.dropout = p,
            Model::Bert(m) => m.config.dropout = p,
        }
    }

    /// The same weights in another dtype.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        Ok(match self {
            Model::Gpt(m) => Model::Gpt(m.to_dtype(dtype)?),
            Model::Bert(m) => Model::Bert(m.to_dtype(dtype)?),
        })
    }

    /// The GPT-2 inside, for what only a causal LM does (generation, serving).
    pub fn into_gpt(self, what: &str) -> Result<Gpt> {
        match self {
            Model::Gpt(m) if m.config.is_classifier() => {
                bail!("{what} needs a causal language model; this gpt2 is a sequence classifier")
            }
            Model::Gpt(m) => Ok(m),
            Model::Bert(m) => bail!(
                "{what} needs a causal language model (gpt2); this one is a {} masked LM",
                m.config.flavor.model_type()
            ),
        }
    }

    /// The BERT inside, for what only a masked LM does (fill-mask).
    pub fn into_bert(self, what: &str) -> Result<Bert> {
        match self {
            Model::Bert(m) => Ok(m),
            Model::Gpt(_) => {
                bail!("{what} needs a masked language model (bert, distilbert); this one is a gpt2")
            }
        }
    }

    /// Σ of the loss of `batch` under the family's objective and the number of
    /// positions it sums over, differentiable: the reference path of training.
    pub fn loss_sum(
        &self,
        batch: &Batch,
        dropout: Option<&mut Dropout>,
    ) -> Result<(Tensor, usize)> {
        let device = self.device();
        let shape = (batch.batch_size, batch.block_size);
        let ids = Tensor::from_slice(&batch.inputs, shape, device)?;
        match self {
            _ if self.objective() == Objective::Classify => {
                ensure!(
                    batch.targets.len() == batch.batch_size,
                    "a classifier's batch has one label per sequence"
                );
                let logits = self.classify_logits(batch, dropout)?;
                let labels = Tensor::from_slice(&batch.targets, batch.batch_size, device)?;
                let kernels = match self {
                    Model::Gpt(m) => m.kernels,
                    Model::Bert(m) => m.kernels,
                };
                let sum = match &batch.weights {
                    // Each example's loss times its class's weight (a few labels per
                    // row: the unfused rows are cheap).
                    Some(w) => {
                        let w = Tensor::from_slice(w, (batch.batch_size, 1), device)?
                            .to_dtype(logits.dtype())?;
                        (cross_entropy_rows(&logits, &labels)? * w)?.sum_all()?
                    }
                    None => cross_entropy_sum(&logits, &labels, kernels)?,
                };
                Ok((sum, batch.batch_size))
            }
            Model::Gpt(m) => {
                let y = Tensor::from_slice(&batch.targets, batch.targets.len(), device)?;
                Ok((m.loss_sum(&ids, &y, dropout)?, batch.targets.len()))
            }
            Model::Bert(m) => {
                let mask = batch
                    .attention_mask
                    .as_ref()
                    .map(|mask| Tensor::from_slice(mask, shape, device))
                    .transpose()?;
                m.masked_lm_loss_sum(&ids, None, mask.as_ref(), &batch.targets, dropout)
            }
        }
    }

    /// A classifier's logits `(B, labels)` for the sequences of `batch` (right-padded,
    /// with their attention mask).
    pub fn classify_logits(&self, batch: &Batch, dropout: Option<&mut Dropout>) -> Result<Tensor> {
        let device = self.device();
        let shape = (batch.batch_size, batch.block_size);
        let ids = Tensor::from_slice(&batch.inputs, shape, device)?;
        match self {
            Model::Gpt(m) => m.classify_logits(&ids, dropout),
            Model::Bert(m) => {
                let mask = batch
                    .attention_mask
                    .as_ref()
                    .map(|mask| Tensor::from_slice(mask, shape, device))
                    .transpose()?;
                let hidden = m.hidden_states(&ids, None, mask.as_ref(), dropout)?;
                m.classify_logits(&hidden)
            }
        }
    }

    /// The label names of a classifier (empty for a language model).
    pub fn labels(&self) -> &[String] {
        match self {
            Model::Gpt(m) => &m.config.labels,
            Model::Bert(m) => &m.config.labels,
        }
    }

    /// Σ of the loss of `batch` and its position count, without gradients: the
    /// hand-written forward where it applies. Validation and `eval` score here.
    pub fn score(&self, batch: &Batch) -> Result<(f64, usize)> {
        match self.hand_written(batch, 0.0) {
            Some(HandWritten::Gpt(m)) => {
                let sum = m.score(&batch.inputs, &batch.targets, batch.batch_size)?;
                Ok((sum, batch.targets.len()))
            }
            Some(HandWritten::Bert(m, lengths)) => {
                bert_backprop::loss_and_grads(m, &batch.inputs, &batch.targets, &lengths, None)
            }
            None => {
                let (sum, n) = self.loss_sum(batch, None)?;
                Ok((sum.to_dtype(DType::F64)?.to_scalar::<f64>()?, n))
            }
        }
    }

    /// The hand-written step that can stand in for autograd on `batch` (f32 CPU,
    /// fused kernels, no dropout; for BERT, right-padded sequences), if any.
    pub fn hand_written(&self, batch: &Batch, dropout: f32) -> Option<HandWritten<'_>> {
        match self {
            Model::Gpt(m) if backprop::applies(m, dropout) => Some(HandWritten::Gpt(m)),
            Model::Bert(m) if bert_backprop::applies(m, dropout) => {
                let lengths = match &batch.attention_mask {
                    Some(mask) => right_padded_lengths(mask, batch.block_size)?,
                    None => vec![batch.block_size; batch.batch_size],
                };
                Some(HandWritten::Bert(m, lengths))
            }
            _ => None,
        }
    }
}

/// A hand-written step and what it needs beyond the batch.
pub enum HandWritten<'a> {
    Gpt(&'a Gpt),
    /// With each sequence's number of real tokens.
    Bert(&'a Bert, Vec<usize>),
}
