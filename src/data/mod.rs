//! Data stage: raw text → clean text → tokens → llm.c shards → training batches.

pub mod clean;
pub mod labelled;
pub mod loader;
pub mod masking;
pub mod prepare;
pub mod shard;
pub mod tokenizer;
pub mod wordpiece;

pub use loader::{Batch, BatchSource, Batcher, EpochCursor, LoaderState, RngState};
pub use masking::{MaskedLmBatcher, MaskingSpec};
pub use shard::{ShardWriter, TokenShard};
pub use tokenizer::{TextTokenizer, TokenizerSpec, END_OF_TEXT};
