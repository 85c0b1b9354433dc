//! GPT-2's own BPE through our tokenizer wrapper, against ids from GPT-2's tokenizer.

use lmforge::data::TextTokenizer;
use std::path::Path;

fn check_cases(tok: &TextTokenizer) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tokenizer");
    assert_eq!(tok.eot_id(), 50256);
    assert_eq!(tok.vocab_size(), 50257);
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text).unwrap(), want, "encoding {text:?}");
        // Text comes back without special tokens, as HF's skip_special_tokens=True.
        assert_eq!(
            tok.decode(&want).unwrap(),
            text.replace("<|endoftext|>", ""),
            "decoding {want:?}"
        );
    }
}

#[test]
fn gpt2_tokenizer_json_matches_gpt2_ids() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tokenizer");
    check_cases(&TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap());
}

#[test]
fn gpt2_vocab_and_merges_match_gpt2_ids() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tokenizer");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["vocab.json", "merges.txt"] {
        std::fs::copy(dir.join(f), tmp.path().join(f)).unwrap();
    }
    // A model directory with only the original file pair.
    check_cases(&TextTokenizer::from_model_dir(tmp.path()).unwrap().unwrap());
    assert!(TextTokenizer::from_model_dir(&tmp.path().join("nothing"))
        .unwrap()
        .is_none());
}
