//! The Hugging Face model directory: `config.json` + `model.safetensors`, for every
//! family [`ModelConfig`] knows, chosen by config.json's `model_type`.
//!
//! Keys are written as `save_pretrained` writes them (`transformer.h.0.…`,
//! `bert.encoder.…`, `distilbert.transformer.…`) and read in that form or without the
//! base model's prefix (the original hub files: `h.0.…`, `encoder.…`). Tied output
//! embeddings are not stored; copies of them, buffers (`attn.bias`, `position_ids`)
//! and heads another task uses (BERT's pooler and next-sentence head) are ignored.

use super::bert::Bert;
use super::bert::{BertConfig, BertFlavor};
use super::family::{Model, ModelConfig};
use super::gpt::{Gpt, GptConfig};
use crate::fsutil;
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub const CONFIG_FILE: &str = "config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";

impl GptConfig {
    /// GPT2Config keys as transformers writes them.
    pub fn to_hf_json(&self, eot_id: Option<u32>) -> Value {
        let mut v = with_labels(
            self.base_hf_json(eot_id),
            &self.labels,
            "GPT2ForSequenceClassification",
        );
        if let Some(pad) = self.pad_token_id {
            v["pad_token_id"] = json!(pad);
        }
        v
    }

    fn base_hf_json(&self, eot_id: Option<u32>) -> Value {
        json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": null,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "initializer_range": 0.02,
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
            "tie_word_embeddings": true,
            "bos_token_id": eot_id,
            "eos_token_id": eot_id,
            "use_cache": true,
            "dtype": "float32",
            "lmforge_bias": self.bias,
        })
    }
}

/// A config.json reader that names the file in every error.
struct Keys<'a> {
    v: &'a Value,
    path: &'a Path,
}

impl Keys<'_> {
    fn err(&self, msg: String) -> anyhow::Error {
        anyhow!("{}: {msg}", self.path.display())
    }

    fn usize(&self, k: &str) -> Result<usize> {
        self.v
            .get(k)
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .ok_or_else(|| self.err(format!("missing or non-integer \"{k}\"")))
    }

    fn f64_or(&self, k: &str, default: f64) -> Result<f64> {
        match self.v.get(k) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x
                .as_f64()
                .ok_or_else(|| self.err(format!("\"{k}\" must be a number"))),
        }
    }

    fn str_or<'s>(&'s self, k: &str, default: &'s str) -> &'s str {
        self.v.get(k).and_then(Value::as_str).unwrap_or(default)
    }

    /// A sequence classifier's label names in id order (`id2label`, else
    /// `num_labels` of `LABEL_i`) when `architectures` names a
    /// `…ForSequenceClassification`; empty otherwise.
    fn labels(&self) -> Result<Vec<String>> {
        let arch = self
            .v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(Value::as_str)
            .unwrap_or("");
        if !arch.ends_with("ForSequenceClassification") {
            return Ok(Vec::new());
        }
        if let Some(map) = self.v.get("id2label").and_then(Value::as_object) {
            return (0..map.len())
                .map(|i| {
                    map.get(&i.to_string())
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .ok_or_else(|| self.err(format!("id2label has no label for id {i}")))
                })
                .collect();
        }
        Ok((0..self.usize("num_labels")?)
            .map(|i| format!("LABEL_{i}"))
            .collect())
    }

    /// Refuses a boolean key set to the value we do not compute.
    fn require_bool(&self, key: &str, supported: bool) -> Result<()> {
        match self.v.get(key).and_then(Value::as_bool) {
            Some(b) if b != supported => Err(self.err(format!("{key} = {b} is not supported"))),
            _ => Ok(()),
        }
    }
}

/// Adds a classifier's architecture and label maps to a config.json object.
fn with_labels(mut v: Value, labels: &[String], architecture: &str) -> Value {
    if !labels.is_empty() {
        let id2label: serde_json::Map<String, Value> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), json!(l)))
            .collect();
        let label2id: serde_json::Map<String, Value> = labels
            .iter()
            .enumerate()
            .map(|(i, l)| (l.clone(), json!(i)))
            .collect();
        v["architectures"] = json!([architecture]);
        v["id2label"] = Value::Object(id2label);
        v["label2id"] = Value::Object(label2id);
    }
    v
}

impl BertConfig {
    /// BertConfig or DistilBertConfig keys as transformers writes them.
    pub fn to_hf_json(&self) -> Value {
        let classifier = match self.flavor {
            BertFlavor::Bert => "BertForSequenceClassification",
            BertFlavor::DistilBert => "DistilBertForSequenceClassification",
        };
        with_labels(self.base_hf_json(), &self.labels, classifier)
    }

    fn base_hf_json(&self) -> Value {
        match self.flavor {
            BertFlavor::Bert => json!({
                "architectures": ["BertForMaskedLM"],
                "model_type": "bert",
                "vocab_size": self.vocab_size,
                "hidden_size": self.hidden_size,
                "num_hidden_layers": self.num_hidden_layers,
                "num_attention_heads": self.num_attention_heads,
                "intermediate_size": self.intermediate_size,
                "hidden_act": "gelu",
                "hidden_dropout_prob": self.dropout,
                "attention_probs_dropout_prob": self.dropout,
                "max_position_embeddings": self.max_position_embeddings,
                "type_vocab_size": self.type_vocab_size,
                "initializer_range": 0.02,
                "layer_norm_eps": self.layer_norm_eps,
                "pad_token_id": self.pad_token_id,
                "position_embedding_type": "absolute",
                "is_decoder": false,
                "add_cross_attention": false,
                "tie_word_embeddings": true,
                "use_cache": true,
                "dtype": "float32",
            }),
            BertFlavor::DistilBert => json!({
                "architectures": ["DistilBertForMaskedLM"],
                "model_type": "distilbert",
                "vocab_size": self.vocab_size,
                "dim": self.hidden_size,
                "n_layers": self.num_hidden_layers,
                "n_heads": self.num_attention_heads,
                "hidden_dim": self.intermediate_size,
                "activation": "gelu",
                "dropout": self.dropout,
                "attention_dropout": self.dropout,
                "max_position_embeddings": self.max_position_embeddings,
                "sinusoidal_pos_embds": false,
                "initializer_range": 0.02,
                "pad_token_id": self.pad_token_id,
                "tie_word_embeddings": true,
                "dtype": "float32",
            }),
        }
    }

    fn from_hf_json(k: &Keys, flavor: BertFlavor) -> Result<Self> {
        // The two configs' names for the same settings, and what each refuses.
        let (names, refused): ([&str; 6], &[(&str, bool)]) = match flavor {
            BertFlavor::Bert => (
                [
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "intermediate_size",
                    "hidden_act",
                    "hidden_dropout_prob",
                ],
                &[
                    ("is_decoder", false),
                    ("add_cross_attention", false),
                    ("tie_word_embeddings", true),
                ],
            ),
            BertFlavor::DistilBert => (
                [
                    "dim",
                    "n_layers",
                    "n_heads",
                    "hidden_dim",
                    "activation",
                    "dropout",
                ],
                &[
                    ("sinusoidal_pos_embds", false),
                    ("tie_word_embeddings", true),
                ],
            ),
        };
        let [hidden, layers, heads, ffn, act_key, dropout] = names;
        let act = k.str_or(act_key, "gelu");
        if act != "gelu" {
            return Err(k.err(format!(
                "{act_key} {act:?} is not supported (only erf-GELU \"gelu\")"
            )));
        }
        let pos = k.str_or("position_embedding_type", "absolute");
        if pos != "absolute" {
            return Err(k.err(format!(
                "position_embedding_type {pos:?} is not supported (only \"absolute\")"
            )));
        }
        for &(key, supported) in refused {
            k.require_bool(key, supported)?;
        }
        let bert = flavor == BertFlavor::Bert;
        let config = BertConfig {
            flavor,
            vocab_size: k.usize("vocab_size")?,
            max_position_embeddings: k.usize("max_position_embeddings")?,
            hidden_size: k.usize(hidden)?,
            num_hidden_layers: k.usize(layers)?,
            num_attention_heads: k.usize(heads)?,
            intermediate_size: k.usize(ffn)?,
            type_vocab_size: if bert {
                k.usize("type_vocab_size").unwrap_or(2)
            } else {
                0
            },
            // DistilBERT's layer norms use a fixed epsilon.
            layer_norm_eps: if bert {
                k.f64_or("layer_norm_eps", 1e-12)?
            } else {
                1e-12
            },
            dropout: k.f64_or(dropout, 0.1)? as f32,
            pad_token_id: k.f64_or("pad_token_id", 0.0)? as u32,
            labels: k.labels()?,
        };
        config.validate().map_err(|e| k.err(e.to_string()))?;
        Ok(config)
    }
}

impl ModelConfig {
    /// config.json for this architecture (`eot_id`: GPT-2's bos/eos).
    pub fn to_hf_json(&self, eot_id: Option<u32>) -> Value {
        match self {
            ModelConfig::Gpt(c) => c.to_hf_json(eot_id),
            ModelConfig::Bert(c) => c.to_hf_json(),
        }
    }

    /// Reads config.json's keys for the family its `model_type` names.
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self> {
        let keys = Keys { v, path };
        match keys.str_or("model_type", "") {
            "gpt2" => Ok(ModelConfig::Gpt(GptConfig::from_hf_json(v, path)?)),
            "bert" => Ok(ModelConfig::Bert(BertConfig::from_hf_json(
                &keys,
                BertFlavor::Bert,
            )?)),
            "distilbert" => Ok(ModelConfig::Bert(BertConfig::from_hf_json(
                &keys,
                BertFlavor::DistilBert,
            )?)),
            other => Err(keys.err(format!(
                "model_type {other:?} is not supported (gpt2, bert or distilbert)"
            ))),
        }
    }

    /// A weight's name as `save_pretrained` writes it, or `None` for a tensor the
    /// model does not hold (tied copies, buffers, heads of other tasks).
    fn canonical_name(&self, name: &str) -> Option<String> {
        match self {
            ModelConfig::Gpt(c) if c.is_classifier() && name == "score.weight" => {
                Some(name.to_string())
            }
            ModelConfig::Gpt(_) => {
                let full = if name.starts_with("transformer.") {
                    name.to_string()
                } else {
                    format!("transformer.{name}")
                };
                let ignored = full.ends_with(".attn.bias")
                    || full.ends_with(".attn.masked_bias")
                    || full == "transformer.lm_head.weight";
                (!ignored).then_some(full)
            }
            ModelConfig::Bert(c) => {
                let root = c.flavor.root();
                let base_module = ["embeddings.", "encoder.", "pooler.", "transformer."]
                    .iter()
                    .any(|m| name.starts_with(m));
                let full = if base_module {
                    format!("{root}.{name}")
                } else {
                    name.to_string()
                };
                let ignored = full.ends_with("embeddings.position_ids")
                    || (full.starts_with("bert.pooler.") && !c.is_classifier())
                    || full.starts_with("cls.predictions.decoder.")
                    || full.starts_with("cls.seq_relationship.")
                    || full == "vocab_projector.weight";
                (!ignored).then_some(full)
            }
        }
    }
}

impl GptConfig {
    /// Reads GPT2Config keys, refusing settings this implementation does not compute.
    fn from_hf_json(v: &Value, path: &Path) -> Result<Self> {
        let keys = Keys { v, path };
        let err = |msg: String| keys.err(msg);
        let get_usize = |k: &str| keys.usize(k);
        let activation = v
            .get("activation_function")
            .and_then(Value::as_str)
            .unwrap_or("gelu_new");
        if !matches!(activation, "gelu_new" | "gelu_pytorch_tanh") {
            return Err(err(format!(
                "activation_function {activation:?} is not supported (only tanh-GELU \"gelu_new\")"
            )));
        }
        let n_embd = get_usize("n_embd")?;
        if let Some(inner) = v.get("n_inner").filter(|x| !x.is_null()) {
            if inner.as_u64() != Some(4 * n_embd as u64) {
                return Err(err(format!(
                    "n_inner {inner} is not supported (only 4 × n_embd)"
                )));
            }
        }
        for (key, supported) in [
            ("scale_attn_weights", true),
            ("scale_attn_by_inverse_layer_idx", false),
            ("reorder_and_upcast_attn", false),
            ("add_cross_attention", false),
            ("tie_word_embeddings", true),
        ] {
            keys.require_bool(key, supported)?;
        }
        let dropout = v.get("resid_pdrop").and_then(Value::as_f64).unwrap_or(0.0) as f32;
        let config = GptConfig {
            vocab_size: get_usize("vocab_size")?,
            n_positions: get_usize("n_positions")?,
            n_embd,
            n_layer: get_usize("n_layer")?,
            n_head: get_usize("n_head")?,
            layer_norm_epsilon: v
                .get("layer_norm_epsilon")
                .and_then(Value::as_f64)
                .unwrap_or(1e-5),
            bias: v
                .get("lmforge_bias")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            dropout,
            labels: keys.labels()?,
            pad_token_id: v
                .get("pad_token_id")
                .and_then(Value::as_u64)
                .map(|p| p as u32),
        };
        config.validate().map_err(|e| err(e.to_string()))?;
        Ok(config)
    }
}

/// Writes `config.json` and `model.safetensors` into `dir` (each atomically);
/// `eot_id` is GPT-2's bos/eos id.
pub fn save(model: &Model, dir: &Path, eot_id: Option<u32>) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let config = serde_json::to_string_pretty(&model.config().to_hf_json(eot_id))?;
    fsutil::write_atomic(&dir.join(CONFIG_FILE), config.as_bytes())?;
    let tensors: Vec<(String, Tensor)> = model
        .params()
        .into_iter()
        .map(|p| {
            Ok((
                p.name.clone(),
                p.tensor()
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?
                    .contiguous()?,
            ))
        })
        .collect::<Result<_>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes =
        safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(metadata))
            .map_err(|e| anyhow!("serialising weights: {e}"))?;
    fsutil::write_atomic(&dir.join(WEIGHTS_FILE), &bytes)
}

/// Reads `config.json` from a model directory.
pub fn load_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    parse_config(&fsutil::read(&path)?, &path)
}

/// Parses `config.json` bytes (`path` names them in errors).
pub fn parse_config(bytes: &[u8], path: &Path) -> Result<ModelConfig> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))?;
    ModelConfig::from_hf_json(&v, path)
}

/// Loads a model directory onto `device` in f32.
pub fn load(dir: &Path, device: &Device) -> Result<Model> {
    let config = load_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    from_bytes(&config, &fsutil::read(&path)?, &path, device)
}

/// Loads a GPT-2 directory, for what only a causal LM does (`what` names it).
pub fn load_gpt(dir: &Path, device: &Device, what: &str) -> Result<Gpt> {
    load(dir, device)
        .and_then(|m| m.into_gpt(what))
        .map_err(|e| anyhow!("{}: {e}", dir.display()))
}

/// Builds a model of `config` from `model.safetensors` bytes, checking every name,
/// shape and dtype before anything is allocated for it.
pub fn from_bytes(
    config: &ModelConfig,
    bytes: &[u8],
    path: &Path,
    device: &Device,
) -> Result<Model> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let mut by_name = BTreeMap::new();
    for (name, view) in st.tensors() {
        if let Some(canonical) = config.canonical_name(&name) {
            by_name.insert(canonical, view);
        }
    }
    let mut used = 0;
    let make = |name: &str, shape: &[usize], _| -> Result<Tensor> {
        let view = by_name
            .get(name)
            .ok_or_else(|| anyhow!("{}: missing tensor {name}", path.display()))?;
        ensure!(
            view.shape() == shape,
            "{}: tensor {name} has shape {:?}, expected {shape:?} for this config.json",
            path.display(),
            view.shape()
        );
        ensure!(
            matches!(
                view.dtype(),
                safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
            ),
            "{}: tensor {name} has dtype {:?}; expected a float type",
            path.display(),
            view.dtype()
        );
        used += 1;
        let t = view
            .load(device)
            .with_context(|| format!("{}: cannot read tensor {name}", path.display()))?;
        Ok(t.to_dtype(DType::F32)?)
    };
    let model = match config {
        ModelConfig::Gpt(c) => Model::Gpt(Gpt::build(c, make)?),
        ModelConfig::Bert(c) => Model::Bert(Bert::build(c, make)?),
    };
    if used != by_name.len() {
        let known: Vec<String> = model.params().iter().map(|p| p.name.clone()).collect();
        let extra: Vec<&String> = by_name.keys().filter(|k| !known.contains(k)).collect();
        bail!("{}: unexpected tensors {extra:?}", path.display());
    }
    Ok(model)
}
