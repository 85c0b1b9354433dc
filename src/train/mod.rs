//! Training stage: configuration, optimizer, schedule, checkpoints, the loop.

pub mod checkpoint;
pub mod config;
pub mod distill;
pub mod distributed;
pub mod metrics;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod optim;
pub mod parallel;
pub mod precision;
pub mod rendezvous;
pub mod schedule;
pub mod status;
pub mod tensorboard;
pub mod trainer;

pub use config::TrainConfig;
pub use trainer::{train, RunSummary, TrainOptions};
