//! lmforge: raw text to a trained GPT in one binary.
//!
//! The modules follow the pipeline: [`data`] (clean, tokenize, shards, loader) →
//! [`model`] (GPT-2, BERT and DistilBERT in the Hugging Face layout) → [`train`]
//! (optimizer, schedule, checkpoints, the loop) → [`eval`] → [`generate`] and
//! [`classify`] → [`serve`]; [`sweep`] searches over `train` runs and
//! [`dashboard`] watches them. The CLI in `main.rs` only parses arguments and calls into
//! these.

/// Serde for a type kept in config files as the string its `Display` writes and its
/// `FromStr` reads (`"cuda:1"`, `"bf16"`, `"wordpiece:2000"`), errors included.
macro_rules! serde_as_string {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.to_string())
            }
        }

        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                <String as serde::Deserialize>::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}

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
