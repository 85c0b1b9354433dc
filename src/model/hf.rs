//! The Hugging Face model directory: `config.json` (GPT2Config) + `model.safetensors`.
//!
//! Keys are written as `save_pretrained` writes them (`transformer.h.0.…`) and read
//! in either that form or the original hub form (`h.0.…`). The head is tied to `wte`
//! and not stored; attention-mask buffers in old files are ignored.

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

    /// Reads GPT2Config keys, refusing settings this implementation does not compute.
    pub fn from_hf_json(v: &Value, path: &Path) -> Result<Self> {
        let err = |msg: String| anyhow!("{}: {msg}", path.display());
        let get_usize = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|n| n as usize)
                .ok_or_else(|| err(format!("missing or non-integer \"{k}\"")))
        };
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
        if model_type != "gpt2" {
            return Err(err(format!(
                "model_type {model_type:?} is not supported (only \"gpt2\")"
            )));
        }
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
            if let Some(b) = v.get(key).and_then(Value::as_bool) {
                if b != supported {
                    return Err(err(format!("{key} = {b} is not supported")));
                }
            }
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
        };
        config.validate().map_err(|e| err(e.to_string()))?;
        Ok(config)
    }
}

/// Writes `config.json` and `model.safetensors` into `dir` (each atomically).
pub fn save(model: &Gpt, dir: &Path, eot_id: Option<u32>) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    let config = serde_json::to_string_pretty(&model.config.to_hf_json(eot_id))?;
    fsutil::write_atomic(&dir.join(CONFIG_FILE), config.as_bytes())?;
    let tensors: Vec<(String, Tensor)> = model
        .params()
        .into_iter()
        .map(|p| {
            Ok((
                p.name.clone(),
                p.tensor().to_dtype(DType::F32)?.contiguous()?,
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
pub fn load_config(dir: &Path) -> Result<GptConfig> {
    let path = dir.join(CONFIG_FILE);
    parse_config(&fsutil::read(&path)?, &path)
}

/// Parses `config.json` bytes (`path` names them in errors).
pub fn parse_config(bytes: &[u8], path: &Path) -> Result<GptConfig> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| anyhow!("{}: invalid JSON: {e}", path.display()))?;
    GptConfig::from_hf_json(&v, path)
}

/// Loads a model directory onto `device` in f32.
pub fn load(dir: &Path, device: &Device) -> Result<Gpt> {
    let config = load_config(dir)?;
    let path = dir.join(WEIGHTS_FILE);
    from_bytes(&config, &fsutil::read(&path)?, &path, device)
}

/// Builds a model of `config` from `model.safetensors` bytes, checking every name,
/// shape and dtype before anything is allocated for it.
pub fn from_bytes(config: &GptConfig, bytes: &[u8], path: &Path, device: &Device) -> Result<Gpt> {
    let config = config.clone();
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow!("{}: not a valid safetensors file: {e}", path.display()))?;
    let mut by_name = BTreeMap::new();
    for (name, view) in st.tensors() {
        let canonical = if name.starts_with("transformer.") {
            name.clone()
        } else {
            format!("transformer.{name}")
        };
        let ignored = canonical.ends_with(".attn.bias")
            || canonical.ends_with(".attn.masked_bias")
            || canonical == "transformer.lm_head.weight";
        if !ignored {
            by_name.insert(canonical, view);
        }
    }
    let mut used = 0;
    let model = Gpt::build(&config, |name, shape, _| {
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
    })?;
    if used != by_name.len() {
        let known: Vec<String> = model.params().iter().map(|p| p.name.clone()).collect();
        let extra: Vec<&String> = by_name.keys().filter(|k| !known.contains(k)).collect();
        bail!("{}: unexpected tensors {extra:?}", path.display());
    }
    Ok(model)
}
