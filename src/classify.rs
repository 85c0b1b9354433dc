//! A trained sequence classifier at work: a label and the probability of every label
//! for texts or token ids (`lmforge predict`, `POST /v1/classify`), and its figures on
//! a labelled file (`lmforge eval --data FILE`).
//!
//! Text is tokenized by the model directory's tokenizer and framed as in training
//! ([CLS] … [SEP] for BERT). Token ids are the model's input sequence as given (what
//! transformers calls `input_ids`, framing included), for a directory without a
//! tokenizer. Both are cut to the model's context.

use crate::data::labelled::{classification_batch, read_examples, Fields, Framing, RawExample};
use crate::data::TextTokenizer;
use crate::eval::{classifier_figures, framing, text_wrap, ClassifierEval};
use crate::model::{hf, Model, Objective};
use crate::train::checkpoint::resolve_model_dir;
use anyhow::{anyhow, bail, ensure, Result};
use candle_core::{DType, Device};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// One input to a model: text, or token ids as given.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    /// The model's input ids, as given.
    Ids(Vec<u32>),
}

/// How text and token ids become a model's input sequences: text through the model
/// directory's tokenizer, framed as in training; ids as given, only cut to the context.
pub struct ModelInputs {
    dir: PathBuf,
    tokenizer: Option<TextTokenizer>,
    text_framing: Option<Framing>,
    /// Ids as given: only cut and padded.
    pub ids_framing: Framing,
    vocab: usize,
}

impl ModelInputs {
    /// The inputs of `model`, loaded from `dir`; `ids_framing` says how the model pads
    /// and how long a sequence may be (text adds BERT's [CLS] … [SEP]).
    pub fn new(dir: &Path, model: &Model, ids_framing: Framing) -> Result<Self> {
        let tokenizer = TextTokenizer::from_model_dir(dir)?;
        let text_framing = match &tokenizer {
            Some(t) => Some(Framing {
                wrap: text_wrap(model, t).map_err(|e| anyhow!("{}: {e}", dir.display()))?,
                ..ids_framing
            }),
            None => None,
        };
        Ok(ModelInputs {
            dir: dir.to_path_buf(),
            tokenizer,
            text_framing,
            ids_framing,
            vocab: model.config().vocab_size(),
        })
    }

    /// The sequence the model takes for `input`.
    pub fn encode(&self, input: &Input) -> Result<Vec<u32>> {
        match input {
            Input::Text(text) => {
                let (Some(tokenizer), Some(framing)) = (&self.tokenizer, &self.text_framing) else {
                    bail!(
                        "{}: no tokenizer.json or vocab.txt to read text with; give token ids instead",
                        self.dir.display()
                    );
                };
                ensure!(!text.trim().is_empty(), "empty text");
                Ok(framing.frame(&tokenizer.encode(text)?))
            }
            Input::Ids(ids) => {
                ensure!(!ids.is_empty(), "empty ids");
                if let Some(bad) = ids.iter().find(|&&id| id as usize >= self.vocab) {
                    bail!(
                        "token id {bad} is not below the vocabulary size {}",
                        self.vocab
                    );
                }
                Ok(self.ids_framing.frame(ids))
            }
        }
    }
}

/// A label and every label's probability, in the model's label order.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub label: String,
    pub score: f64,
    pub scores: Vec<(String, f64)>,
}

impl Prediction {
    /// `{"index", "label", "score", "scores": {label: probability}}`, as `/v1/classify`
    /// and `predict --json` write it.
    pub fn to_json(&self, index: usize) -> Value {
        let scores: serde_json::Map<String, Value> = self
            .scores
            .iter()
            .map(|(name, p)| (name.clone(), json!(p)))
            .collect();
        json!({"index": index, "label": self.label, "score": self.score, "scores": scores})
    }
}

/// A sequence classifier with its inputs.
pub struct Classifier {
    pub model: Model,
    pub dir: PathBuf,
    pub inputs: ModelInputs,
}

/// How many inputs go through the model at once.
pub const BATCH: usize = 16;

impl Classifier {
    /// Loads a classifier directory (or a run directory's newest checkpoint) onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let dir = resolve_model_dir(path)?;
        let model = hf::load(&dir, device)?;
        if model.objective() != Objective::Classify {
            bail!(
                "{}: not a sequence classifier (config.json's architectures has no …ForSequenceClassification); train one with --task classify",
                dir.display()
            );
        }
        let ids_framing = framing(&model, None).map_err(|e| anyhow!("{}: {e}", dir.display()))?;
        let inputs = ModelInputs::new(&dir, &model, ids_framing)?;
        Ok(Classifier { model, dir, inputs })
    }

    pub fn labels(&self) -> &[String] {
        self.model.labels()
    }

    /// The sequence the model takes for `input`.
    pub fn encode(&self, input: &Input) -> Result<Vec<u32>> {
        self.inputs.encode(input)
    }

    /// Each label's probability for each of `sequences` (as [`Self::encode`] makes
    /// them), `batch` sequences a forward pass.
    pub fn probabilities(&self, sequences: &[Vec<u32>], batch: usize) -> Result<Vec<Vec<f64>>> {
        let mut out = Vec::with_capacity(sequences.len());
        for chunk in sequences.chunks(batch.max(1)) {
            let examples: Vec<(Vec<u32>, u32)> = chunk.iter().map(|s| (s.clone(), 0)).collect();
            let batch = classification_batch(&examples, &self.inputs.ids_framing);
            let logits: Vec<Vec<f64>> = self
                .model
                .classify_logits(&batch, None)?
                .to_dtype(DType::F64)?
                .to_vec2()?;
            out.extend(logits.iter().map(|row| softmax(row)));
        }
        Ok(out)
    }

    /// The most likely label (the first of equals) of one row of probabilities.
    pub fn prediction(&self, p: Vec<f64>) -> Prediction {
        let labels = self.labels();
        let best = (0..p.len())
            .max_by(|&a, &b| p[a].total_cmp(&p[b]).then(b.cmp(&a)))
            .unwrap_or(0);
        Prediction {
            label: labels[best].clone(),
            score: p[best],
            scores: labels.iter().cloned().zip(p).collect(),
        }
    }

    /// The classifier's figures on a labelled JSONL, CSV or TSV file (text, or JSONL
    /// `ids`); a label the model does not know is an error naming the file and line.
    pub fn evaluate_file(&self, path: &Path, fields: &Fields) -> Result<ClassifierEval> {
        let examples = read_examples(path, fields)?;
        ensure!(!examples.is_empty(), "{}: no examples", path.display());
        let labels = self.labels();
        let framed: Vec<(Vec<u32>, u32)> = examples
            .iter()
            .map(|e: &RawExample| {
                let at = |err: anyhow::Error| anyhow!("{}:{}: {err}", e.file.display(), e.line);
                let label = labels.iter().position(|l| *l == e.label).ok_or_else(|| {
                    anyhow!(
                        "{}:{}: label {:?} is not one the model knows ({labels:?})",
                        e.file.display(),
                        e.line,
                        e.label
                    )
                })? as u32;
                let input = match &e.ids {
                    Some(ids) => Input::Ids(ids.clone()),
                    None => Input::Text(e.text.clone()),
                };
                Ok((self.encode(&input).map_err(at)?, label))
            })
            .collect::<Result<_>>()?;
        let batches = framed
            .chunks(BATCH)
            .map(|chunk| classification_batch(chunk, &self.inputs.ids_framing));
        classifier_figures(&self.model, batches)
    }
}

/// Softmax of one row of logits, in f64.
fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f64 = e.iter().sum();
    e.iter().map(|x| x / sum).collect()
}
