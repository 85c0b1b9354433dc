//! Tokenizers, all stored as Hugging Face `tokenizer.json`.
//!
//! - char-level: one token per character seen in the corpus, sorted (nanoGPT's
//!   scheme), plus `<|endoftext|>`; stored as a BPE model without merges and a `Fuse`
//!   decoder so any HF runtime loads it.
//! - byte-level BPE trained on the corpus (GPT-2's pre-tokenizer and decoder).
//! - an existing `tokenizer.json` (GPT-2's own, for instance).

use anyhow::{anyhow, bail, Context, Result};
use rayon::prelude::*;
use serde_json::json;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::models::TrainerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer};

pub const END_OF_TEXT: &str = "<|endoftext|>";

/// What `--tokenizer` asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSpec {
    Char,
    Bpe(usize),
    File(PathBuf),
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
        if s.ends_with(".json") {
            return Ok(TokenizerSpec::File(PathBuf::from(s)));
        }
        bail!("--tokenizer {s}: expected char, bpe:VOCAB_SIZE or a tokenizer.json path")
    }
}

/// A tokenizer with a known end-of-text id.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    eot: u32,
    /// Set for char-level tokenizers, which cannot encode unseen characters.
    char_level: bool,
}

fn tk_err(path: &Path, e: tokenizers::Error) -> anyhow::Error {
    anyhow!("{}: {e}", path.display())
}

impl TextTokenizer {
    fn wrap(inner: Tokenizer, origin: &Path) -> Result<Self> {
        let eot = inner
            .token_to_id(END_OF_TEXT)
            .ok_or_else(|| anyhow!("{}: tokenizer has no {END_OF_TEXT} token", origin.display()))?;
        let char_level = matches!(
            inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::Fuse(_))
        );
        Ok(TextTokenizer {
            inner,
            eot,
            char_level,
        })
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
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(ByteLevel::new(false, true, true)));
        inner
            .add_special_tokens(vec![AddedToken::from(END_OF_TEXT, true)])
            .map_err(|e| tk_err(vocab, e))?;
        Self::wrap(inner, vocab)
    }

    /// The tokenizer stored with a model: `tokenizer.json`, else `vocab.json` +
    /// `merges.txt`; `None` when the directory has neither.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let json = dir.join("tokenizer.json");
        if json.exists() {
            return Self::from_file(&json).map(Some);
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

    /// Writes `tokenizer.json` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = self.inner.to_string(false).map_err(|e| tk_err(path, e))?;
        crate::fsutil::write_atomic(path, text.as_bytes()).context("saving tokenizer")
    }

    /// Writes `tokenizer.json` and the `tokenizer_config.json` that lets
    /// `transformers.AutoTokenizer.from_pretrained(dir)` load it as a fast tokenizer.
    pub fn save_to_model_dir(&self, dir: &Path, model_max_length: usize) -> Result<()> {
        self.save(&dir.join("tokenizer.json"))?;
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
