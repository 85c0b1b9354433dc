//! Model stage: the building blocks every family shares ([`layers`]), GPT-2
//! ([`gpt`]) with its hand-written training step ([`backprop`]), BERT and DistilBERT
//! ([`bert`]), and the Hugging Face file layout of each ([`hf`]).

pub mod backprop;
pub mod bert;
pub mod bert_backprop;
pub mod family;
pub mod gguf;
pub mod gpt;
pub mod hf;
pub mod kernels;
pub mod layers;

pub use bert::{Bert, BertConfig, BertFlavor};
pub use family::{Model, ModelConfig, Objective};
pub use gpt::{cross_entropy_sum, Gpt, GptConfig, KvCache};
pub use layers::{Dropout, Init, Kernels, Param};
