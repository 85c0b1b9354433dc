//! BERT's WordPiece tokenizer against transformers: ids for a vocab.txt equal those
//! of the fast and the slow (pure-Python) BertTokenizer, stored in
//! tests/fixtures/bert-tokenizer/cases.json by scripts/bert_tokenizer_cases.py.

use lmforge::data::TextTokenizer;
use serde_json::Value;
use std::path::{Path, PathBuf};

mod common;
use common::{fails, ok, s};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert-tokenizer")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn vocab_txt_ids_equal_transformers_fast_and_slow() {
    let tok = TextTokenizer::from_vocab_txt(&fixture().join("vocab.txt")).unwrap();
    let specials = tok.bert_specials().unwrap();
    assert_eq!(
        (
            specials.pad,
            specials.unk,
            specials.cls,
            specials.sep,
            specials.mask
        ),
        (0, 1, 2, 3, 4)
    );
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("cases.json")).unwrap())
            .unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ours = tok.encode(text).unwrap();
        assert_eq!(ours, ids(&case["fast"]), "fast tokenizer, {text:?}");
        assert_eq!(ours, ids(&case["slow"]), "slow tokenizer, {text:?}");
        let mut with_special = vec![specials.cls];
        with_special.extend(&ours);
        with_special.push(specials.sep);
        assert_eq!(with_special, ids(&case["with_special"]), "{text:?}");
    }
    // A word over 100 characters is one [UNK], as in BERT.
    assert_eq!(tok.encode(&"a".repeat(101)).unwrap(), vec![specials.unk]);
}

#[test]
fn trained_wordpiece_round_trips_through_vocab_txt_and_bad_vocabularies_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = common::prepare_with(tmp.path(), 60_000, "wordpiece:400");
    let input = tmp.path().join("c.txt");
    let json = TextTokenizer::from_file(&data.join("tokenizer.json")).unwrap();
    let txt = TextTokenizer::from_vocab_txt(&data.join("vocab.txt")).unwrap();
    assert_eq!(json.vocab_size(), 400);
    let text = "ROMEO: But, soft! what light through yonder window breaks? Élan 日本";
    assert_eq!(json.encode(text).unwrap(), txt.encode(text).unwrap());
    assert_eq!(json.bert_specials(), txt.bert_specials());
    // The document separator is [SEP]: the shard starts with it.
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["eot_id"], 3);

    // Training is reproducible: the same text gives the same vocabulary, every time
    // (tokenizers' own trainer does not: huggingface/tokenizers#1794).
    let twice = common::prepare_with(&tmp.path().join("twice"), 60_000, "wordpiece:400");
    assert_eq!(
        std::fs::read(data.join("vocab.txt")).unwrap(),
        std::fs::read(twice.join("vocab.txt")).unwrap()
    );
    let words: Vec<String> = std::fs::read_to_string(data.join("vocab.txt"))
        .unwrap()
        .lines()
        .map(String::from)
        .collect();
    assert_eq!(&words[..5], ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]);
    assert!(
        words.iter().any(|w| w.starts_with("##") && w.len() > 3),
        "merged ## pieces"
    );
    // Every piece of a word decodes back to it (lowercased, BERT-normalised).
    let ids = json.encode("wherefore art thou romeo").unwrap();
    assert_eq!(json.decode(&ids).unwrap(), "wherefore art thou romeo");

    // Preparing with the vocab.txt gives the same shards.
    let again = tmp.path().join("again");
    let vocab = data.join("vocab.txt");
    ok(&[
        "prepare",
        "--input",
        s(&input),
        "--out",
        s(&again),
        "--tokenizer",
        s(&vocab),
    ]);
    for f in ["train.bin", "val.bin"] {
        assert_eq!(
            std::fs::read(data.join(f)).unwrap(),
            std::fs::read(again.join(f)).unwrap(),
            "{f}"
        );
    }

    let bad = tmp.path().join("bad.txt");
    for (vocab, says) in [
        ("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n", &["[MASK]"][..]),
        ("[PAD]\n[UNK]\n[MASK]\nthe\n", &["[CLS] [SEP]"]),
        (
            "[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nking\nthe\n",
            &["line 8", "line 6"],
        ),
    ] {
        std::fs::write(&bad, vocab).unwrap();
        let err = fails(&[
            "prepare",
            "--input",
            s(&input),
            "--out",
            s(&again),
            "--tokenizer",
            s(&bad),
        ]);
        assert!(err.contains("bad.txt"), "{err}");
        for want in says {
            assert!(err.contains(want), "{err}");
        }
    }
}
