//! Turning every rank's gradients into one update, over a [`Collective`].
//!
//! Stage 0 all-reduces the gradients and every rank takes the same AdamW step.
//! Stage 1 (ZeRO-1) reduce-scatters them: each rank keeps AdamW moments for one shard
//! of the flattened weights only, updates that shard, and the shards are all-gathered
//! back into the model. Both give the same numbers; stage 1 holds 1/N of the moments.

use super::distributed::Collective;
use super::optim::{clip_grad_norm, AdamW, ShardedAdamW};
use crate::model::Param;
use anyhow::Result;
use candle_core::Tensor;
use std::rc::Rc;

pub struct DataParallel {
    pub comm: Rc<dyn Collective>,
    zero: Option<Zero>,
}

struct Zero {
    shard: ShardedAdamW,
    /// Start of each parameter in the flat buffer (plus the total at the end).
    offsets: Vec<usize>,
    /// (start, end, decays) of every parameter, for the sharded update.
    segments: Vec<(usize, usize, bool)>,
    /// Flat length padded to a multiple of the number of ranks.
    padded: usize,
}

fn flatten(parts: impl Iterator<Item = Vec<f32>>, padded: usize) -> Vec<f32> {
    let mut flat = Vec::with_capacity(padded);
    parts.for_each(|p| flat.extend(p));
    flat.resize(padded, 0.0);
    flat
}

impl DataParallel {
    /// With `zero_stage` 1 this rank takes its shard of `opt`'s moments and `opt`
    /// gives its full copies up.
    pub fn new(
        comm: Rc<dyn Collective>,
        zero_stage: usize,
        params: &[&Param],
        opt: &mut AdamW,
    ) -> Self {
        if zero_stage == 0 {
            return DataParallel { comm, zero: None };
        }
        let mut offsets = vec![0];
        for p in params {
            offsets.push(offsets.last().unwrap() + p.tensor().elem_count());
        }
        let total = *offsets.last().unwrap();
        let world = comm.size();
        let padded = total.div_ceil(world) * world;
        let len = padded / world;
        let segments = params
            .iter()
            .enumerate()
            .map(|(i, p)| (offsets[i], offsets[i + 1], p.decays() && p.trainable))
            .collect();
        let full = |moments: &mut Vec<Vec<f32>>| {
            let parts = moments.iter_mut().zip(params).map(|(m, p)| {
                let v = std::mem::take(m);
                if v.is_empty() {
                    vec![0.0; p.tensor().elem_count()]
                } else {
                    v
                }
            });
            flatten(parts, padded)
        };
        let (m, v) = (full(&mut opt.m), full(&mut opt.v));
        let shard = ShardedAdamW::from_full(opt.config, opt.t, comm.rank() * len, len, &m, &v);
        DataParallel {
            comm,
            zero: Some(Zero {
                shard,
                offsets,
                segments,
                padded,
            }),
        }
    }

    /// Makes every rank start from rank 0's weights, bit for bit.
    pub fn broadcast_weights(&self, params: &[&Param]) -> Result<()> {
        if self.size() == 1 {
            return Ok(());
        }
        for p in params {
            let mut w = p.tensor().flatten_all()?.to_vec1::<f32>()?;
            self.comm.broadcast(&mut w, 0)?;
            p.var.set(&Tensor::from_vec(
                w,
                p.tensor().shape(),
                p.tensor().device(),
            )?)?;
        }
        Ok(())
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// AdamW moment floats this rank holds.
    pub fn optimizer_floats(&self, opt: &AdamW) -> usize {
        match &self.zero {
            Some(z) => z.shard.m.len() * 2,
            None => opt.m.iter().map(Vec::len).sum::<usize>() * 2,
        }
    }

    /// The summed loss over ranks, and whether any rank was asked to stop.
    pub fn agree(&self, loss: f64, stop: bool) -> Result<(f64, bool)> {
        let mut buf = [loss as f32, if stop { 1.0 } else { 0.0 }];
        if self.size() == 1 {
            return Ok((loss, stop));
        }
        self.comm.all_reduce_sum(&mut buf)?;
        Ok((buf[0] as f64, buf[1] > 0.0))
    }

    /// Reduces the gradients over ranks, clips them to `max_norm` and, when the loss
    /// and the norm are finite, updates the weights. Returns the norm before clipping
    /// and whether the update was applied (the same on every rank).
    pub fn update(
        &mut self,
        params: &[&Param],
        opt: &mut AdamW,
        grads: &mut [Vec<f32>],
        max_norm: f64,
        lr: f64,
        loss_finite: bool,
    ) -> Result<(f64, bool)> {
        let comm = Rc::clone(&self.comm);
        let Some(z) = self.zero.as_mut() else {
            if comm.size() > 1 {
                let mut flat = flatten(grads.iter().cloned(), grads.iter().map(Vec::len).sum());
                comm.all_reduce_sum(&mut flat)?;
                let mut at = 0;
                for g in grads.iter_mut() {
                    let n = g.len();
                    g.copy_from_slice(&flat[at..at + n]);
                    at += n;
                }
            }
            let norm = clip_grad_norm(grads, max_norm);
            let apply = loss_finite && norm.is_finite();
            if apply {
                opt.step(params, grads, lr)?;
            }
            return Ok((norm, apply));
        };
        let mut g = comm.reduce_scatter_sum(&flatten(grads.iter().cloned(), z.padded))?;
        let mut sq = [g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>() as f32];
        comm.all_reduce_sum(&mut sq)?;
        let norm = (sq[0] as f64).sqrt();
        if !(loss_finite && norm.is_finite()) {
            return Ok((norm, false));
        }
        let coef = max_norm / (norm + 1e-6);
        if max_norm > 0.0 && coef < 1.0 {
            g.iter_mut().for_each(|x| *x *= coef as f32);
        }
        let weights = params
            .iter()
            .map(|p| p.tensor().flatten_all().and_then(|t| t.to_vec1::<f32>()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let flat = flatten(weights.into_iter(), z.padded);
        let (start, len) = (z.shard.start, g.len());
        let mut mine = flat[start..start + len].to_vec();
        z.shard.step(&mut mine, &g, &z.segments, lr);
        opt.t = z.shard.t;
        let all = comm.all_gather(&mine)?;
        for (i, p) in params.iter().enumerate().filter(|(_, p)| p.trainable) {
            let w = all[z.offsets[i]..z.offsets[i + 1]].to_vec();
            p.var.set(&Tensor::from_vec(
                w,
                p.tensor().shape(),
                p.tensor().device(),
            )?)?;
        }
        Ok((norm, true))
    }

    /// Before a checkpoint: gathers the sharded moments into `opt` so every rank holds
    /// the full, rank-independent state (a collective: every rank must call it).
    pub fn gather_state(&self, params: &[&Param], opt: &mut AdamW) -> Result<()> {
        let Some(z) = &self.zero else { return Ok(()) };
        let m = self.comm.all_gather(&z.shard.m)?;
        let v = self.comm.all_gather(&z.shard.v)?;
        for (i, p) in params.iter().enumerate() {
            let (a, b) = (z.offsets[i], z.offsets[i + 1]);
            (opt.m[i], opt.v[i]) = if p.trainable {
                (m[a..b].to_vec(), v[a..b].to_vec())
            } else {
                (Vec::new(), Vec::new())
            };
        }
        opt.t = z.shard.t;
        Ok(())
    }

    /// After a checkpoint: drops the gathered copies again (ZeRO-1 keeps only its shard).
    pub fn release_state(&self, opt: &mut AdamW) {
        if self.zero.is_some() {
            opt.m
                .iter_mut()
                .chain(opt.v.iter_mut())
                .for_each(|x| *x = Vec::new());
        }
    }
}
