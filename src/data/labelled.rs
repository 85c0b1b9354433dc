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
    /// Token ids given instead of text (JSONL's `ids`), the model's input as is.
    pub ids: Option<Vec<u32>>,
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

fn checked(
    (text, ids): (String, Option<Vec<u32>>),
    label: Option<String>,
    file: &Path,
    line: usize,
) -> Result<RawExample> {
    let label = label
        .filter(|l| !l.trim().is_empty())
        .ok_or_else(|| anyhow!("{}:{line}: missing label", file.display()))?;
    match &ids {
        Some(ids) => ensure!(!ids.is_empty(), "{}:{line}: empty ids", file.display()),
        None => ensure!(
            !text.trim().is_empty(),
            "{}:{line}: empty text",
            file.display()
        ),
    }
    Ok(RawExample {
        text,
        ids,
        label,
        file: file.to_path_buf(),
        line,
    })
}

/// A JSONL object's input: the string field `text_field`, or an `ids` array of token
/// ids (the model's input sequence as is, for a model directory without a tokenizer).
pub fn input_of(v: &Value, text_field: &str) -> Result<(String, Option<Vec<u32>>)> {
    if let Some(text) = v.get(text_field).and_then(Value::as_str) {
        return Ok((text.to_string(), None));
    }
    let Some(ids) = v.get("ids") else {
        bail!("no string field {text_field:?} and no \"ids\" array");
    };
    let ids = ids
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok()))
                .collect::<Option<Vec<u32>>>()
        })
        .ok_or_else(|| anyhow!("\"ids\" must be an array of non-negative integers"))?;
    Ok((String::new(), Some(ids)))
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
                let body = input_of(&v, &fields.text)
                    .map_err(|e| anyhow!("{}:{n}: {e}", path.display()))?;
                let label = v.get(&fields.label).and_then(label_text);
                out.push(checked(body, label, path, n)?);
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
                out.push(checked((text, None), label, path, line)?);
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
    if let Some(e) = train.iter().chain(&val).find(|e| e.ids.is_some()) {
        bail!(
            "{}:{}: token ids are for eval and predict with a model; prepare needs text",
            e.file.display(),
            e.line
        );
    }
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

    /// How many examples each of `labels` labels has.
    pub fn label_counts(&self, labels: usize) -> Vec<usize> {
        let mut counts = vec![0; labels];
        (0..self.len()).for_each(|i| counts[self.index.get(i).2 as usize] += 1);
        counts
    }

    /// Example `i`: its token ids and label.
    pub fn example(&self, i: usize) -> (Vec<u32>, u32) {
        let (start, len, label) = self.index.get(i);
        (self.shard.slice(start, start + len), label)
    }
}

/// Reads a classification data directory's `meta.json`.
pub fn read_meta(dir: &Path) -> Result<ClassificationMeta> {
    let path = dir.join("meta.json");
    let meta: ClassificationMeta =
        serde_json::from_str(&fsutil::read_string(&path)?).map_err(|e| {
            anyhow!(
                "{}: not a classification meta.json (prepare --task classify): {e}",
                path.display()
            )
        })?;
    ensure!(
        meta.task == "classify",
        "{}: task {:?}, expected \"classify\" (prepare --task classify)",
        path.display(),
        meta.task
    );
    Ok(meta)
}

/// For each of the data's label names, the index of the same name among the model's
/// labels; a name the model does not know is an error naming `what` (the data).
pub fn labels_to_model(data: &[String], model: &[String], what: &Path) -> Result<Vec<u32>> {
    data.iter()
        .map(|name| {
            model
                .iter()
                .position(|k| k == name)
                .map(|i| i as u32)
                .ok_or_else(|| {
                    anyhow!(
                        "{}: label {name:?} is not one the model knows ({model:?})",
                        what.display()
                    )
                })
        })
        .collect()
}

/// Class weights from a `class_weights` setting: `""` (none), `"balanced"`
/// (scikit-learn's n / (k · count of the class), from the training counts) or one
/// number per label, comma-separated, in the order of `meta.json`'s labels.
pub fn class_weights(setting: &str, train_counts: &[usize]) -> Result<Option<Vec<f32>>> {
    let k = train_counts.len();
    match setting.trim() {
        "" => Ok(None),
        "balanced" => {
            let n: usize = train_counts.iter().sum();
            Ok(Some(
                train_counts
                    .iter()
                    .map(|&c| {
                        if c == 0 {
                            0.0
                        } else {
                            n as f32 / (k * c) as f32
                        }
                    })
                    .collect(),
            ))
        }
        list => {
            let w: Vec<f32> = list
                .split(',')
                .map(|x| x.trim().parse::<f32>().ok().filter(|w| *w >= 0.0 && w.is_finite()))
                .collect::<Option<_>>()
                .ok_or_else(|| anyhow!("class_weights {list:?}: expected \"balanced\" or {k} non-negative numbers, comma-separated"))?;
            ensure!(
                w.len() == k,
                "class_weights {list:?}: {} numbers for {k} labels",
                w.len()
            );
            Ok(Some(w))
        }
    }
}

/// Training batches of labelled examples, HF Trainer's way: every epoch visits each
/// example once in a fresh random order (a permutation drawn from the seed and the
/// epoch's number, so the cursor is the whole state), batches padded dynamically.
pub struct LabelledBatcher {
    split: LabelledSplit,
    framing: Framing,
    batch_size: usize,
    /// Maps the data's label indices to the model's.
    to_model: Vec<u32>,
    /// Loss weights by the data's label index, if any.
    weights: Option<Vec<f32>>,
    cursor: super::EpochCursor,
    order: Vec<u32>,
}

impl LabelledBatcher {
    pub fn new(
        split: LabelledSplit,
        framing: Framing,
        batch_size: usize,
        (to_model, weights): (Vec<u32>, Option<Vec<f32>>),
        seed: u64,
    ) -> Result<Self> {
        ensure!(
            !split.is_empty(),
            "{}: no training examples",
            split.index.path().display()
        );
        let cursor = super::EpochCursor {
            seed,
            epoch: 0,
            next: 0,
        };
        let order = epoch_order(cursor, split.len());
        Ok(LabelledBatcher {
            split,
            framing,
            batch_size,
            to_model,
            weights,
            cursor,
            order,
        })
    }

    /// Examples in the training split.
    pub fn len(&self) -> usize {
        self.split.len()
    }

    pub fn is_empty(&self) -> bool {
        self.split.is_empty()
    }

    /// This rank's share of the next `batch_size × world` examples (every rank walks
    /// the same order, so N ranks see what one process with N times the batch would).
    pub fn next_batch_of(&mut self, rank: usize, world: usize) -> super::Batch {
        let b = self.batch_size;
        let mut picked = Vec::with_capacity(b * world);
        for _ in 0..b * world {
            if self.cursor.next == self.order.len() {
                self.cursor.epoch += 1;
                self.cursor.next = 0;
                self.order = epoch_order(self.cursor, self.split.len());
            }
            picked.push(self.order[self.cursor.next] as usize);
            self.cursor.next += 1;
        }
        let mut examples: Vec<(Vec<u32>, u32)> = picked[rank * b..(rank + 1) * b]
            .iter()
            .map(|&i| self.split.example(i))
            .collect();
        let weights = self.weights.as_ref().map(|w| {
            examples
                .iter()
                .map(|(_, label)| w[*label as usize])
                .collect()
        });
        examples
            .iter_mut()
            .for_each(|(_, label)| *label = self.to_model[*label as usize]);
        let mut batch = classification_batch(&examples, &self.framing);
        batch.loss_positions = b * world;
        batch.weights = weights;
        batch
    }

    pub fn state(&self) -> super::EpochCursor {
        self.cursor
    }

    pub fn restore(&mut self, cursor: super::EpochCursor) {
        self.order = epoch_order(cursor, self.split.len());
        self.cursor = cursor;
    }
}

/// The order of epoch `cursor.epoch`: a permutation of `0..n` from its own stream.
fn epoch_order(cursor: super::EpochCursor, n: usize) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(cursor.seed);
    rng.set_stream(cursor.epoch);
    let mut order: Vec<u32> = (0..n as u32).collect();
    order.shuffle(&mut rng);
    order
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

impl Framing {
    /// A text's ids as the model takes them: wrapped, and cut to `max_len` (the
    /// text's end is dropped, as transformers' `truncation=True`).
    pub fn frame(&self, ids: &[u32]) -> Vec<u32> {
        match self.wrap {
            Some((cls, sep)) => {
                let keep = ids.len().min(self.max_len.saturating_sub(2));
                let mut row = Vec::with_capacity(keep + 2);
                row.push(cls);
                row.extend_from_slice(&ids[..keep]);
                row.push(sep);
                row
            }
            None => ids[..ids.len().min(self.max_len)].to_vec(),
        }
    }
}

/// A batch of `(ids, label)` examples: each framed and cut to `max_len`, right-padded
/// to the longest in the batch (dynamic padding) with its attention mask; one label
/// per sequence.
pub fn classification_batch(examples: &[(Vec<u32>, u32)], framing: &Framing) -> super::Batch {
    let rows: Vec<Vec<u32>> = examples.iter().map(|(ids, _)| framing.frame(ids)).collect();
    let t = rows.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let mut batch = super::Batch {
        inputs: Vec::with_capacity(rows.len() * t),
        targets: examples.iter().map(|(_, label)| *label).collect(),
        batch_size: rows.len(),
        block_size: t,
        attention_mask: Some(Vec::with_capacity(rows.len() * t)),
        loss_positions: rows.len(),
        weights: None,
        hidden_positions: None,
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
