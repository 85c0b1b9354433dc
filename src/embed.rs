//! Sentence embeddings (`lmforge embed`, `POST /v1/embeddings`): a model's last hidden
//! states pooled as sentence-transformers pools them — the mean over the attention mask
//! (or the [CLS] state) for BERT and DistilBERT, the last token's state for GPT-2 —
//! and, if asked, scaled to unit length.

use crate::classify::{Input, ModelInputs};
use crate::data::labelled::{classification_batch, Framing};
use crate::eval::framing;
use crate::model::{hf, Model};
use crate::train::checkpoint::resolve_model_dir;
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean of the states the attention mask keeps (sentence-transformers' default).
    Mean,
    /// The first ([CLS]) state.
    Cls,
    /// The last real token's state: what a causal model has read the whole text into.
    Last,
}

impl Pooling {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "mean" => Pooling::Mean,
            "cls" => Pooling::Cls,
            "last" => Pooling::Last,
            other => bail!("pooling {other:?}: expected mean, cls or last"),
        })
    }
}

/// How many sequences go through the model at once.
pub const BATCH: usize = 16;

/// A model that turns inputs into vectors.
pub struct Embedder {
    pub model: Model,
    pub dir: PathBuf,
    pub inputs: ModelInputs,
    pub pooling: Pooling,
    pub normalize: bool,
}

impl Embedder {
    /// Loads a model or run directory: BERT, DistilBERT (masked LM or classifier: its
    /// encoder) or GPT-2. `pooling` defaults to mean for BERT and last for GPT-2.
    pub fn load(
        path: &Path,
        (pooling, normalize): (Option<Pooling>, bool),
        device: &Device,
    ) -> Result<Self> {
        let dir = resolve_model_dir(path)?;
        let model = hf::load(&dir, device)?;
        let pooling = match (&model, pooling) {
            (Model::Bert(_), p) => p.unwrap_or(Pooling::Mean),
            (Model::Gpt(_), None | Some(Pooling::Last)) => Pooling::Last,
            (Model::Gpt(_), Some(Pooling::Mean)) => Pooling::Mean,
            (Model::Gpt(_), Some(Pooling::Cls)) => bail!(
                "{}: a GPT-2 has no [CLS] token to pool; use last (default) or mean",
                dir.display()
            ),
        };
        // A causal model's padding is never attended to by the real tokens (they come
        // first), so any id pads a GPT-2 without a pad token.
        let ids_framing = match &model {
            Model::Gpt(g) => Framing {
                wrap: None,
                pad: g.config.pad_token_id.unwrap_or(0),
                max_len: g.config.n_positions,
            },
            Model::Bert(_) => framing(&model, None)?,
        };
        let inputs = ModelInputs::new(&dir, &model, ids_framing)?;
        Ok(Embedder {
            model,
            dir,
            inputs,
            pooling,
            normalize,
        })
    }

    pub fn dim(&self) -> usize {
        match &self.model {
            Model::Gpt(g) => g.config.n_embd,
            Model::Bert(b) => b.config.hidden_size,
        }
    }

    pub fn encode(&self, input: &Input) -> Result<Vec<u32>> {
        self.inputs.encode(input)
    }

    /// One vector per sequence (as [`Self::encode`] makes them), `batch` a forward pass.
    /// Padding never changes a vector: the same sequence alone or in any batch. Batches
    /// are made of sequences of similar length (longest first, as sentence-transformers
    /// does), so little of each pass is padding.
    pub fn embed(&self, sequences: &[Vec<u32>], batch: usize) -> Result<Vec<Vec<f32>>> {
        let mut order: Vec<usize> = (0..sequences.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(sequences[i].len()));
        let sorted: Vec<Vec<u32>> = order.iter().map(|&i| sequences[i].clone()).collect();
        let mut out = vec![Vec::new(); sequences.len()];
        for (&i, v) in order.iter().zip(self.embed_in_order(&sorted, batch)?) {
            out[i] = v;
        }
        Ok(out)
    }

    fn embed_in_order(&self, sequences: &[Vec<u32>], batch: usize) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(sequences.len());
        for chunk in sequences.chunks(batch.max(1)) {
            let examples: Vec<(Vec<u32>, u32)> = chunk.iter().map(|s| (s.clone(), 0)).collect();
            let b = classification_batch(&examples, &self.inputs.ids_framing);
            let (rows, t) = (b.batch_size, b.block_size);
            let device = self.model.device();
            let ids = Tensor::from_vec(b.inputs, (rows, t), device)?;
            let mask_values: Vec<f32> = b
                .attention_mask
                .as_ref()
                .ok_or_else(|| anyhow!("a batch without an attention mask"))?
                .iter()
                .map(|&m| m as f32)
                .collect();
            let mask = Tensor::from_vec(mask_values.clone(), (rows, t), device)?;
            let hidden = match &self.model {
                Model::Bert(m) => m.hidden_states(&ids, None, Some(&mask), None)?,
                Model::Gpt(m) => m.hidden_states(&ids, None, None)?,
            };
            let hidden: Vec<Vec<Vec<f32>>> = hidden.to_dtype(DType::F32)?.to_vec3()?;
            for (r, states) in hidden.iter().enumerate() {
                let len = chunk[r].len();
                let mut v = match self.pooling {
                    Pooling::Cls => states[0].clone(),
                    Pooling::Last => states[len - 1].clone(),
                    Pooling::Mean => {
                        let keep = &mask_values[r * t..(r + 1) * t];
                        let mut sum = vec![0f64; states[0].len()];
                        for (state, &m) in states.iter().zip(keep) {
                            for (s, &x) in sum.iter_mut().zip(state) {
                                *s += (m * x) as f64;
                            }
                        }
                        let count = keep.iter().map(|&m| m as f64).sum::<f64>().max(1e-9);
                        sum.iter().map(|s| (s / count) as f32).collect()
                    }
                };
                if self.normalize {
                    let norm = v
                        .iter()
                        .map(|x| (*x as f64).powi(2))
                        .sum::<f64>()
                        .sqrt()
                        .max(1e-12);
                    v.iter_mut().for_each(|x| *x = (*x as f64 / norm) as f32);
                }
                out.push(v);
            }
        }
        Ok(out)
    }
}
