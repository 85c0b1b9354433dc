//! Property tests: whatever bytes the file readers are handed, they answer with a
//! value or an error naming the file, never a panic; shards round-trip any tokens.

use candle_core::Device;
use lmforge::data::{ShardWriter, TokenShard};
use lmforge::model::hf;
use proptest::prelude::*;
use std::path::Path;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/gpt2-tiny/model")
            .join(name),
    )
    .unwrap()
}

/// A valid u16 shard of `tokens` as bytes.
fn shard_bytes(tokens: &[u16]) -> Vec<u8> {
    let mut header = [0i32; 256];
    header[0] = 20240520;
    header[1] = 1;
    header[2] = tokens.len() as i32;
    let mut bytes: Vec<u8> = header.iter().flat_map(|h| h.to_le_bytes()).collect();
    bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    bytes
}

/// Applies byte edits (position, value) and an optional truncation.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(at, v) in edits {
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] = v;
        }
    }
    if let Some(c) = cut {
        bytes.truncate(c % (bytes.len() + 1));
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn shards_round_trip_any_tokens(tokens in prop::collection::vec(any::<u32>(), 0..300), vocab in 1usize..200_000) {
        let tokens: Vec<u32> = tokens.into_iter().map(|t| t % vocab as u32).collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.bin");
        let mut w = ShardWriter::create(&path, vocab).unwrap();
        w.write(&tokens).unwrap();
        w.finish().unwrap();
        let shard = TokenShard::open(&path, Some(vocab)).unwrap();
        prop_assert_eq!(shard.slice(0, shard.len()), tokens);
    }

    #[test]
    fn shard_reader_never_panics(
        tokens in prop::collection::vec(any::<u16>(), 0..64),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..6),
        cut in prop::option::of(any::<usize>()),
        vocab in prop::option::of(1usize..70_000),
    ) {
        let bytes = mutate(shard_bytes(&tokens), &edits, cut);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.bin");
        std::fs::write(&path, &bytes).unwrap();
        match TokenShard::open(&path, vocab) {
            Ok(shard) => {
                let all = shard.slice(0, shard.len());
                prop_assert_eq!(bytes.len(), 1024 + 2 * all.len());
                if let Some(v) = vocab {
                    prop_assert!(all.iter().all(|&t| (t as usize) < v));
                }
            }
            Err(e) => prop_assert!(e.to_string().contains("s.bin"), "{}", e),
        }
    }

    #[test]
    fn model_loader_never_panics(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..8),
        cut in prop::option::of(any::<usize>()),
        config_edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..3),
    ) {
        let path = Path::new("model.safetensors");
        let config_bytes = mutate(fixture("config.json"), &config_edits, None);
        let config = match hf::parse_config(&config_bytes, Path::new("config.json")) {
            Ok(c) => c,
            Err(e) => {
                prop_assert!(e.to_string().contains("config.json"), "{}", e);
                return Ok(());
            }
        };
        let weights = mutate(fixture("model.safetensors"), &edits, cut);
        if let Err(e) = hf::from_bytes(&config, &weights, path, &Device::Cpu) {
            prop_assert!(e.to_string().contains("model.safetensors"), "{}", e);
        }
    }

    #[test]
    fn tokenizer_and_state_readers_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200), edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4)) {
        let dir = tempfile::tempdir().unwrap();
        let tok = dir.path().join("tokenizer.json");
        std::fs::write(&tok, &bytes).unwrap();
        if let Err(e) = lmforge::data::TextTokenizer::from_file(&tok) {
            prop_assert!(e.to_string().contains("tokenizer.json"));
        }
        let state = r#"{"step":3,"adam_t":3,"loader":{"seed":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32],"word_pos":7},"dropout":{"seed":[0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0],"word_pos":0},"best_val_loss":null,"config":{}}"#;
        std::fs::write(dir.path().join("trainer_state.json"), mutate(state.as_bytes().to_vec(), &edits, None)).unwrap();
        if let Err(e) = lmforge::train::checkpoint::load_state(dir.path()) {
            let message = format!("{e:#}");
            prop_assert!(message.contains("trainer_state.json"), "{}", message);
        }
    }
}
