//! Training batches: random windows of `block_size + 1` tokens (nanoGPT's sampler),
//! drawn by a seeded ChaCha generator whose position is the loader's whole state, so
//! a checkpoint can store it and a resumed run draws the very same batches.

use super::TokenShard;
use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub struct Batcher {
    shard: TokenShard,
    block_size: usize,
    batch_size: usize,
    rng: ChaCha8Rng,
}

/// One batch: inputs and targets, both `batch_size × block_size`, row-major. A
/// target of [`crate::model::bert::IGNORE`] takes no part in the loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub batch_size: usize,
    pub block_size: usize,
    /// 1 for real tokens, 0 for padding; `None` when nothing is padded.
    pub attention_mask: Option<Vec<u32>>,
    /// Positions the loss counts in this micro-batch over all ranks: what its summed
    /// loss is normalised by, so N ranks equal one process.
    pub loss_positions: usize,
    /// A classifier's per-sequence loss weights (class weights); `None`: all 1.
    pub weights: Option<Vec<f32>>,
    /// Non-pad positions of this micro-batch over all ranks, where padding makes them
    /// differ from `loss_positions` (a masked LM); distillation's cosine term is a mean
    /// over them.
    pub hidden_positions: Option<usize>,
}

impl Batch {
    /// A next-token batch (every position counts) that is one of `ranks` equal shares.
    pub fn causal(
        inputs: Vec<u32>,
        targets: Vec<u32>,
        batch_size: usize,
        block_size: usize,
        ranks: usize,
    ) -> Self {
        Batch {
            loss_positions: targets.len() * ranks,
            inputs,
            targets,
            batch_size,
            block_size,
            attention_mask: None,
            weights: None,
            hidden_positions: None,
        }
    }
}

impl Batcher {
    pub fn new(shard: TokenShard, block_size: usize, batch_size: usize, seed: u64) -> Result<Self> {
        ensure!(
            shard.len() > block_size,
            "{}: {} tokens, but block_size {} needs at least {}",
            shard.path().display(),
            shard.len(),
            block_size,
            block_size + 1
        );
        Ok(Batcher {
            shard,
            block_size,
            batch_size,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    pub fn next_batch(&mut self) -> Batch {
        self.next_batch_of(0, 1)
    }

    /// This rank's rows of a global batch of `batch_size × world` windows: every rank
    /// draws the same global batch and reads only its share, so N ranks see exactly
    /// what one process with N times the batch would, and the sampler's position does
    /// not depend on the number of ranks.
    pub fn next_batch_of(&mut self, rank: usize, world: usize) -> Batch {
        let (b, t) = (self.batch_size, self.block_size);
        let starts: Vec<usize> = (0..b * world)
            .map(|_| self.rng.random_range(0..self.shard.len() - t))
            .collect();
        let mut inputs = Vec::with_capacity(b * t);
        let mut targets = Vec::with_capacity(b * t);
        let mut window = vec![0u32; t + 1];
        for &start in &starts[rank * b..(rank + 1) * b] {
            self.shard.read_into(start, &mut window);
            inputs.extend_from_slice(&window[..t]);
            targets.extend_from_slice(&window[1..]);
        }
        Batch::causal(inputs, targets, b, t, world)
    }

    /// The sampler's position: restoring it replays the same batches.
    pub fn state(&self) -> RngState {
        RngState::of(&self.rng)
    }

    pub fn restore(&mut self, state: &RngState) {
        self.rng = state.to_rng();
    }
}

/// Where a run's batches come from: next-token windows, masked-LM sequences or
/// labelled examples.
pub enum BatchSource {
    Causal(Batcher),
    Masked(super::masking::MaskedLmBatcher),
    Labelled(super::labelled::LabelledBatcher),
}

/// A batch source's position, as a checkpoint stores it: a random sampler's generator,
/// or an epoch-shuffled sampler's place in its epochs.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum LoaderState {
    Random(RngState),
    Epochs(EpochCursor),
}

/// Told apart by their fields (`word_pos` is a generator's), through a JSON value:
/// serde's untagged buffering cannot hold the generator's u128 position.
impl<'de> serde::Deserialize<'de> for LoaderState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        if v.get("word_pos").is_some() {
            serde_json::from_value(v).map(LoaderState::Random)
        } else {
            serde_json::from_value(v).map(LoaderState::Epochs)
        }
        .map_err(D::Error::custom)
    }
}

/// Where an epoch-shuffled sampler stands: each epoch's order is a permutation drawn
/// from `seed` and the epoch's number, so these three numbers replay it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochCursor {
    pub seed: u64,
    pub epoch: u64,
    /// The next position in this epoch's order.
    pub next: usize,
}

impl BatchSource {
    pub fn next_batch_of(&mut self, rank: usize, world: usize) -> Batch {
        match self {
            BatchSource::Causal(b) => b.next_batch_of(rank, world),
            BatchSource::Masked(b) => b.next_batch_of(rank, world),
            BatchSource::Labelled(b) => b.next_batch_of(rank, world),
        }
    }

    pub fn next_batch(&mut self) -> Batch {
        self.next_batch_of(0, 1)
    }

    pub fn state(&self) -> LoaderState {
        match self {
            BatchSource::Causal(b) => LoaderState::Random(b.state()),
            BatchSource::Masked(b) => LoaderState::Random(b.state()),
            BatchSource::Labelled(b) => LoaderState::Epochs(b.state()),
        }
    }

    /// Continues from `state`; one of another kind of sampler is an error.
    pub fn restore(&mut self, state: &LoaderState) -> anyhow::Result<()> {
        match (self, state) {
            (BatchSource::Causal(b), LoaderState::Random(s)) => b.restore(s),
            (BatchSource::Masked(b), LoaderState::Random(s)) => b.restore(s),
            (BatchSource::Labelled(b), LoaderState::Epochs(c)) => b.restore(*c),
            _ => anyhow::bail!("the checkpoint's sampler state is of another kind of data (language-model tokens vs labelled examples)"),
        }
        Ok(())
    }
}

/// The exact position of a ChaCha generator: enough to continue its stream.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RngState {
    pub seed: [u8; 32],
    pub word_pos: u128,
}

impl RngState {
    pub fn of(rng: &ChaCha8Rng) -> Self {
        RngState {
            seed: rng.get_seed(),
            word_pos: rng.get_word_pos(),
        }
    }

    pub fn to_rng(&self) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_word_pos(self.word_pos);
        rng
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ShardWriter;

    #[test]
    fn loader_states_of_both_kinds_survive_json() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        rng.random::<u64>();
        let states = [
            LoaderState::Random(RngState::of(&rng)),
            LoaderState::Epochs(EpochCursor {
                seed: 9,
                epoch: 2,
                next: 17,
            }),
        ];
        for state in states {
            let json = serde_json::to_string(&state).unwrap();
            assert_eq!(serde_json::from_str::<LoaderState>(&json).unwrap(), state);
        }
    }

    #[test]
    fn targets_are_shifted_inputs_and_state_replays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        let mut w = ShardWriter::create(&path, 1000).unwrap();
        w.write(&(0..1000).collect::<Vec<u32>>()).unwrap();
        w.finish().unwrap();
        let mut b = Batcher::new(TokenShard::open(&path, None).unwrap(), 8, 4, 7).unwrap();
        let first = b.next_batch();
        for row in 0..4 {
            let x = &first.inputs[row * 8..row * 8 + 8];
            let y = &first.targets[row * 8..row * 8 + 8];
            for k in 0..8 {
                assert_eq!(y[k], x[k] + 1);
            }
        }
        let saved = b.state();
        let next: Vec<Batch> = (0..3).map(|_| b.next_batch()).collect();
        b.restore(&saved);
        let replay: Vec<Batch> = (0..3).map(|_| b.next_batch()).collect();
        assert_eq!(next, replay);
        assert_ne!(next[0], first);
    }
}
