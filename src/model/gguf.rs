//! GPT-2 as GGUF, the file llama.cpp runs: `lmforge quantize` writes one, and
//! `generate`, `eval`, `serve` and `bench` run one with its matrix products quantised
//! (candle's `QMatMul`).
//!
//! The layout is llama.cpp's `gpt2` architecture: `token_embd`, `position_embd`,
//! `output_norm`, and per block `blk.N.attn_norm`, `attn_qkv`, `attn_output`,
//! `ffn_norm`, `ffn_up`, `ffn_down` — weights `(out, in)` (HF's Conv1D `(in, out)`
//! transposed), the head tied to `token_embd`; metadata `gpt2.*` and
//! `tokenizer.ggml.*` (byte-level BPE tokens and merges). Matrices are quantised to
//! the chosen type; one whose rows do not split into the type's blocks stays f16, and
//! norms, biases and the position table stay f32.

use super::gpt::GptConfig;
use super::Gpt;
use crate::data::TextTokenizer;
use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// A quantisation type `lmforge quantize --type` offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    Q8_0,
    Q4_0,
    Q4K,
}

impl QuantType {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "q8_0" => QuantType::Q8_0,
            "q4_0" => QuantType::Q4_0,
            "q4_k" => QuantType::Q4K,
            other => bail!("--type {other}: expected q8_0, q4_0 or q4_k"),
        })
    }

    fn ggml(self) -> GgmlDType {
        match self {
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q4K => GgmlDType::Q4K,
        }
    }

    /// llama.cpp's `general.file_type` (llama_ftype: MOSTLY_Q8_0, MOSTLY_Q4_0, MOSTLY_Q4_K_M).
    fn file_type(self) -> u32 {
        match self {
            QuantType::Q8_0 => 7,
            QuantType::Q4_0 => 2,
            QuantType::Q4K => 15,
        }
    }
}

/// Where a GPT-2 weight goes in GGUF: its name there and whether it is a Conv1D
/// matrix stored `(in, out)` by transformers (transposed in the file).
fn gguf_name(hf: &str) -> Option<(String, bool)> {
    let fixed = match hf {
        "transformer.wte.weight" => Some("token_embd.weight"),
        "transformer.wpe.weight" => Some("position_embd.weight"),
        "transformer.ln_f.weight" => Some("output_norm.weight"),
        "transformer.ln_f.bias" => Some("output_norm.bias"),
        _ => None,
    };
    if let Some(name) = fixed {
        return Some((name.to_string(), false));
    }
    let rest = hf.strip_prefix("transformer.h.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let gguf_module = match module {
        "ln_1" => "attn_norm",
        "attn.c_attn" => "attn_qkv",
        "attn.c_proj" => "attn_output",
        "ln_2" => "ffn_norm",
        "mlp.c_fc" => "ffn_up",
        "mlp.c_proj" => "ffn_down",
        _ => return None,
    };
    let conv1d = kind == "weight" && !module.starts_with("ln_");
    Some((format!("blk.{layer}.{gguf_module}.{kind}"), conv1d))
}

/// What `quantize` wrote.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// Matrices quantised to the chosen type.
    pub quantized: usize,
    /// Matrices kept in f16 because their rows do not split into the type's blocks.
    pub kept_f16: Vec<String>,
    pub bytes: u64,
}

/// Writes `model` (a causal GPT-2) with its byte-level BPE `tokenizer` as a GGUF of
/// `qtype` at `path` (atomically).
pub fn write(
    model: &Gpt,
    tokenizer: &TextTokenizer,
    qtype: QuantType,
    path: &Path,
) -> Result<QuantizeReport> {
    ensure!(
        !model.config.is_classifier(),
        "a GPT-2 sequence classifier has no llama.cpp architecture; quantize a causal LM"
    );
    let c = &model.config;
    let dtype = qtype.ggml();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut report = QuantizeReport {
        quantized: 0,
        kept_f16: Vec::new(),
        bytes: 0,
    };
    for p in model.params() {
        let (name, conv1d) =
            gguf_name(&p.name).ok_or_else(|| anyhow!("{}: no GGUF name for it", p.name))?;
        let mut t = p.tensor().to_dtype(DType::F32)?;
        if conv1d {
            t = t.t()?.contiguous()?;
        }
        let matrix = t.rank() == 2 && name != "position_embd.weight";
        let q = if !matrix {
            QTensor::quantize(&t, GgmlDType::F32)?
        } else if t.dim(1)? % dtype.block_size() == 0 {
            report.quantized += 1;
            QTensor::quantize(&t, dtype)?
        } else {
            report.kept_f16.push(name.clone());
            QTensor::quantize(&t, GgmlDType::F16)?
        };
        tensors.push((name, q));
    }
    ensure!(
        report.quantized > 0,
        "{}: no matrix of this model has rows that split into {:?} blocks of {} (width {}); choose q8_0 or q4_0 (blocks of 32)",
        path.display(),
        dtype,
        dtype.block_size(),
        c.n_embd
    );
    let (tokens, merges) = tokenizer.byte_level_bpe().ok_or_else(|| {
        anyhow!("llama.cpp reads a byte-level BPE tokenizer (GPT-2's, or prepare --tokenizer bpe:N); this model's is not one")
    })?;
    let string = |s: &str| Value::String(s.to_string());
    let u32v = |v: usize| Value::U32(v as u32);
    let strings = |v: &[String]| Value::Array(v.iter().map(|s| string(s)).collect());
    let eot = tokenizer.eot_id();
    let token_types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i as u32 == eot { 3 } else { 1 }))
        .collect();
    let metadata: Vec<(&str, Value)> = vec![
        ("general.architecture", string("gpt2")),
        ("general.name", string("lmforge")),
        ("general.file_type", Value::U32(qtype.file_type())),
        ("gpt2.context_length", u32v(c.n_positions)),
        ("gpt2.embedding_length", u32v(c.n_embd)),
        ("gpt2.feed_forward_length", u32v(4 * c.n_embd)),
        ("gpt2.block_count", u32v(c.n_layer)),
        ("gpt2.attention.head_count", u32v(c.n_head)),
        (
            "gpt2.attention.layer_norm_epsilon",
            Value::F32(c.layer_norm_epsilon as f32),
        ),
        ("tokenizer.ggml.model", string("gpt2")),
        ("tokenizer.ggml.pre", string("gpt-2")),
        ("tokenizer.ggml.tokens", strings(&tokens)),
        ("tokenizer.ggml.token_type", Value::Array(token_types)),
        ("tokenizer.ggml.merges", strings(&merges)),
        ("tokenizer.ggml.bos_token_id", Value::U32(eot)),
        ("tokenizer.ggml.eos_token_id", Value::U32(eot)),
    ];
    let mut bytes = std::io::Cursor::new(Vec::new());
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut bytes, &meta, &refs)?;
    let bytes = bytes.into_inner();
    report.bytes = bytes.len() as u64;
    crate::fsutil::write_atomic(path, &bytes)?;
    Ok(report)
}

/// A metadata value as an unsigned integer.
fn meta_usize(ct: &gguf_file::Content, key: &str, path: &Path) -> Result<usize> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| anyhow!("{}: no {key} in the GGUF metadata", path.display()))?;
    Ok(match v {
        Value::U32(x) => *x as usize,
        Value::U64(x) => *x as usize,
        Value::I32(x) if *x >= 0 => *x as usize,
        _ => bail!("{}: {key} is not an unsigned integer", path.display()),
    })
}

fn meta_strings(ct: &gguf_file::Content, key: &str) -> Option<Vec<String>> {
    match ct.metadata.get(key)? {
        Value::Array(items) => items.iter().map(|v| v.to_string().ok().cloned()).collect(),
        _ => None,
    }
}

/// Reads a GGUF of llama.cpp's `gpt2` architecture: the model (its matrix products
/// quantised as stored) and its tokenizer, if it carries one. A file that is not a
/// GGUF, is truncated, or holds another architecture is an error naming it.
pub fn read(path: &Path, device: &Device) -> Result<(Gpt, Option<TextTokenizer>)> {
    // candle's errors may carry a backtrace after their first line.
    let first_line = |e: &dyn std::fmt::Display| {
        let text = e.to_string();
        text.lines().next().unwrap_or("").to_string()
    };
    let bad = |e: &dyn std::fmt::Display| {
        anyhow!(
            "{}: not a readable GGUF file: {}",
            path.display(),
            first_line(e)
        )
    };
    let mut file =
        std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let len = file.metadata()?.len();
    let ct = gguf_file::Content::read(&mut file).map_err(|e| bad(&e))?;
    let arch = match ct.metadata.get("general.architecture") {
        Some(Value::String(s)) => s.clone(),
        _ => bail!(
            "{}: no general.architecture in the GGUF metadata",
            path.display()
        ),
    };
    ensure!(
        arch == "gpt2",
        "{}: a GGUF of architecture {arch:?}; lmforge runs gpt2",
        path.display()
    );
    let end = ct
        .tensor_infos
        .values()
        .map(|t| {
            let elems = t.shape.elem_count();
            t.offset + (elems / t.ggml_dtype.block_size() * t.ggml_dtype.type_size()) as u64
        })
        .max()
        .unwrap_or(0)
        + ct.tensor_data_offset;
    ensure!(
        end <= len,
        "{}: truncated: {len} bytes, its tensors need {end}",
        path.display()
    );
    let embd = ct
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| anyhow!("{}: no token_embd.weight", path.display()))?;
    let eps = match ct.metadata.get("gpt2.attention.layer_norm_epsilon") {
        Some(Value::F32(x)) => *x as f64,
        _ => 1e-5,
    };
    let config = GptConfig {
        vocab_size: embd.shape.dims()[0],
        n_positions: meta_usize(&ct, "gpt2.context_length", path)?,
        n_embd: meta_usize(&ct, "gpt2.embedding_length", path)?,
        n_layer: meta_usize(&ct, "gpt2.block_count", path)?,
        n_head: meta_usize(&ct, "gpt2.attention.head_count", path)?,
        layer_norm_epsilon: eps,
        bias: true,
        dropout: 0.0,
        labels: Vec::new(),
        pad_token_id: None,
    };
    let mut load = |name: &str| -> Result<QTensor> {
        ct.tensor(&mut file, name, device)
            .map_err(|e| anyhow!("{}: tensor {name}: {}", path.display(), first_line(&e)))
    };
    let mut quantized = std::collections::HashMap::new();
    let mut gpt = Gpt::build(&config, |hf, shape, _| {
        let (name, conv1d) = gguf_name(hf).ok_or_else(|| anyhow!("{hf}: no GGUF name"))?;
        let q = load(&name)?;
        let mut t = q.dequantize(device)?;
        if conv1d {
            t = t.t()?.contiguous()?;
        }
        ensure!(
            t.dims() == shape,
            "{}: tensor {name} has shape {:?}, expected {shape:?}",
            path.display(),
            t.dims()
        );
        if !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16) {
            quantized.insert(hf.to_string(), q);
        }
        Ok(t)
    })?;
    gpt.set_quantized(|name| {
        quantized
            .remove(name)
            .map(|q| Ok(QMatMul::from_qtensor(q)?))
            .transpose()
    })?;
    let tokenizer = match (
        meta_strings(&ct, "tokenizer.ggml.tokens"),
        meta_strings(&ct, "tokenizer.ggml.merges"),
    ) {
        (Some(tokens), Some(merges)) => {
            Some(TextTokenizer::from_byte_level_bpe(&tokens, &merges, path)?)
        }
        _ => None,
    };
    Ok((gpt, tokenizer))
}

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "gguf")
}

/// Quantises `t` `(rows, cols)` to `qtype` and back: what a quantised matrix holds.
pub fn round_trip(t: &Tensor, qtype: QuantType) -> Result<Tensor> {
    Ok(QTensor::quantize(t, qtype.ggml())?.dequantize(t.device())?)
}
