//! Turning every rank's gradients into one update, over a [`Collective`].
//!
//! Stage 0 all-reduces the gradients and every rank takes the same AdamW step.
//! Stage 1 (ZeRO-1) reduce-scatters them: each rank keeps AdamW moments for one shard
//! of the flattened weights only, updates that shard, and the shards are all-gathered
//! back into the model. Both give the same numbers; stage 1 holds 1/N of the moments.

use super::distributed::Collective;
use super::optim::{clip_grad_norm, AdamW, Moments, ShardedAdamW};
use crate::model::Param;
use anyhow::{bail, ensure, Result};
use candle_core::{DType, Tensor};
use std::rc::Rc;

/// One optimizer step's gradients, one buffer per parameter, where the weights are.
pub enum Gradients {
    /// f32 vectors a CPU model's gradients are summed into (the hand-written step
    /// writes here directly).
    Host(Vec<Vec<f32>>),
    /// f32 tensors on the model's device (`None` for a frozen weight, and before the
    /// first micro-batch).
    Device(Vec<Option<Tensor>>),
}

impl Gradients {
    /// Zeroed buffers for `params`, host vectors for a CPU model.
    pub fn for_params(params: &[&Param]) -> Self {
        match params.first().is_none_or(|p| p.tensor().device().is_cpu()) {
            true => Gradients::Host(
                params
                    .iter()
                    .map(|p| vec![0.0; p.tensor().elem_count()])
                    .collect(),
            ),
            false => Gradients::Device(vec![None; params.len()]),
        }
    }

    /// The host buffers of a CPU model's gradients.
    pub fn into_host(self) -> Option<Vec<Vec<f32>>> {
        match self {
            Gradients::Host(g) => Some(g),
            Gradients::Device(_) => None,
        }
    }

    pub fn zero(&mut self) {
        match self {
            Gradients::Host(g) => g.iter_mut().for_each(|g| g.fill(0.0)),
            Gradients::Device(g) => g.iter_mut().for_each(|g| *g = None),
        }
    }

    /// `self[i] += g` (any float dtype, summed in f32).
    pub fn add(&mut self, i: usize, g: &Tensor) -> Result<()> {
        match self {
            Gradients::Host(acc) => add_into(&mut acc[i], g),
            Gradients::Device(acc) => {
                let g = g.to_dtype(DType::F32)?;
                acc[i] = Some(match acc[i].take() {
                    Some(sum) => (sum + g)?,
                    None => g,
                });
                Ok(())
            }
        }
    }

    /// Multiplies every gradient by `k` (undoing a loss scale).
    pub fn scale(&mut self, k: f64) -> Result<()> {
        match self {
            Gradients::Host(g) => g
                .iter_mut()
                .for_each(|g| g.iter_mut().for_each(|x| *x *= k as f32)),
            Gradients::Device(g) => {
                for t in g.iter_mut().flatten() {
                    *t = (&*t * k)?;
                }
            }
        }
        Ok(())
    }
}

/// `acc += g`, reading an f32 CPU gradient where it lies instead of copying it out.
fn add_into(acc: &mut [f32], g: &Tensor) -> Result<()> {
    use candle_core::Storage;
    use std::borrow::Cow;
    ensure!(g.elem_count() == acc.len(), "gradient of the wrong size");
    let g = g.to_dtype(DType::F32)?.contiguous()?;
    let (storage, layout) = g.storage_and_layout();
    let values: Cow<[f32]> = match &*storage {
        Storage::Cpu(cpu) => {
            let start = layout.start_offset();
            Cow::Borrowed(&cpu.as_slice::<f32>()?[start..start + acc.len()])
        }
        _ => Cow::Owned(g.flatten_all()?.to_vec1::<f32>()?),
    };
    acc.iter_mut().zip(values.iter()).for_each(|(a, x)| *a += x);
    Ok(())
}

/// The global L2 norm of device gradients (PyTorch's `clip_grad_norm_`): each
/// tensor's sum of squares on the device, added in f64 there, read back once (one
/// synchronisation a step, not one a weight).
fn device_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let squares: Vec<Tensor> = grads
        .iter()
        .flatten()
        .map(|g| g.sqr()?.sum_all()?.to_dtype(DType::F64))
        .collect::<candle_core::Result<_>>()?;
    if squares.is_empty() {
        return Ok(0.0);
    }
    let total = Tensor::stack(&squares, 0)?.sum_all()?.to_scalar::<f64>()?;
    Ok(total.sqrt())
}

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
    /// gives its full copies up (a CPU model's: ZeRO-1 shards host memory).
    pub fn new(
        comm: Rc<dyn Collective>,
        zero_stage: usize,
        params: &[&Param],
        opt: &mut AdamW,
    ) -> Result<Self> {
        if zero_stage == 0 {
            return Ok(DataParallel { comm, zero: None });
        }
        if opt
            .moments
            .iter()
            .any(|m| matches!(m, Moments::Device { .. }))
        {
            bail!("zero_stage = 1 shards optimizer state in host memory: use it with device = \"cpu\" (on a GPU, zero_stage = 0)");
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
        let mut flat_m = Vec::with_capacity(padded);
        let mut flat_v = Vec::with_capacity(padded);
        for (slot, p) in opt.moments.iter_mut().zip(params) {
            match std::mem::replace(slot, Moments::Empty) {
                Moments::Host { m, v } => {
                    flat_m.extend(m);
                    flat_v.extend(v);
                }
                _ => {
                    let n = p.tensor().elem_count();
                    flat_m.resize(flat_m.len() + n, 0.0);
                    flat_v.resize(flat_v.len() + n, 0.0);
                }
            }
        }
        flat_m.resize(padded, 0.0);
        flat_v.resize(padded, 0.0);
        let (m, v) = (flat_m, flat_v);
        let shard = ShardedAdamW::from_full(opt.config, opt.t, comm.rank() * len, len, &m, &v);
        Ok(DataParallel {
            comm,
            zero: Some(Zero {
                shard,
                offsets,
                segments,
                padded,
            }),
        })
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
            None => opt.moments.iter().map(Moments::len).sum(),
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
        grads: &mut Gradients,
        max_norm: f64,
        lr: f64,
        loss_finite: bool,
    ) -> Result<(f64, bool)> {
        let comm = Rc::clone(&self.comm);
        let grads = match grads {
            Gradients::Device(grads) => {
                return Self::update_on_device(
                    &*comm,
                    params,
                    opt,
                    grads,
                    max_norm,
                    lr,
                    loss_finite,
                )
            }
            Gradients::Host(grads) => grads,
        };
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

    /// [`Self::update`] for gradients on a GPU: all-reduced there (one flat buffer),
    /// clipped and applied by tensor operations, never copied to the host.
    fn update_on_device(
        comm: &dyn Collective,
        params: &[&Param],
        opt: &mut AdamW,
        grads: &mut [Option<Tensor>],
        max_norm: f64,
        lr: f64,
        loss_finite: bool,
    ) -> Result<(f64, bool)> {
        if comm.size() > 1 {
            let flat: Vec<Tensor> = grads
                .iter()
                .flatten()
                .map(|g| g.flatten_all())
                .collect::<candle_core::Result<_>>()?;
            let summed = comm.all_reduce_sum_tensor(&Tensor::cat(&flat, 0)?)?;
            let mut at = 0;
            for g in grads.iter_mut().flatten() {
                let n = g.elem_count();
                *g = summed.narrow(0, at, n)?.reshape(g.shape())?;
                at += n;
            }
        }
        let norm = device_norm(grads)?;
        let apply = loss_finite && norm.is_finite();
        if !apply {
            return Ok((norm, false));
        }
        let coef = max_norm / (norm + 1e-6);
        if max_norm > 0.0 && coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
        opt.step_tensors(params, grads, lr)?;
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
            opt.moments[i] = if p.trainable {
                Moments::Host {
                    m: m[a..b].to_vec(),
                    v: v[a..b].to_vec(),
                }
            } else {
                Moments::Empty
            };
        }
        opt.t = z.shard.t;
        Ok(())
    }

    /// After a checkpoint: drops the gathered copies again (ZeRO-1 keeps only its shard).
    pub fn release_state(&self, opt: &mut AdamW) {
        if self.zero.is_some() {
            opt.moments.fill(Moments::Empty);
        }
    }
}
