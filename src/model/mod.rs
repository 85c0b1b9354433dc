//! Model stage: GPT-2 ([`gpt`]) and its Hugging Face file layout ([`hf`]).

pub mod gpt;
pub mod hf;
pub mod kernels;

pub use gpt::{cross_entropy_sum, Dropout, Gpt, GptConfig, Kernels, KvCache, Param};
