//! Any bytes as a token shard: open (with and without a vocabulary check) and read
//! every token; errors are fine, panics and over-allocation are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lmforge::data::TokenShard;

fuzz_target!(|data: &[u8]| {
    thread_local! {
        static DIR: tempfile::TempDir = tempfile::tempdir().unwrap();
    }
    DIR.with(|dir| {
        let path = dir.path().join("fuzz.bin");
        std::fs::write(&path, data).unwrap();
        let vocab = data.first().map(|&b| 1 + b as usize * 300);
        for v in [None, vocab] {
            if let Ok(shard) = TokenShard::open(&path, v) {
                let tokens = shard.slice(0, shard.len());
                assert_eq!(tokens.len(), shard.len());
                if let Some(v) = v {
                    assert!(tokens.iter().all(|&t| (t as usize) < v));
                }
            }
        }
    });
});
