//! Labelled text for sequence classification: `lmforge prepare --task classify`.
//!
//! Reads JSONL (one object a line), CSV or TSV (a header row; quoted fields may hold
//! separators and newlines, RFC 4180), by the file's extension. Labels may be strings
//! or integers; their names are sorted into a stable order (numerically when all are
//! integers) and stored in `meta.json`. The validation split is stratified by label
//! (or given as its own file). Each split is written as a token shard of the examples'
//! ids, one after another, and an index of `(start, length, label)` records, both
//! memory-mapped when read, so a data set of any size is read in bounded memory.

use super::prepare::{build_tokenizer, Source};
use super::{ShardWriter, TextTokenizer, TokenShard, TokenizerSpec};
use crate::fsutil;
use anyhow::{anyhow, bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One example as read, with where it came from for error messages.
#[derive(Debug, Clone, PartialEq)]
pub struct RawExample {
    pub text: String,
    pub label: String,
    pub file: PathBuf,
    pub line: usize,
}

/// Which fields hold the text and the label.
#[derive(Debug, Clone)]
pub struct Fields {
    pub text: String,
    pub label: String,
}

/// A JSON label, string or integer, as text.
fn label_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(n.to_string()),
        _ => None,
    }
}

fn checked(text: String, label: Option<String>, file: &Path, line: usize) -> Result<RawExample> {
    let label = label
        .filter(|l| !l.trim().is_empty())
        .ok_or_else(|| anyhow!("{}:{line}: missing label", file.display()))?;
    ensure!(
        !text.trim().is_empty(),
        "{}:{line}: empty text",
        file.display()
    );
    Ok(RawExample {
        text,
        label,
        file: file.to_path_buf(),
        line,
    })
}

/// Every example of a JSONL, CSV or TSV file.
pub fn read_examples(path: &Path, fields: &Fields) -> Result<Vec<RawExample>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    match ext {
        "jsonl" | "json" => {
            let text = fsutil::read_string(path)?;
            let mut out = Vec::new();
            for (i, line) in text.lines().enumerate() {
                let n = i + 1;
                if line.trim().is_empty() {
                    continue;
                }
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| anyhow!("{}:{n}: invalid JSON: {e}", path.display()))?;
                let body = v.get(&fields.text).and_then(Value::as_str).ok_or_else(|| {
                    anyhow!("{}:{n}: no string field {:?}", path.display(), fields.text)
                })?;
                let label = v.get(&fields.label).and_then(label_text);
                out.push(checked(body.to_string(), label, path, n)?);
            }
            Ok(out)
        }
        "csv" | "tsv" => {
            let mut reader = csv::ReaderBuilder::new()
                .delimiter(if ext == "tsv" { b'\t' } else { b',' })
                .from_path(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            let headers = reader
                .headers()
                .map_err(|e| anyhow!("{}: {e}", path.display()))?
                .clone();
            let column = |name: &str| {
                headers.iter().position(|h| h == name).ok_or_else(|| {
                    anyhow!("{}: no column {name:?} in the header row", path.display())
                })
            };
            let (text_col, label_col) = (column(&fields.text)?, column(&fields.label)?);
            let mut out = Vec::new();
            for record in reader.records() {
                let record = record.map_err(|e| {
                    let line = e.position().map_or(0, |p| p.line());
                    anyhow!("{}:{line}: {e}", path.display())
                })?;
                let line = record.position().map_or(0, |p| p.line()) as usize;
                let text = record.get(text_col).unwrap_or("").to_string();
                let label = record.get(label_col).map(str::to_string);
                out.push(checked(text, label, path, line)?);
            }
            Ok(out)
        }
        _ => bail!("{}: expected a .jsonl, .csv or .tsv file", path.display()),
    }
}

/// Label names in a stable order: numerically when every name is an integer, else
/// lexicographically.
pub fn label_names<'a>(labels: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut names: Vec<String> = labels.map(str::to_string).collect();
    names.sort();
    names.dedup();
    if names.iter().all(|n| n.parse::<i64>().is_ok()) {
        names.sort_by_key(|n| n.parse::<i64>().unwrap_or(0));
    }
    names
}

/// Splits `examples` into (train, val), taking `fraction` of each label's examples
/// (rounded, at least one where a label has two or more) for validation, drawn by a
/// generator seeded with `seed`; each split keeps the input order.
pub fn stratified_split(
    examples: Vec<RawExample>,
    fraction: f64,
    seed: u64,
) -> (Vec<RawExample>, Vec<RawExample>) {
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples.iter().enumerate() {
        by_label.entry(&e.label).or_default().push(i);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut to_val = vec![false; examples.len()];
    for indices in by_label.values_mut() {
        let n = indices.len();
        let take = ((fraction * n as f64).round() as usize)
            .clamp(usize::from(fraction > 0.0 && n >= 2), n.saturating_sub(1));
        indices.shuffle(&mut rng);
        indices[..take].iter().for_each(|&i| to_val[i] = true);
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (e, v) in examples.into_iter().zip(to_val) {
        if v {
            val.push(e)
        } else {
            train.push(e)
        }
    }
    (train, val)
}

const INDEX_MAGIC: &[u8; 8] = b"LMFEX001";
const RECORD: usize = 16;

/// The index of a split's examples: `(start, length, label)` of each in its shard.
pub struct ExampleIndex {
    map: memmap2::Mmap,
    path: PathBuf,
}

impl ExampleIndex {
    /// Opens an index, checking its header and size, and every record against the
    /// shard's length and the number of labels.
    pub fn open(path: &Path, shard: &TokenShard, labels: usize) -> Result<Self> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        // SAFETY: read-only mapping of a file lmforge wrote and nothing modifies.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("{}: cannot map", path.display()))?;
        ensure!(
            map.len() >= 16 && &map[..8] == INDEX_MAGIC,
            "{}: not an example index",
            path.display()
        );
        let count = u64::from_le_bytes(map[8..16].try_into().unwrap()) as usize;
        ensure!(
            map.len() == 16 + count * RECORD,
            "{}: {count} examples announced, {} bytes of records",
            path.display(),
            map.len() - 16
        );
        let index = ExampleIndex {
            map,
            path: path.to_path_buf(),
        };
        for i in 0..count {
            let (start, len, label) = index.get(i);
            ensure!(
                len > 0 && start + len <= shard.len() && (label as usize) < labels,
                "{}: example {i} ({start}+{len}, label {label}) does not fit {} tokens and {labels} labels",
                path.display(),
                shard.len()
            );
        }
        Ok(index)
    }

    pub fn len(&self) -> usize {
        (self.map.len() - 16) / RECORD
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Example `i`: where its tokens start in the shard, how many, its label.
    pub fn get(&self, i: usize) -> (usize, usize, u32) {
        let r = &self.map[16 + i * RECORD..16 + (i + 1) * RECORD];
        (
            u64::from_le_bytes(r[..8].try_into().unwrap()) as usize,
            u32::from_le_bytes(r[8..12].try_into().unwrap()) as usize,
            u32::from_le_bytes(r[12..].try_into().unwrap()),
        )
    }
}

/// What a classification data directory holds (its `meta.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassificationMeta {
    pub task: String,
    pub vocab_size: usize,
    pub tokenizer: String,
    /// Label names; an example's label is an index into this list.
    pub labels: Vec<String>,
    pub train_examples: usize,
    pub val_examples: usize,
    pub sources: Vec<String>,
}

/// Tokenizes `examples` into `dir/{split}.bin` and `dir/{split}.examples` (labels as
/// indices into `labels`).
fn write_split(
    dir: &Path,
    split: &str,
    examples: &[RawExample],
    labels: &[String],
    tokenizer: &TextTokenizer,
) -> Result<()> {
    let ids: Vec<Vec<u32>> = examples
        .par_iter()
        .map(|e| {
            tokenizer
                .encode(&e.text)
                .map_err(|err| anyhow!("{}:{}: {err}", e.file.display(), e.line))
        })
        .collect::<Result<_>>()?;
    let mut shard = ShardWriter::create(&dir.join(format!("{split}.bin")), tokenizer.vocab_size())?;
    let mut index = Vec::with_capacity(16 + examples.len() * RECORD);
    index.extend_from_slice(INDEX_MAGIC);
    index.extend_from_slice(&(examples.len() as u64).to_le_bytes());
    let mut start = 0u64;
    for (e, ids) in examples.iter().zip(&ids) {
        ensure!(
            !ids.is_empty(),
            "{}:{}: the text has no tokens",
            e.file.display(),
            e.line
        );
        let label = labels.iter().position(|l| *l == e.label).ok_or_else(|| {
            anyhow!(
                "{}:{}: label {:?} is not among the training labels {labels:?}",
                e.file.display(),
                e.line,
                e.label
            )
        })?;
        shard.write(ids)?;
        index.extend_from_slice(&start.to_le_bytes());
        index.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        index.extend_from_slice(&(label as u32).to_le_bytes());
        start += ids.len() as u64;
    }
    shard.finish()?;
    fsutil::write_atomic(&dir.join(format!("{split}.examples")), &index)
}

/// Prepares a classification data directory from `inputs` (and `val_file`, or a
/// stratified `val_fraction` of the inputs), tokenized as `spec` says (a tokenizer
/// file, or one trained on the texts).
pub fn prepare_classification(
    inputs: &[PathBuf],
    val_file: Option<&Path>,
    fields: &Fields,
    spec: &TokenizerSpec,
    out: &Path,
    (val_fraction, seed): (f64, u64),
) -> Result<ClassificationMeta> {
    ensure!(!inputs.is_empty(), "no input files given");
    let mut examples = Vec::new();
    for p in inputs {
        examples.extend(read_examples(p, fields)?);
    }
    let labels = label_names(examples.iter().map(|e| e.label.as_str()));
    if labels.len() < 2 {
        let files: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        bail!(
            "{}: only one class ({:?}) in the training data; a classifier needs two or more",
            files.join(", "),
            labels.first().cloned().unwrap_or_default()
        );
    }
    let (train, val) = match val_file {
        Some(path) => (examples, read_examples(path, fields)?),
        None => stratified_split(examples, val_fraction, seed),
    };
    // Built over every text, as `prepare` builds its vocabulary over the whole corpus
    // (a char vocabulary must cover the validation texts too).
    let texts = train
        .iter()
        .chain(&val)
        .map(|e| e.text.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let source = Source::Memory {
        name: "labelled texts".into(),
        text: texts,
    };
    let tokenizer = build_tokenizer(spec, &[source])?;
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create directory", out.display()))?;
    write_split(out, "train", &train, &labels, &tokenizer)?;
    write_split(out, "val", &val, &labels, &tokenizer)?;
    tokenizer.save(&out.join("tokenizer.json"))?;
    if tokenizer.bert_specials().is_some() {
        tokenizer.save_vocab_txt(&out.join("vocab.txt"))?;
    }
    let mut sources: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
    sources.extend(val_file.iter().map(|p| p.display().to_string()));
    let meta = ClassificationMeta {
        task: "classify".into(),
        vocab_size: tokenizer.vocab_size(),
        tokenizer: spec.to_string(),
        labels,
        train_examples: train.len(),
        val_examples: val.len(),
        sources,
    };
    fsutil::write_atomic(
        &out.join("meta.json"),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    Ok(meta)
}

/// One split (`train` or `val`) of a classification data directory.
pub struct LabelledSplit {
    shard: TokenShard,
    index: ExampleIndex,
}

impl LabelledSplit {
    /// Opens `dir/{split}.bin` and `dir/{split}.examples`, checked against `labels`.
    pub fn open(dir: &Path, split: &str, labels: usize) -> Result<Self> {
        let shard = TokenShard::open(&dir.join(format!("{split}.bin")), None)?;
        let index = ExampleIndex::open(&dir.join(format!("{split}.examples")), &shard, labels)?;
        Ok(LabelledSplit { shard, index })
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Example `i`: its token ids and label.
    pub fn example(&self, i: usize) -> (Vec<u32>, u32) {
        let (start, len, label) = self.index.get(i);
        (self.shard.slice(start, start + len), label)
    }
}

/// How a classifier's input sequences are framed.
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    /// BERT's ([CLS], [SEP]) around each sequence; none for GPT-2.
    pub wrap: Option<(u32, u32)>,
    /// The id padding is made of (the model's `pad_token_id`).
    pub pad: u32,
    /// The longest sequence the model takes, framing included.
    pub max_len: usize,
}

/// A batch of `(ids, label)` examples: each framed and cut to `max_len`, right-padded
/// to the longest in the batch (dynamic padding) with its attention mask; one label
/// per sequence.
pub fn classification_batch(examples: &[(Vec<u32>, u32)], framing: &Framing) -> super::Batch {
    let rows: Vec<Vec<u32>> = examples
        .iter()
        .map(|(ids, _)| match framing.wrap {
            Some((cls, sep)) => {
                let keep = ids.len().min(framing.max_len.saturating_sub(2));
                let mut row = Vec::with_capacity(keep + 2);
                row.push(cls);
                row.extend_from_slice(&ids[..keep]);
                row.push(sep);
                row
            }
            None => ids[..ids.len().min(framing.max_len)].to_vec(),
        })
        .collect();
    let t = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let mut batch = super::Batch {
        inputs: Vec::with_capacity(rows.len() * t),
        targets: examples.iter().map(|(_, label)| *label).collect(),
        batch_size: rows.len(),
        block_size: t,
        attention_mask: Some(Vec::with_capacity(rows.len() * t)),
        loss_positions: rows.len(),
    };
    for row in &rows {
        batch.inputs.extend(row);
        batch
            .inputs
            .extend(std::iter::repeat_n(framing.pad, t - row.len()));
        let mask = batch.attention_mask.as_mut().unwrap();
        mask.extend(std::iter::repeat_n(1, row.len()));
        mask.extend(std::iter::repeat_n(0, t - row.len()));
    }
    batch
}
