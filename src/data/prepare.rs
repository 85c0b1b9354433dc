//! `lmforge prepare`: text files → tokenizer + train/val shards + meta.json.
//!
//! Every input file is one document; each document is preceded by end-of-text (as
//! GPT-2 and llm.c lay out their data). The validation split is the last
//! `val_fraction` of the corpus bytes, cut at the first newline after that point.
//! Files are streamed in chunks and chunks are tokenised in parallel batches, so
//! memory stays bounded whatever the corpus size.

use super::clean::{clean_text, for_each_chunk, validate_utf8};
use super::{ShardWriter, TextTokenizer, TokenizerSpec};
use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const CHUNK_BYTES: usize = 256 * 1024;

/// Where the text comes from: files on disk, or a text embedded in the binary.
#[derive(Debug, Clone)]
pub enum Source {
    File(PathBuf),
    Embedded {
        name: String,
        text: &'static str,
    },
    /// Text held in memory (the texts of labelled examples).
    Memory {
        name: String,
        text: String,
    },
}

impl Source {
    fn name(&self) -> String {
        match self {
            Source::File(p) => p.display().to_string(),
            Source::Embedded { name, .. } | Source::Memory { name, .. } => name.clone(),
        }
    }

    fn byte_len(&self) -> Result<u64> {
        match self {
            Source::File(p) => Ok(std::fs::metadata(p)
                .with_context(|| format!("{}: cannot stat", p.display()))?
                .len()),
            Source::Embedded { text, .. } => Ok(text.len() as u64),
            Source::Memory { text, .. } => Ok(text.len() as u64),
        }
    }

    fn sha256(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        match self {
            Source::File(p) => crate::fsutil::sha256_file(p),
            Source::Embedded { text, .. } => Ok(format!("{:x}", Sha256::digest(text.as_bytes()))),
            Source::Memory { text, .. } => Ok(format!("{:x}", Sha256::digest(text.as_bytes()))),
        }
    }

    /// Hands out cleaned chunks with their raw byte offsets.
    fn for_each_clean_chunk(&self, mut f: impl FnMut(u64, String) -> Result<()>) -> Result<()> {
        match self {
            Source::File(path) => for_each_chunk(path, CHUNK_BYTES, |offset, bytes| {
                let text = validate_utf8(bytes, path, offset)?;
                f(offset, clean_text(text))
            }),
            Source::Embedded { text, .. } => f(0, clean_text(text)),
            Source::Memory { text, .. } => f(0, clean_text(text)),
        }
    }
}

/// Expands paths: files as given, directories to their `.txt` files (recursively, sorted).
pub fn expand_inputs(paths: &[PathBuf]) -> Result<Vec<Source>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot list directory", dir.display()))?
            .map(|e| e.map(|e| e.path()))
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("{}: cannot list directory", dir.display()))?;
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|e| e == "txt") {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let before = files.len();
            walk(p, &mut files)?;
            ensure!(
                files.len() > before,
                "{}: directory holds no .txt files",
                p.display()
            );
        } else if p.is_file() {
            files.push(p.clone());
        } else {
            bail!("{}: no such file or directory", p.display());
        }
    }
    Ok(files.into_iter().map(Source::File).collect())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceInfo {
    pub path: String,
    pub bytes: u64,
    pub sha256: String,
}

/// `meta.json`: what a prepared data directory holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataMeta {
    pub vocab_size: usize,
    pub eot_id: u32,
    pub tokenizer: String,
    pub train_tokens: u64,
    pub val_tokens: u64,
    pub documents: usize,
    pub sources: Vec<SourceInfo>,
}

impl DataMeta {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("meta.json");
        let text = crate::fsutil::read_string(&path)?;
        serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid meta.json", path.display()))
    }
}

/// Builds or loads the tokenizer; only char and BPE need a pass over the corpus.
pub fn build_tokenizer(spec: &TokenizerSpec, sources: &[Source]) -> Result<TextTokenizer> {
    match spec {
        TokenizerSpec::File(path) if path.extension().is_some_and(|e| e == "txt") => {
            TextTokenizer::from_vocab_txt(path)
        }
        TokenizerSpec::File(path) => TextTokenizer::from_file(path),
        TokenizerSpec::Char => {
            let mut chars = BTreeSet::new();
            for s in sources {
                s.for_each_clean_chunk(|_, text| {
                    chars.extend(text.chars());
                    Ok(())
                })?;
            }
            if chars.is_empty() {
                bail!("the corpus is empty after cleaning: no text to build a vocabulary from");
            }
            TextTokenizer::char_level(&chars)
        }
        TokenizerSpec::Bpe(vocab) => {
            stream_corpus(sources, |texts| TextTokenizer::train_bpe(*vocab, texts))
        }
        TokenizerSpec::WordPiece(vocab) => stream_corpus(sources, |texts| {
            TextTokenizer::train_wordpiece(*vocab, texts)
        }),
    }
}

/// Runs `train` over the cleaned corpus as a stream of chunks.
fn stream_corpus(
    sources: &[Source],
    train: impl FnOnce(std::sync::mpsc::IntoIter<String>) -> Result<TextTokenizer>,
) -> Result<TextTokenizer> {
    {
        {
            // The trainer pulls text from a channel that a reader thread fills, so the
            // corpus is never in memory at once and errors still surface.
            let (tx, rx) = std::sync::mpsc::sync_channel::<String>(16);
            let sources = sources.to_vec();
            let reader = std::thread::spawn(move || -> Result<()> {
                for s in &sources {
                    s.for_each_clean_chunk(|_, text| {
                        let _ = tx.send(text);
                        Ok(())
                    })?;
                }
                Ok(())
            });
            let tokenizer = train(rx.into_iter());
            reader
                .join()
                .map_err(|_| anyhow::anyhow!("corpus reader thread panicked"))??;
            tokenizer
        }
    }
}

/// Runs the whole preparation and returns the metadata it wrote.
pub fn prepare(
    sources: &[Source],
    spec: &TokenizerSpec,
    out: &Path,
    val_fraction: f64,
) -> Result<DataMeta> {
    ensure!(!sources.is_empty(), "no input files given");
    ensure!(
        (0.0..1.0).contains(&val_fraction),
        "--val-fraction {val_fraction}: must be in [0, 1)"
    );
    std::fs::create_dir_all(out)
        .with_context(|| format!("{}: cannot create directory", out.display()))?;

    let tokenizer = build_tokenizer(spec, sources)?;
    let vocab = tokenizer.vocab_size();
    let eot = tokenizer.eot_id();

    let sizes: Vec<u64> = sources
        .iter()
        .map(Source::byte_len)
        .collect::<Result<_>>()?;
    let total: u64 = sizes.iter().sum();
    let cut = ((1.0 - val_fraction) * total as f64).round() as u64;

    let mut train = ShardWriter::create(&out.join("train.bin"), vocab)?;
    let mut val = ShardWriter::create(&out.join("val.bin"), vocab)?;
    let batch_len = rayon::current_num_threads() * 4;
    let mut pending: Vec<(bool, String)> = Vec::new();
    let flush = |pending: &mut Vec<(bool, String)>,
                 train: &mut ShardWriter,
                 val: &mut ShardWriter|
     -> Result<()> {
        let texts: Vec<String> = pending.iter().map(|(_, t)| t.clone()).collect();
        for ((is_val, _), ids) in pending.iter().zip(tokenizer.encode_many(&texts)?) {
            if *is_val {
                val.write(&ids)?
            } else {
                train.write(&ids)?
            }
        }
        pending.clear();
        Ok(())
    };

    let mut doc_start = 0u64;
    let mut documents = 0;
    for (source, &size) in sources.iter().zip(&sizes) {
        let mut wrote_eot = false;
        source.for_each_clean_chunk(|offset, text| {
            if text.is_empty() {
                return Ok(());
            }
            let start = doc_start + offset;
            if !wrote_eot {
                // `pending` is flushed at every document's end, so this lands in order.
                if start >= cut {
                    val.write(&[eot])?
                } else {
                    train.write(&[eot])?
                }
                wrote_eot = true;
            }
            // A chunk straddling the cut is split at the first newline after it.
            let rel = cut.saturating_sub(start) as usize;
            if start < cut && rel < text.len() {
                let rel = (rel..text.len())
                    .find(|&i| text.is_char_boundary(i))
                    .unwrap_or(text.len());
                let split = text[rel..]
                    .find('\n')
                    .map(|i| rel + i + 1)
                    .unwrap_or(text.len());
                pending.push((false, text[..split].to_string()));
                pending.push((true, text[split..].to_string()));
            } else {
                pending.push((start >= cut, text));
            }
            if pending.len() >= batch_len {
                flush(&mut pending, &mut train, &mut val)?;
            }
            Ok(())
        })?;
        flush(&mut pending, &mut train, &mut val)?;
        if wrote_eot {
            documents += 1;
        }
        doc_start += size;
    }
    ensure!(
        documents > 0,
        "the corpus is empty after cleaning: nothing to tokenize"
    );
    ensure!(
        train.len() > 1,
        "the corpus yields too few training tokens ({})",
        train.len()
    );
    ensure!(
        val_fraction == 0.0 || !val.is_empty(),
        "the corpus is too small for a validation split of {val_fraction}"
    );

    tokenizer.save(&out.join("tokenizer.json"))?;
    if tokenizer.bert_specials().is_some() {
        tokenizer.save_vocab_txt(&out.join("vocab.txt"))?;
    }
    let train_tokens = train.finish()?;
    let val_tokens = val.finish()?;
    let meta = DataMeta {
        vocab_size: vocab,
        eot_id: eot,
        tokenizer: spec.to_string(),
        train_tokens,
        val_tokens,
        documents,
        sources: sources
            .iter()
            .zip(&sizes)
            .map(|(s, &bytes)| {
                Ok(SourceInfo {
                    path: s.name(),
                    bytes,
                    sha256: s.sha256()?,
                })
            })
            .collect::<Result<_>>()?,
    };
    crate::fsutil::write_atomic(
        &out.join("meta.json"),
        serde_json::to_string_pretty(&meta)?.as_bytes(),
    )?;
    Ok(meta)
}

/// The name of the corpus compiled into the binary, as `corpus` gives it.
pub const EMBEDDED_CORPUS: &str = "embedded:shakespeare";

/// Makes sure `data` holds prepared shards, preparing them on first use from
/// `corpus` (a file, a directory of `.txt`, or [`EMBEDDED_CORPUS`]) with `tokenizer`.
/// Shards prepared with another tokenizer than asked are refused.
pub fn ensure_prepared(
    data: &Path,
    corpus: Option<&str>,
    tokenizer: &TokenizerSpec,
    val_fraction: f64,
) -> Result<DataMeta> {
    let dir = data;
    let ready = ["train.bin", "val.bin", "tokenizer.json", "meta.json"]
        .iter()
        .all(|f| dir.join(f).exists());
    if ready {
        let meta = DataMeta::load(dir)?;
        if corpus.is_some() && meta.tokenizer != tokenizer.to_string() {
            bail!(
                "{}: prepared with tokenizer {:?} but the config asks for {:?}; remove it or set data to another directory",
                dir.display(),
                meta.tokenizer,
                tokenizer
            );
        }
        return Ok(meta);
    }
    let sources = match corpus {
        None => bail!(
            "{}: no prepared data (run `lmforge prepare --out {}` or set corpus)",
            dir.display(),
            dir.display()
        ),
        Some(EMBEDDED_CORPUS) => vec![Source::Embedded {
            name: EMBEDDED_CORPUS.into(),
            text: crate::EMBEDDED_SHAKESPEARE,
        }],
        Some(path) => expand_inputs(&[PathBuf::from(path)])?,
    };
    tracing::info!(
        "preparing {} from {} ({tokenizer} tokenizer)",
        dir.display(),
        corpus.unwrap_or_default()
    );
    prepare(&sources, tokenizer, dir, val_fraction)
}
