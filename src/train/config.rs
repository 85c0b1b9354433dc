//! Training configuration: a flat TOML preset plus `--set key=value` overrides.

use super::optim::AdamWConfig;
use super::precision::Precision;
use crate::data::TokenizerSpec;
use crate::device::DeviceSpec;
use crate::model::{BertConfig, BertFlavor, GptConfig, ModelConfig};
use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Text to prepare when `data` has no shards: a file, a directory of `.txt`, or
    /// the embedded corpus ([`crate::data::prepare::EMBEDDED_CORPUS`]).
    #[serde(with = "empty_is_none")]
    pub corpus: Option<String>,
    pub data: PathBuf,
    pub tokenizer: TokenizerSpec,
    /// `lm` (language modelling on token shards) or `classify` (labelled examples
    /// from `prepare --task classify`).
    #[serde(default = "lm")]
    pub task: String,
    pub val_fraction: f64,
    pub out_dir: PathBuf,
    /// A Hugging Face model (or run) directory to fine-tune; its config wins over
    /// the shape keys.
    #[serde(with = "empty_is_none")]
    pub init_from: Option<PathBuf>,

    /// Distillation: the teacher's model or run directory.
    #[serde(default, with = "empty_is_none")]
    pub teacher: Option<PathBuf>,
    /// Distillation: the student's layer count (0: half the teacher's, rounded up).
    #[serde(default)]
    pub student_layers: usize,
    /// Distillation: a config.json for the student instead of `student_layers`.
    #[serde(default, with = "empty_is_none")]
    pub student_config: Option<PathBuf>,
    #[serde(default = "two")]
    pub temperature: f64,
    #[serde(default = "five")]
    pub alpha_ce: f64,
    #[serde(default = "two")]
    pub alpha_lm: f64,
    #[serde(default = "one")]
    pub alpha_cos: f64,

    /// The family of a fresh model: gpt2 (causal LM), bert or distilbert (masked LM).
    #[serde(default = "gpt2")]
    pub model_type: String,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub block_size: usize,
    pub dropout: f64,
    pub bias: bool,
    /// Masked LM: the share of positions selected for prediction.
    #[serde(default = "mlm_probability")]
    pub mlm_probability: f64,
    /// Classification: per-label loss weights, `""`, `"balanced"` or `"w0,w1,…"`.
    #[serde(default)]
    pub class_weights: String,

    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_steps: usize,
    /// When > 0, replaces max_steps: passes over the training tokens (HF's num_train_epochs).
    pub epochs: f64,
    pub lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub grad_clip: f64,

    pub eval_every: usize,
    pub eval_batches: usize,
    pub save_every: usize,
    pub keep_last: usize,
    /// Also keep the checkpoint with the lowest validation loss, whatever its age.
    pub keep_best: bool,
    /// What `keep_best` and `patience` judge by (see [`Metric`]).
    #[serde(default = "val_loss")]
    pub metric: String,
    /// Evaluations in a row without a better `metric` before training stops (0: never).
    #[serde(default)]
    pub patience: usize,
    /// Consecutive steps with a non-finite loss or gradient norm before training stops.
    pub max_bad_steps: usize,
    pub log_every: usize,
    /// Also write the metrics as TensorBoard event files in the run directory.
    #[serde(default)]
    pub tensorboard: bool,
    /// Characters sampled at each evaluation (into samples.jsonl) and at the end.
    pub sample_tokens: usize,
    pub seed: u64,
    pub peak_gflops: f64,
    /// Data parallel (under mpirun): 0 = all-reduce gradients; 1 = ZeRO-1 (optimizer
    /// state and update sharded across ranks).
    pub zero_stage: usize,
    /// Seconds a collective may wait for the other ranks before this one gives up.
    pub collective_timeout_s: f64,
    /// Where the model trains: cpu, cuda or cuda:N (under a launcher, rank r of a
    /// machine takes GPU N + its local rank).
    #[serde(default)]
    pub device: DeviceSpec,
    /// What matmuls and activations compute in: f32, or bf16 / fp16 with f32 master
    /// weights, gradients and AdamW state (ADR 014); fp16 scales the loss.
    #[serde(default)]
    pub dtype: Precision,
}

/// An optional path or name kept in TOML as a string, `""` for none, so every key
/// keeps a value that `--set` can replace.
mod empty_is_none {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::ffi::OsStr;

    pub fn serialize<S: Serializer, T: AsRef<OsStr>>(
        v: &Option<T>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_str(
            &v.as_ref()
                .map_or(String::new(), |x| x.as_ref().to_string_lossy().into_owned()),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: From<String>>(
        d: D,
    ) -> Result<Option<T>, D::Error> {
        let s = String::deserialize(d)?;
        Ok((!s.is_empty()).then(|| T::from(s)))
    }
}

fn gpt2() -> String {
    "gpt2".into()
}

fn one() -> f64 {
    1.0
}

fn two() -> f64 {
    2.0
}

fn five() -> f64 {
    5.0
}

fn lm() -> String {
    "lm".into()
}

fn val_loss() -> String {
    "val_loss".into()
}

/// What a run's evaluations are judged by, for `keep_best` and early stopping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    ValLoss,
    Accuracy,
    F1Macro,
    PrecisionMacro,
    RecallMacro,
    Mcc,
}

impl Metric {
    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "val_loss" => Metric::ValLoss,
            "accuracy" => Metric::Accuracy,
            "f1_macro" => Metric::F1Macro,
            "precision_macro" => Metric::PrecisionMacro,
            "recall_macro" => Metric::RecallMacro,
            "mcc" => Metric::Mcc,
            other => bail!("metric {other:?}: expected val_loss, accuracy, f1_macro, precision_macro, recall_macro or mcc"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::ValLoss => "val_loss",
            Metric::Accuracy => "accuracy",
            Metric::F1Macro => "f1_macro",
            Metric::PrecisionMacro => "precision_macro",
            Metric::RecallMacro => "recall_macro",
            Metric::Mcc => "mcc",
        }
    }

    /// The metrics.jsonl key an evaluation records this metric under.
    pub fn record_key(self) -> String {
        match self {
            Metric::ValLoss => "val_loss".into(),
            m => format!("val_{}", m.name()),
        }
    }

    /// Whether `a` is strictly better than `b` (loss goes down, the rest up); NaN never is.
    pub fn better(self, a: f64, b: f64) -> bool {
        match self {
            Metric::ValLoss => a < b,
            _ => a > b,
        }
    }

    /// Its value in a classifier's evaluation.
    pub fn of(self, loss: f64, report: &crate::metrics::ClassificationReport) -> f64 {
        match self {
            Metric::ValLoss => loss,
            Metric::Accuracy => report.accuracy,
            Metric::F1Macro => report.macro_f1,
            Metric::PrecisionMacro => report.macro_precision,
            Metric::RecallMacro => report.macro_recall,
            Metric::Mcc => report.mcc,
        }
    }
}

fn mlm_probability() -> f64 {
    0.15
}

impl Default for TrainConfig {
    /// The embedded default preset.
    fn default() -> Self {
        toml::from_str(crate::DEFAULT_PRESET).expect("embedded preset matches TrainConfig")
    }
}

impl TrainConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_string(path)?;
        Self::from_toml(&text).with_context(|| path.display().to_string())
    }

    /// Parses a preset; keys it leaves out keep the default preset's values.
    pub fn from_toml(text: &str) -> Result<Self> {
        let user: toml::Table = toml::from_str(text).map_err(|e| anyhow!("{}", e.message()))?;
        let mut table = Self::default().to_table();
        table.extend(user);
        TrainConfig::deserialize(toml::Value::Table(table)).map_err(|e| anyhow!("{}", e.message()))
    }

    fn to_table(&self) -> toml::Table {
        toml::Table::try_from(self).expect("config serialises to a table")
    }

    /// Valid keys, in declaration order.
    pub fn keys() -> Vec<String> {
        let value = toml::Value::try_from(TrainConfig::default()).expect("config serialises");
        let text = toml::to_string(&value).expect("config serialises");
        text.lines()
            .filter_map(|l| l.split_once(" = ").map(|(k, _)| k.to_string()))
            .collect()
    }

    /// Applies one `key=value` override, parsing the value as the key's type.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, raw) = assignment
            .split_once('=')
            .ok_or_else(|| anyhow!("--set {assignment}: expected key=value"))?;
        let (key, raw) = (key.trim(), raw.trim());
        let mut table = self.to_table();
        let slot = table.get_mut(key).ok_or_else(|| {
            anyhow!(
                "--set {key}: unknown key; valid keys: {}",
                Self::keys().join(" ")
            )
        })?;
        let bad = |what: &str| anyhow!("--set {key}={raw}: expected {what}");
        *slot = match slot {
            toml::Value::Integer(_) => {
                toml::Value::Integer(raw.parse().map_err(|_| bad("a non-negative integer"))?)
            }
            toml::Value::Float(_) => toml::Value::Float(raw.parse().map_err(|_| bad("a number"))?),
            toml::Value::Boolean(_) => {
                toml::Value::Boolean(raw.parse().map_err(|_| bad("true or false"))?)
            }
            _ => toml::Value::String(raw.to_string()),
        };
        // toml appends "in `key`" on lines of its own: the first line is the message.
        *self = TrainConfig::deserialize(toml::Value::Table(table)).map_err(|e| {
            let e = e.to_string();
            anyhow!(
                "--set {key}={raw}: {}",
                e.lines().next().unwrap_or_default()
            )
        })?;
        Ok(())
    }

    /// Catches settings that would fail later or silently misbehave.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("max_steps", self.max_steps),
            ("eval_batches", self.eval_batches),
            ("block_size", self.block_size),
            ("max_bad_steps", self.max_bad_steps),
        ];
        for (k, v) in positive {
            if v == 0 {
                bail!("{k} must be positive");
            }
        }
        if !(self.lr > 0.0 && self.min_lr >= 0.0 && self.min_lr <= self.lr) {
            bail!(
                "need lr > 0 and 0 <= min_lr <= lr (lr {}, min_lr {})",
                self.lr,
                self.min_lr
            );
        }
        if !(0.0..1.0).contains(&self.beta1) || !(0.0..1.0).contains(&self.beta2) {
            bail!("beta1 and beta2 must be in [0, 1)");
        }
        if self.zero_stage > 1 {
            bail!("zero_stage {} is not supported (0 or 1)", self.zero_stage);
        }
        if self.collective_timeout_s <= 0.0 {
            bail!("collective_timeout_s must be > 0");
        }
        if self.epochs < 0.0 {
            bail!("epochs must be >= 0 (0 means: use max_steps)");
        }
        if self.weight_decay < 0.0 || self.grad_clip < 0.0 {
            bail!("weight_decay and grad_clip must be >= 0");
        }
        if self.teacher.is_some() {
            ensure!(
                self.temperature > 0.0,
                "temperature must be > 0 (distillation)"
            );
            ensure!(
                [self.alpha_ce, self.alpha_lm, self.alpha_cos]
                    .iter()
                    .all(|a| *a >= 0.0),
                "alpha_ce, alpha_lm and alpha_cos must be >= 0"
            );
            ensure!(
                self.init_from.is_none(),
                "distillation builds its student from the teacher: leave init_from empty"
            );
            ensure!(
                !self.is_classification(),
                "distillation is for language models (task = \"lm\")"
            );
        }
        let metric = self.metric()?;
        match self.task.as_str() {
            "lm" => {
                ensure!(
                    metric == Metric::ValLoss,
                    "metric {:?} is a classification metric; a language model is judged by val_loss",
                    self.metric
                );
                ensure!(
                    self.class_weights.is_empty(),
                    "class_weights is for task = \"classify\""
                );
            }
            "classify" => {}
            other => bail!("task {other:?}: expected lm or classify"),
        }
        Ok(())
    }

    pub fn metric(&self) -> Result<Metric> {
        Metric::parse(&self.metric)
    }

    pub fn is_classification(&self) -> bool {
        self.task == "classify"
    }

    /// A fresh model's architecture for a vocabulary of `vocab_size` (`pad_id`: the
    /// padding token of a masked LM).
    pub fn model_config(&self, vocab_size: usize, pad_id: Option<u32>) -> Result<ModelConfig> {
        let flavor = match self.model_type.as_str() {
            "gpt2" => {
                return Ok(ModelConfig::Gpt(GptConfig {
                    vocab_size,
                    n_positions: self.block_size,
                    n_embd: self.n_embd,
                    n_layer: self.n_layer,
                    n_head: self.n_head,
                    layer_norm_epsilon: 1e-5,
                    bias: self.bias,
                    dropout: self.dropout as f32,
                    labels: Vec::new(),
                    pad_token_id: None,
                }))
            }
            "bert" => BertFlavor::Bert,
            "distilbert" => BertFlavor::DistilBert,
            other => bail!("model_type {other:?}: expected gpt2, bert or distilbert"),
        };
        ensure!(
            self.bias,
            "bias = false is supported for gpt2 only, not {}",
            self.model_type
        );
        let pad_token_id = pad_id.ok_or_else(|| {
            anyhow!(
                "model_type {} needs a BERT tokenizer ([PAD] [UNK] [CLS] [SEP] [MASK]): prepare the data with --tokenizer wordpiece:N",
                self.model_type
            )
        })?;
        Ok(ModelConfig::Bert(BertConfig {
            flavor,
            vocab_size,
            max_position_embeddings: self.block_size,
            hidden_size: self.n_embd,
            num_hidden_layers: self.n_layer,
            num_attention_heads: self.n_head,
            intermediate_size: 4 * self.n_embd,
            type_vocab_size: if flavor == BertFlavor::Bert { 2 } else { 0 },
            layer_norm_eps: 1e-12,
            dropout: self.dropout as f32,
            pad_token_id,
            labels: Vec::new(),
        }))
    }

    /// Takes a pretrained model's shape, so checkpoints and logs say the truth.
    pub fn adopt_shape(&mut self, config: &ModelConfig) {
        self.model_type = config.model_type().to_string();
        match config {
            ModelConfig::Gpt(c) => {
                (self.n_layer, self.n_head, self.n_embd, self.bias) =
                    (c.n_layer, c.n_head, c.n_embd, c.bias)
            }
            ModelConfig::Bert(c) => {
                (self.n_layer, self.n_head, self.n_embd) =
                    (c.num_hidden_layers, c.num_attention_heads, c.hidden_size)
            }
        }
    }

    /// Resolves `epochs` into `max_steps` for a training set of `units` (tokens, or
    /// examples for a classifier) of which one step consumes `per_step`.
    pub fn resolve_epochs(&mut self, units: usize, per_step: usize) {
        if self.epochs > 0.0 {
            self.max_steps = ((self.epochs * units as f64) / per_step.max(1) as f64)
                .ceil()
                .max(1.0) as usize;
        }
    }

    /// The distillation loss's weights, when distilling.
    pub fn distillation(&self) -> Option<crate::train::distill::DistillSpec> {
        self.teacher
            .as_ref()
            .map(|_| crate::train::distill::DistillSpec {
                temperature: self.temperature,
                alpha_ce: self.alpha_ce,
                alpha_lm: self.alpha_lm,
                alpha_cos: self.alpha_cos,
            })
    }

    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: 1e-8,
            weight_decay: self.weight_decay,
        }
    }

    pub fn tokens_per_step(&self) -> usize {
        self.batch_size * self.grad_accum * self.block_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_nanogpt_cpu_recipe() {
        let c = TrainConfig::default();
        assert_eq!(
            (c.n_layer, c.n_head, c.n_embd, c.block_size, c.batch_size),
            (4, 4, 128, 64, 12)
        );
        assert_eq!(
            (c.lr, c.min_lr, c.warmup_steps, c.max_steps),
            (1e-3, 1e-4, 100, 2000)
        );
        assert_eq!(
            (c.eval_every, c.eval_batches, c.grad_clip, c.weight_decay),
            (250, 20, 1.0, 0.1)
        );
    }

    #[test]
    fn set_parses_by_type_and_rejects_unknown_keys() {
        let mut c = TrainConfig::default();
        c.set("lr=3e-4").unwrap();
        c.set("max_steps=50").unwrap();
        c.set("bias=false").unwrap();
        c.set("tokenizer=bpe:512").unwrap();
        assert_eq!(
            (c.lr, c.max_steps, c.bias, &c.tokenizer),
            (3e-4, 50, false, &TokenizerSpec::Bpe(512))
        );
        c.set("init_from=some/dir").unwrap();
        assert_eq!(c.init_from, Some(PathBuf::from("some/dir")));
        c.set("init_from=").unwrap();
        assert_eq!(c.init_from, None);
        assert!(c.set("tokenizer=bpe:x").is_err());
        let err = c.set("learning_rate=1").unwrap_err().to_string();
        assert!(
            err.contains("unknown key") && err.contains("n_layer") && err.contains("seed"),
            "{err}"
        );
        assert!(c.set("max_steps=-1").is_err());
        assert!(c.set("bias=maybe").is_err());
        for key in [
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "dropout",
            "bias",
            "batch_size",
            "grad_accum",
            "max_steps",
            "lr",
            "min_lr",
            "warmup_steps",
            "weight_decay",
            "beta1",
            "beta2",
            "grad_clip",
            "eval_every",
            "eval_batches",
            "save_every",
            "keep_last",
            "seed",
        ] {
            assert!(TrainConfig::keys().contains(&key.to_string()), "{key}");
        }
    }

    #[test]
    fn partial_file_fills_from_default_and_unknown_keys_fail() {
        let c = TrainConfig::from_toml("n_layer = 2\n").unwrap();
        assert_eq!((c.n_layer, c.n_embd), (2, 128));
        assert!(TrainConfig::from_toml("n_layers = 2\n")
            .unwrap_err()
            .to_string()
            .contains("n_layers"));
    }
}
