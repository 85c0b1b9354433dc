//! Masked-LM batches, as transformers' `DataCollatorForLanguageModeling` makes them.
//!
//! The token stream of a prepared directory holds documents, each preceded by the
//! separator ([SEP] for a BERT tokenizer). Each document is cut into blocks of
//! `block_size − 2` tokens; a sequence is `[CLS] block [SEP]`, padded to `block_size`
//! with an attention mask. Each non-special position is selected with probability
//! `mlm_probability`; a selected token becomes [MASK] 80 % of the time, a random id
//! 10 %, and stays 10 %; labels are [`IGNORE`] everywhere else.
//!
//! Every sequence is masked by a generator of its own, seeded from the batch
//! sampler's stream (training) or from the block's index (evaluation), so the
//! sampler's position is the whole state, a resumed run masks exactly as before, and
//! evaluation masks the same way at any batch size.

use super::{Batch, RngState, TokenShard};
use crate::data::tokenizer::BertSpecials;
use crate::model::bert::IGNORE;
use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// What masking needs to know of the vocabulary.
#[derive(Debug, Clone, Copy)]
pub struct MaskingSpec {
    pub specials: BertSpecials,
    pub vocab_size: usize,
    pub probability: f64,
}

/// Corrupts `tokens` in place for masked-LM training; returns the labels
/// ([`IGNORE`] where nothing is to be predicted). Special tokens are never selected.
pub fn mask_tokens(tokens: &mut [u32], spec: &MaskingSpec, rng: &mut ChaCha8Rng) -> Vec<u32> {
    let s = spec.specials;
    tokens
        .iter_mut()
        .map(|t| {
            let special = [s.pad, s.cls, s.sep].contains(t);
            // One draw per position whether or not it is special, as the collator draws
            // its Bernoulli matrix over every position.
            let selected = rng.random::<f64>() < spec.probability;
            let (replace, random) = (rng.random::<f64>() < 0.8, rng.random::<f64>() < 0.5);
            let word = rng.random_range(0..spec.vocab_size as u32);
            if special || !selected {
                return IGNORE;
            }
            let label = *t;
            if replace {
                *t = s.mask;
            } else if random {
                *t = word;
            }
            label
        })
        .collect()
}

/// Blocks of the documents of a token stream: `(start, len)` in the stream.
fn blocks(shard: &TokenShard, separator: u32, max_len: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    let emit = |from: usize, to: usize, out: &mut Vec<(usize, usize)>| {
        let mut s = from;
        while s < to {
            let len = max_len.min(to - s);
            out.push((s, len));
            s += len;
        }
    };
    for i in 0..shard.len() {
        if shard.get(i) == separator {
            emit(start, i, &mut out);
            start = i + 1;
        }
    }
    emit(start, shard.len(), &mut out);
    out
}

/// Draws masked-LM batches of `[CLS] … [SEP]` sequences from a token shard.
pub struct MaskedLmBatcher {
    shard: TokenShard,
    blocks: Vec<(usize, usize)>,
    block_size: usize,
    batch_size: usize,
    spec: MaskingSpec,
    rng: ChaCha8Rng,
}

impl MaskedLmBatcher {
    pub fn new(
        shard: TokenShard,
        block_size: usize,
        batch_size: usize,
        spec: MaskingSpec,
        seed: u64,
    ) -> Result<Self> {
        ensure!(
            block_size >= 3,
            "block_size {block_size}: a masked-LM sequence needs [CLS], a token and [SEP]"
        );
        ensure!(
            (0.0..=1.0).contains(&spec.probability) && spec.probability > 0.0,
            "mlm_probability {} must be in (0, 1]",
            spec.probability
        );
        let blocks = blocks(&shard, spec.specials.sep, block_size - 2);
        ensure!(
            !blocks.is_empty(),
            "{}: no tokens between document separators",
            shard.path().display()
        );
        Ok(MaskedLmBatcher {
            shard,
            blocks,
            block_size,
            batch_size,
            spec,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// Number of sequences one pass over the shard makes.
    pub fn sequences(&self) -> usize {
        self.blocks.len()
    }

    /// Sequence `index` masked by a generator seeded with `mask_seed`: (inputs,
    /// labels, attention mask), each `block_size` long.
    fn sequence(&self, index: usize, mask_seed: u64) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
        let (start, len) = self.blocks[index];
        let s = self.spec.specials;
        let mut tokens = Vec::with_capacity(self.block_size);
        tokens.push(s.cls);
        tokens.extend(self.shard.slice(start, start + len));
        tokens.push(s.sep);
        let real = tokens.len();
        tokens.resize(self.block_size, s.pad);
        let labels = mask_tokens(
            &mut tokens,
            &self.spec,
            &mut ChaCha8Rng::seed_from_u64(mask_seed),
        );
        let mask = (0..self.block_size).map(|i| (i < real) as u32).collect();
        (tokens, labels, mask)
    }

    /// A batch of the given sequences, counting `loss_positions` over all ranks.
    fn batch(&self, rows: &[(usize, u64)], loss_positions: usize) -> Batch {
        let mut b = Batch {
            inputs: Vec::with_capacity(rows.len() * self.block_size),
            targets: Vec::with_capacity(rows.len() * self.block_size),
            batch_size: rows.len(),
            block_size: self.block_size,
            attention_mask: Some(Vec::with_capacity(rows.len() * self.block_size)),
            loss_positions,
            weights: None,
            hidden_positions: None,
        };
        for &(index, seed) in rows {
            let (tokens, labels, mask) = self.sequence(index, seed);
            b.inputs.extend(tokens);
            b.targets.extend(labels);
            b.attention_mask.as_mut().unwrap().extend(mask);
        }
        b
    }

    /// This rank's rows of a global batch of `batch_size × world` sequences. Every
    /// rank draws the same global batch (so the loss is normalised by the labelled
    /// positions of all of it) and reads only its share.
    pub fn next_batch_of(&mut self, rank: usize, world: usize) -> Batch {
        let rows: Vec<(usize, u64)> = (0..self.batch_size * world)
            .map(|_| {
                (
                    self.rng.random_range(0..self.blocks.len()),
                    self.rng.random(),
                )
            })
            .collect();
        // Masked once, whole: the global label count, then this rank's rows of it.
        let mut all = self.batch(&rows, 0);
        let total = all.targets.iter().filter(|&&l| l != IGNORE).count();
        let non_pad = all
            .attention_mask
            .as_ref()
            .map(|m| m.iter().filter(|&&x| x != 0).count());
        let share = self.batch_size * self.block_size;
        let range = rank * share..(rank + 1) * share;
        Batch {
            inputs: all.inputs.drain(range.clone()).collect(),
            targets: all.targets.drain(range.clone()).collect(),
            batch_size: self.batch_size,
            block_size: self.block_size,
            attention_mask: all.attention_mask.map(|mut m| m.drain(range).collect()),
            loss_positions: total,
            weights: None,
            hidden_positions: non_pad,
        }
    }

    pub fn next_batch(&mut self) -> Batch {
        self.next_batch_of(0, 1)
    }

    /// Every sequence once, in order, masked by a generator seeded from `seed` and
    /// its index, in batches of up to `batch_size`: the same masks at any batch size.
    pub fn every_sequence(&self, seed: u64) -> impl Iterator<Item = Batch> + '_ {
        let n = self.blocks.len();
        (0..n).step_by(self.batch_size).map(move |from| {
            let rows: Vec<(usize, u64)> = (from..n.min(from + self.batch_size))
                .map(|i| (i, seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)))
                .collect();
            let mut b = self.batch(&rows, 0);
            b.loss_positions = b.targets.iter().filter(|&&l| l != IGNORE).count();
            b
        })
    }

    pub fn state(&self) -> RngState {
        RngState::of(&self.rng)
    }

    pub fn restore(&mut self, state: &RngState) {
        self.rng = state.to_rng();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ShardWriter;

    const SPECIALS: BertSpecials = BertSpecials {
        pad: 0,
        unk: 1,
        cls: 2,
        sep: 3,
        mask: 4,
    };

    #[test]
    fn masking_selects_fifteen_percent_and_splits_80_10_10() {
        let spec = MaskingSpec {
            specials: SPECIALS,
            vocab_size: 1000,
            probability: 0.15,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let n = 200_000;
        // Ids ≥ 100 so that a random replacement is told apart from "kept".
        let original: Vec<u32> = (0..n).map(|i| 100 + (i % 900) as u32).collect();
        let mut tokens = original.clone();
        let labels = mask_tokens(&mut tokens, &spec, &mut rng);
        let selected: Vec<usize> = (0..n).filter(|&i| labels[i] != IGNORE).collect();
        let frac = selected.len() as f64 / n as f64;
        assert!((frac - 0.15).abs() < 0.005, "selected {frac}");
        let masked = selected.iter().filter(|&&i| tokens[i] == 4).count() as f64;
        let kept = selected
            .iter()
            .filter(|&&i| tokens[i] == original[i])
            .count() as f64;
        let k = selected.len() as f64;
        assert!((masked / k - 0.8).abs() < 0.01, "masked {}", masked / k);
        // A random replacement may draw the original id (1 in 1000), counted as kept.
        assert!((kept / k - 0.1).abs() < 0.01, "kept {}", kept / k);
        for i in 0..n {
            if labels[i] == IGNORE {
                assert_eq!(tokens[i], original[i], "unselected positions stay");
            } else {
                assert_eq!(labels[i], original[i], "labels are the original ids");
            }
        }
        // Specials are never selected, even at probability 1.
        let mut specials = vec![0, 2, 3, 0, 2, 3];
        let all = MaskingSpec {
            probability: 1.0,
            ..spec
        };
        assert!(mask_tokens(&mut specials, &all, &mut rng)
            .iter()
            .all(|&l| l == IGNORE));
        assert_eq!(specials, vec![0, 2, 3, 0, 2, 3]);
    }

    #[test]
    fn sequences_are_cls_block_sep_padded_and_resume_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.bin");
        let mut w = ShardWriter::create(&path, 1000).unwrap();
        // Two documents: 10 tokens, then 3 tokens.
        let mut stream = vec![3];
        stream.extend(10..20);
        stream.push(3);
        stream.extend(50..53);
        w.write(&stream).unwrap();
        w.finish().unwrap();
        let spec = MaskingSpec {
            specials: SPECIALS,
            vocab_size: 1000,
            probability: 0.15,
        };
        let shard = TokenShard::open(&path, None).unwrap();
        let mut b = MaskedLmBatcher::new(shard, 8, 2, spec, 1).unwrap();
        // 10 tokens → blocks of 6 and 4; 3 tokens → one block.
        assert_eq!(b.blocks, vec![(1, 6), (7, 4), (12, 3)]);
        let (tokens, labels, mask) = b.sequence(2, 9);
        assert_eq!(mask, vec![1, 1, 1, 1, 1, 0, 0, 0]);
        assert_eq!((tokens[0], tokens[4], tokens[5]), (2, 3, 0));
        for i in [0, 4, 5, 6, 7] {
            assert_eq!(labels[i], IGNORE);
        }
        let saved = b.state();
        let next: Vec<Batch> = (0..3).map(|_| b.next_batch()).collect();
        b.restore(&saved);
        let replay: Vec<Batch> = (0..3).map(|_| b.next_batch()).collect();
        assert_eq!(next, replay);
        // Two ranks' shares make up the one-process batch, with the global count.
        b.restore(&saved);
        let first = b.next_batch_of(0, 2);
        b.restore(&saved);
        let second = b.next_batch_of(1, 2);
        assert_eq!(first.inputs.len(), 2 * 8);
        let mut one =
            MaskedLmBatcher::new(TokenShard::open(&path, None).unwrap(), 8, 4, spec, 1).unwrap();
        one.restore(&saved);
        let whole = one.next_batch();
        assert_eq!([first.inputs, second.inputs].concat(), whole.inputs);
        assert_eq!([first.targets, second.targets].concat(), whole.targets);
        assert_eq!(first.loss_positions, whole.loss_positions);
        assert_eq!(second.loss_positions, whole.loss_positions);
        // Evaluation masks do not depend on the batch size.
        let all = |bs: usize| {
            let e = MaskedLmBatcher::new(TokenShard::open(&path, None).unwrap(), 8, bs, spec, 1)
                .unwrap();
            let v: Vec<Batch> = e.every_sequence(7).collect();
            (
                v.iter().flat_map(|b| b.inputs.clone()).collect::<Vec<_>>(),
                v.iter().flat_map(|b| b.targets.clone()).collect::<Vec<_>>(),
            )
        };
        assert_eq!(all(1), all(3));
    }
}
