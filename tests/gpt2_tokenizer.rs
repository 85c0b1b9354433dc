//! GPT-2's own BPE through our tokenizer wrapper, against ids from GPT-2's tokenizer.

use lmforge::data::TextTokenizer;
use std::path::Path;

#[test]
fn gpt2_cases_encode_and_decode_exactly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tokenizer");
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
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
        assert_eq!(tok.decode(&want).unwrap(), text, "decoding {want:?}");
    }
}
