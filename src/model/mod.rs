//! Model stage: GPT-2 ([`gpt`]), its hand-written training step ([`backprop`]) and
//! its Hugging Face file layout ([`hf`]).

pub mod backprop;
pub mod gpt;
pub mod hf;
pub mod kernels;

pub use gpt::{cross_entropy_sum, Dropout, Gpt, GptConfig, Kernels, KvCache, Param};
