//! Tokenizers, all stored as Hugging Face `tokenizer.json`.
//!
//! - char-level: one token per character seen in the corpus, sorted (nanoGPT's
//!   scheme), plus `<|endoftext|>`; stored as a BPE model without merges and a `Fuse`
//!   decoder so any HF runtime loads it.
//! - byte-level BPE trained on the corpus (GPT-2's pre-tokenizer and decoder).
//! - a BERT-style uncased WordPiece trained on the corpus (BERT's normalizer and
//!   pre-tokenizer; [PAD] [UNK] [CLS] [SEP] [MASK] take ids 0–4).
//! - an existing `tokenizer.json` (GPT-2's own, a BERT one), or a BERT `vocab.txt`.
//!
//! A tokenizer is either causal (it has `<|endoftext|>`) or BERT's (it has the five
//! special tokens); either way it has a document separator that `prepare` writes
//! before every document: `<|endoftext|>`, or [SEP].

use anyhow::{anyhow, bail, ensure, Context, Result};
use rayon::prelude::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::models::TrainerWrapper;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::{AddedToken, Tokenizer};

pub const END_OF_TEXT: &str = "<|endoftext|>";

/// What `--tokenizer` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSpec {
    Char,
    Bpe(usize),
    WordPiece(usize),
    /// A `tokenizer.json`, or a BERT `vocab.txt`.
    File(PathBuf),
}

serde_as_string!(TokenizerSpec);

impl std::fmt::Display for TokenizerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            TokenizerSpec::Char => write!(f, "char"),
            TokenizerSpec::Bpe(n) => write!(f, "bpe:{n}"),
            TokenizerSpec::WordPiece(n) => write!(f, "wordpiece:{n}"),
            TokenizerSpec::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// BERT's special tokens, in the order a trained WordPiece gives them ids 0–4.
pub const BERT_SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

/// The ids of BERT's special tokens in a WordPiece vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BertSpecials {
    pub pad: u32,
    pub unk: u32,
    pub cls: u32,
    pub sep: u32,
    pub mask: u32,
}

impl std::str::FromStr for TokenizerSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if s == "char" {
            return Ok(TokenizerSpec::Char);
        }
        if let Some(n) = s.strip_prefix("bpe:") {
            let n: usize = n
                .parse()
                .map_err(|_| anyhow!("--tokenizer {s}: expected bpe:VOCAB_SIZE"))?;
            if n < 257 + 1 {
                bail!("--tokenizer {s}: a byte-level BPE needs a vocabulary of at least 258 (256 bytes + end-of-text + merges)");
            }
            return Ok(TokenizerSpec::Bpe(n));
        }
        if let Some(n) = s.strip_prefix("wordpiece:") {
            let n: usize = n
                .parse()
                .map_err(|_| anyhow!("--tokenizer {s}: expected wordpiece:VOCAB_SIZE"))?;
            if n < BERT_SPECIALS.len() + 1 {
                bail!("--tokenizer {s}: a WordPiece needs room for its 5 special tokens and some words");
            }
            return Ok(TokenizerSpec::WordPiece(n));
        }
        if s.ends_with(".json") || s.ends_with(".txt") {
            return Ok(TokenizerSpec::File(PathBuf::from(s)));
        }
        bail!("--tokenizer {s}: expected char, bpe:VOCAB_SIZE, wordpiece:VOCAB_SIZE, a tokenizer.json or a vocab.txt path")
    }
}

/// A tokenizer with a known document separator.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    /// `<|endoftext|>`, or [SEP] for a BERT tokenizer.
    eot: u32,
    /// Set for char-level tokenizers, which cannot encode unseen characters.
    char_level: bool,
    bert: Option<BertSpecials>,
}

fn tk_err(path: &Path, e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{}: {e}", path.display())
}

impl TextTokenizer {
    fn wrap(inner: Tokenizer, origin: &Path) -> Result<Self> {
        let char_level = matches!(
            inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::Fuse(_))
        );
        if let Some(eot) = inner.token_to_id(END_OF_TEXT) {
            return Ok(TextTokenizer {
                inner,
                eot,
                char_level,
                bert: None,
            });
        }
        let ids: Vec<Option<u32>> = BERT_SPECIALS.iter().map(|t| inner.token_to_id(t)).collect();
        let Some(&[pad, unk, cls, sep, mask]) =
            ids.iter().copied().collect::<Option<Vec<u32>>>().as_deref()
        else {
            let missing: Vec<&str> = BERT_SPECIALS
                .iter()
                .zip(&ids)
                .filter(|(_, id)| id.is_none())
                .map(|(t, _)| *t)
                .collect();
            bail!(
                "{}: tokenizer has no {END_OF_TEXT} token, and as a BERT tokenizer it lacks {}",
                origin.display(),
                missing.join(" ")
            );
        };
        Ok(TextTokenizer {
            inner,
            eot: sep,
            char_level,
            bert: Some(BertSpecials {
                pad,
                unk,
                cls,
                sep,
                mask,
            }),
        })
    }

    /// BERT's uncased pipeline around a WordPiece model: clean text, split CJK
    /// characters, lowercase and strip accents; BERT's pre-tokenizer; [CLS] … [SEP]
    /// when special tokens are asked for; `##` pieces joined on decoding.
    fn bert_pipeline(model: WordPiece) -> Result<Tokenizer> {
        let mut inner = Tokenizer::new(model);
        inner
            .with_normalizer(Some(BertNormalizer::new(true, true, None, true)))
            .map_err(|e| anyhow!("BERT normalizer: {e}"))?;
        inner.with_pre_tokenizer(Some(BertPreTokenizer));
        inner.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
        Ok(inner)
    }

    /// Marks BERT's special tokens as such and adds the [CLS] … [SEP] processor.
    fn finish_bert(mut inner: Tokenizer, origin: &Path) -> Result<Self> {
        inner
            .add_special_tokens(
                BERT_SPECIALS
                    .iter()
                    .map(|t| AddedToken::from(*t, true))
                    .collect::<Vec<_>>(),
            )
            .map_err(|e| tk_err(origin, e))?;
        let id = |t: &str| inner.token_to_id(t).unwrap_or(0);
        let processor =
            BertProcessing::new(("[SEP]".into(), id("[SEP]")), ("[CLS]".into(), id("[CLS]")));
        inner.with_post_processor(Some(processor));
        Self::wrap(inner, origin)
    }

    /// A BERT `vocab.txt`: one token a line, the line number its id. Refused when it
    /// repeats a token or lacks one of BERT's special tokens.
    pub fn from_vocab_txt(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_string(path)?;
        let mut vocab = std::collections::HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let token = line.trim_end_matches('\r');
            if let Some(first) = vocab.insert(token.to_string(), i as u32) {
                bail!(
                    "{}: line {}: token {token:?} repeats line {}",
                    path.display(),
                    i + 1,
                    first + 1
                );
            }
        }
        let missing: Vec<&str> = BERT_SPECIALS
            .iter()
            .filter(|t| !vocab.contains_key(**t))
            .copied()
            .collect();
        ensure!(
            missing.is_empty(),
            "{}: vocabulary lacks {}",
            path.display(),
            missing.join(" ")
        );
        let vocab = WordPiece::read_bytes(text.as_bytes())
            .map_err(|e| anyhow!("{}: {e}", path.display()))?;
        Self::bert_wordpiece(vocab, path)
    }

    /// BERT's tokenizer around a WordPiece vocabulary (`origin` names it in errors).
    fn bert_wordpiece(vocab: tokenizers::models::bpe::Vocab, origin: &Path) -> Result<Self> {
        let model = WordPiece::builder()
            .vocab(vocab)
            .unk_token("[UNK]".into())
            .build()
            .map_err(|e| anyhow!("{}: {e}", origin.display()))?;
        Self::finish_bert(Self::bert_pipeline(model)?, origin)
    }

    /// Trains a BERT-style uncased WordPiece on `texts`, reproducibly
    /// ([`super::wordpiece`]; the settings of `tokenizers`' `BertWordPieceTokenizer`:
    /// min frequency 2, alphabet limit 1000): words are counted after BERT's
    /// normalizer and pre-tokenizer.
    pub fn train_wordpiece<I>(vocab_size: usize, texts: I) -> Result<Self>
    where
        I: Iterator<Item = String> + Send,
    {
        use tokenizers::{
            NormalizedString, Normalizer, OffsetReferential, OffsetType, PreTokenizedString,
            PreTokenizer,
        };
        let normalizer = BertNormalizer::new(true, true, None, true);
        let mut counts: std::collections::HashMap<String, u64> = Default::default();
        for text in texts {
            let mut normalized = NormalizedString::from(text.as_str());
            normalizer
                .normalize(&mut normalized)
                .map_err(|e| anyhow!("training WordPiece: {e}"))?;
            let mut words = PreTokenizedString::from(normalized);
            BertPreTokenizer
                .pre_tokenize(&mut words)
                .map_err(|e| anyhow!("training WordPiece: {e}"))?;
            for (word, _, _) in words.get_splits(OffsetReferential::Normalized, OffsetType::Byte) {
                *counts.entry(word.to_string()).or_insert(0) += 1;
            }
        }
        let tokens = super::wordpiece::train(&counts, vocab_size, &BERT_SPECIALS, (2, 1000));
        let vocab = tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect();
        Self::bert_wordpiece(vocab, Path::new("<trained WordPiece>"))
    }

    /// BERT's special-token ids, for a WordPiece tokenizer.
    pub fn bert_specials(&self) -> Option<BertSpecials> {
        self.bert
    }

    /// The token an id stands for.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::fsutil::read(path)?;
        let inner = Tokenizer::from_bytes(&bytes)
            .map_err(|e| anyhow!("{}: not a valid tokenizer.json: {e}", path.display()))?;
        Self::wrap(inner, path)
    }

    /// GPT-2's tokenizer from the original file pair (`vocab.json` + `merges.txt`):
    /// byte-level BPE without prefix space, `<|endoftext|>` special.
    pub fn from_vocab_and_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let bpe = BPE::from_file(&vocab.display().to_string(), &merges.display().to_string())
            .build()
            .map_err(|e| {
                anyhow!(
                    "{} + {}: not a valid BPE vocabulary and merges pair: {e}",
                    vocab.display(),
                    merges.display()
                )
            })?;
        Self::gpt2_pipeline(bpe, vocab)
    }

    /// GPT-2's pipeline around a BPE model: byte-level pre-tokenizer and decoder
    /// without prefix space, `<|endoftext|>` special.
    fn gpt2_pipeline(bpe: BPE, origin: &Path) -> Result<Self> {
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        inner
            .add_special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .map_err(|e| tk_err(origin, e))?;
        Self::wrap(inner, origin)
    }

    /// A GPT-2-style tokenizer from its tokens (in id order) and merges (`"a b"`), as
    /// a GGUF's `tokenizer.ggml.*` holds them (`origin` names the file in errors).
    pub fn from_byte_level_bpe(
        tokens: &[String],
        merges: &[String],
        origin: &Path,
    ) -> Result<Self> {
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| anyhow!("{}: merge {m:?} is not two tokens", origin.display()))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| {
                anyhow!(
                    "{}: not a valid BPE vocabulary and merges: {e}",
                    origin.display()
                )
            })?;
        Self::gpt2_pipeline(bpe, origin)
    }

    /// The tokens (in id order) and merges (`"a b"`) of a byte-level BPE tokenizer;
    /// `None` for a char-level or WordPiece one.
    pub fn byte_level_bpe(&self) -> Option<(Vec<String>, Vec<String>)> {
        if self.char_level || self.bert.is_some() {
            return None;
        }
        let json: serde_json::Value =
            serde_json::from_str(&self.inner.to_string(false).ok()?).ok()?;
        let model = &json["model"];
        if model["type"] != "BPE" {
            return None;
        }
        let mut tokens = vec![String::new(); self.vocab_size()];
        for (token, id) in model["vocab"].as_object()? {
            *tokens.get_mut(id.as_u64()? as usize)? = token.clone();
        }
        for added in json["added_tokens"].as_array()? {
            *tokens.get_mut(added["id"].as_u64()? as usize)? =
                added["content"].as_str()?.to_string();
        }
        let merges = model["merges"]
            .as_array()?
            .iter()
            .map(|m| match m {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(pair) => Some(format!(
                    "{} {}",
                    pair.first()?.as_str()?,
                    pair.get(1)?.as_str()?
                )),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        Some((tokens, merges))
    }

    /// The tokenizer stored with a model: `tokenizer.json`, else `vocab.json` +
    /// `merges.txt`, else BERT's `vocab.txt`; `None` when the directory has none.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let json = dir.join("tokenizer.json");
        if json.exists() {
            return Self::from_file(&json).map(Some);
        }
        let vocab_txt = dir.join("vocab.txt");
        if vocab_txt.exists() {
            return Self::from_vocab_txt(&vocab_txt).map(Some);
        }
        let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if vocab.exists() && merges.exists() {
            return Self::from_vocab_and_merges(&vocab, &merges).map(Some);
        }
        Ok(None)
    }

    /// A char-level tokenizer over `chars` (sorted), with end-of-text last.
    pub fn char_level(chars: &BTreeSet<char>) -> Result<Self> {
        if chars.is_empty() {
            bail!("cannot build a char-level tokenizer from an empty corpus");
        }
        let mut vocab = serde_json::Map::new();
        for (i, c) in chars.iter().enumerate() {
            vocab.insert(c.to_string(), json!(i));
        }
        let eot_id = chars.len();
        vocab.insert(END_OF_TEXT.to_string(), json!(eot_id));
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": [{
                "id": eot_id, "content": END_OF_TEXT, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true
            }],
            "normalizer": null,
            "pre_tokenizer": null,
            "post_processor": null,
            "decoder": {"type": "Fuse"},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                "ignore_merges": false, "vocab": vocab, "merges": []
            }
        });
        let inner = Tokenizer::from_bytes(spec.to_string().as_bytes())
            .map_err(|e| anyhow!("building char tokenizer: {e}"))?;
        Self::wrap(inner, Path::new("<char tokenizer>"))
    }

    /// Trains a byte-level BPE (GPT-2's pre-tokenizer, no prefix space) on `texts`.
    pub fn train_bpe<I>(vocab_size: usize, texts: I) -> Result<Self>
    where
        I: Iterator<Item = String> + Send,
    {
        let mut trainer = TrainerWrapper::BpeTrainer(
            BpeTrainerBuilder::new()
                .vocab_size(vocab_size)
                .min_frequency(2)
                .show_progress(false)
                .special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
                .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
                .build(),
        );
        let mut inner = Tokenizer::new(BPE::default());
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        inner
            .train(&mut trainer, texts)
            .map_err(|e| anyhow!("training BPE: {e}"))?;
        Self::wrap(inner, Path::new("<trained BPE>"))
    }

    /// The document separator: `<|endoftext|>`, or [SEP] for a BERT tokenizer.
    pub fn eot_id(&self) -> u32 {
        self.eot
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_char_level(&self) -> bool {
        self.char_level
    }

    /// Encodes text (special tokens written literally in the text are recognised).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if self.char_level {
            if let Some(c) = text
                .chars()
                .find(|c| self.inner.token_to_id(&c.to_string()).is_none())
            {
                bail!("character {c:?} is not in the char-level vocabulary");
            }
        }
        let enc = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| anyhow!("encoding: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Encodes many texts on all cores, in order.
    pub fn encode_many(&self, texts: &[String]) -> Result<Vec<Vec<u32>>> {
        texts.par_iter().map(|t| self.encode(t)).collect()
    }

    /// Text for `ids`, special tokens (end-of-text) left out, as HF's
    /// `decode(skip_special_tokens=True)`.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding: {e}"))
    }

    /// Writes a WordPiece vocabulary as BERT's `vocab.txt`: one token a line, in id order.
    pub fn save_vocab_txt(&self, path: &Path) -> Result<()> {
        let n = self.inner.get_vocab_size(true) as u32;
        let tokens: Vec<String> = (0..n)
            .map(|id| {
                self.inner
                    .id_to_token(id)
                    .ok_or_else(|| anyhow!("tokenizer has no token for id {id}"))
            })
            .collect::<Result<_>>()?;
        crate::fsutil::write_atomic(path, (tokens.join("\n") + "\n").as_bytes())
    }

    /// Writes `tokenizer.json` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self.inner.to_string(false).map_err(|e| tk_err(path, e))?;
        crate::fsutil::write_atomic(path, text.as_bytes()).context("saving tokenizer")
    }

    /// Writes `tokenizer.json` and the `tokenizer_config.json` that lets
    /// `transformers.AutoTokenizer.from_pretrained(dir)` load it as a fast tokenizer.
    /// A BERT tokenizer also gets the `vocab.txt` its slow `BertTokenizer` reads.
    pub fn save_to_model_dir(&self, dir: &Path, model_max_length: usize) -> Result<()> {
        self.save(&dir.join("tokenizer.json"))?;
        if self.bert.is_some() {
            self.save_vocab_txt(&dir.join("vocab.txt"))?;
            let config = json!({
                "tokenizer_class": "BertTokenizer",
                "do_lower_case": true,
                "tokenize_chinese_chars": true,
                "strip_accents": null,
                "unk_token": "[UNK]",
                "sep_token": "[SEP]",
                "pad_token": "[PAD]",
                "cls_token": "[CLS]",
                "mask_token": "[MASK]",
                "model_max_length": model_max_length,
                "clean_up_tokenization_spaces": false,
            });
            return crate::fsutil::write_atomic(
                &dir.join("tokenizer_config.json"),
                serde_json::to_string_pretty(&config)?.as_bytes(),
            );
        }
        let config = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": END_OF_TEXT,
            "eos_token": END_OF_TEXT,
            "unk_token": END_OF_TEXT,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": false,
        });
        crate::fsutil::write_atomic(
            &dir.join("tokenizer_config.json"),
            serde_json::to_string_pretty(&config)?.as_bytes(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_round_trip_with_non_ascii() {
        let text = "Héllo, wörld!\n日本語 🙂\tend";
        let chars: BTreeSet<char> = text.chars().collect();
        let tok = TextTokenizer::char_level(&chars).unwrap();
        assert_eq!(tok.vocab_size(), chars.len() + 1);
        assert_eq!(tok.eot_id() as usize, chars.len());
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.len(), text.chars().count());
        // Sorted vocabulary: ids follow character order.
        let sorted: Vec<char> = chars.iter().copied().collect();
        assert_eq!(
            ids[0] as usize,
            sorted.iter().position(|&c| c == 'H').unwrap()
        );
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert!(tok.encode("Z").unwrap_err().to_string().contains("'Z'"));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        tok.save(&path).unwrap();
        let back = TextTokenizer::from_file(&path).unwrap();
        assert!(back.is_char_level());
        assert_eq!(back.encode(text).unwrap(), ids);
        let mut with_eot = ids.clone();
        with_eot.insert(0, back.eot_id());
        assert_eq!(
            back.decode(&with_eot).unwrap(),
            text,
            "special tokens are left out of text"
        );
    }

    #[test]
    fn bpe_round_trip_with_non_ascii() {
        let corpus: Vec<String> = (0..200)
            .map(|i| {
                format!("the quick brown fox {i} jumps over the lazy dog; café naïve 東京 🙂\n")
            })
            .collect();
        let tok = TextTokenizer::train_bpe(400, corpus.clone().into_iter()).unwrap();
        assert!(
            tok.vocab_size() <= 400 && tok.vocab_size() > 258,
            "{}",
            tok.vocab_size()
        );
        let text = "the lazy café 東京 🙂 and an unseen ẞ word\n\n  spaces";
        let ids = tok.encode(text).unwrap();
        assert!(
            ids.len() < text.len(),
            "merges must shorten the byte sequence"
        );
        assert_eq!(tok.decode(&ids).unwrap(), text);
        assert_eq!(tok.encode(END_OF_TEXT).unwrap(), vec![tok.eot_id()]);
    }
}
