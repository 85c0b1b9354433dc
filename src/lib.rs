//! lmforge: raw text to a trained GPT in one binary.
//!
//! The modules follow the pipeline: [`data`] (clean, tokenize, shards, loader) →
//! [`model`] (GPT-2, BERT and DistilBERT in the Hugging Face layout) → [`train`]
//! (optimizer, schedule, checkpoints, the loop) → [`eval`] → [`generate`] and
//! [`classify`] → [`serve`]; [`sweep`] searches over `train` runs and
//! [`dashboard`] watches them. The CLI in `main.rs` only parses arguments and calls into
//! these.

pub mod bench;
pub mod classify;
pub mod dashboard;
pub mod data;
pub mod device;
pub mod embed;
pub mod eval;
pub mod fill_mask;
pub mod fsutil;
pub mod generate;
pub mod metrics;
pub mod model;
pub mod serve;
pub mod sweep;
pub mod train;

/// The Shakespeare corpus shipped inside the binary (see `data/shakespeare/NOTICE.md`).
pub const EMBEDDED_SHAKESPEARE: &str = include_str!("../data/shakespeare/input.txt");

/// The default training preset, embedded so `lmforge train` works from any directory.
pub const DEFAULT_PRESET: &str = include_str!("../configs/shakespeare-char.toml");
