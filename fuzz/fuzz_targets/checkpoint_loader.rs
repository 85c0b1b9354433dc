//! Any bytes as a checkpoint: the first two bytes give the length of `config.json`,
//! the rest is `model.safetensors`; the same bytes also go through the trainer-state
//! parser. Errors are fine, panics and unchecked allocations are not.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lmforge::model::hf;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (config, weights) = data[2..].split_at(n);
    if let Ok(cfg) = hf::parse_config(config, Path::new("config.json")) {
        let _ = hf::from_bytes(&cfg, weights, Path::new("model.safetensors"), &candle_core::Device::Cpu);
    }
    let _ = lmforge::train::checkpoint::parse_state(config, Path::new("trainer_state.json"));
});
