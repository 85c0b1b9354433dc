//! AdamW over flat f32 buffers, PyTorch's arithmetic to the letter, and global-norm
//! gradient clipping. Weight decay applies only to weights with two or more
//! dimensions. State is plain vectors, so checkpoints store it as it is.

use crate::model::Param;
use anyhow::{ensure, Result};
use candle_core::{CpuStorage, InplaceOp1, Layout};
use rayon::prelude::*;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub config: AdamWConfig,
    /// Updates taken so far (PyTorch's `step`, used for bias correction).
    pub t: u64,
    pub m: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

impl AdamW {
    /// State for `params` (only the trainable ones are updated; others get empty slots).
    pub fn new(config: AdamWConfig, params: &[&Param]) -> Self {
        let zeros = |p: &&Param| {
            if p.trainable {
                vec![0.0; p.tensor().elem_count()]
            } else {
                Vec::new()
            }
        };
        AdamW {
            config,
            t: 0,
            m: params.iter().map(zeros).collect(),
            v: params.iter().map(zeros).collect(),
        }
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `params[i]`. Every
    /// trainable weight is updated in place in its own storage, all of them in one
    /// parallel pass (no copies of the weights out and back).
    pub fn step(&mut self, params: &[&Param], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        ensure!(
            params.len() == grads.len() && params.len() == self.m.len(),
            "optimizer state out of sync with the model"
        );
        for (p, g) in params.iter().zip(grads).filter(|(p, _)| p.trainable) {
            ensure!(
                g.len() == p.tensor().elem_count(),
                "{}: gradient has {} values, weight {}",
                p.name,
                g.len(),
                p.tensor().elem_count()
            );
        }
        self.t += 1;
        let k = Coefficients::new(&self.config, self.t, lr);
        params
            .par_iter()
            .zip(grads.par_iter())
            .zip(self.m.par_iter_mut().zip(self.v.par_iter_mut()))
            .filter(|((p, _), _)| p.trainable)
            .try_for_each(|((p, g), (m, v))| {
                p.tensor().inplace_op1(&InPlaceUpdate {
                    k,
                    g,
                    moments: Mutex::new((m, v)),
                    decays: p.decays(),
                })
            })?;
        Ok(())
    }
}

/// AdamW applied to a weight's storage where it lies.
struct InPlaceUpdate<'a> {
    k: Coefficients,
    g: &'a [f32],
    moments: Mutex<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
    decays: bool,
}

impl InplaceOp1 for InPlaceUpdate<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> candle_core::Result<()> {
        let (CpuStorage::F32(data), Some((start, end))) = (storage, layout.contiguous_offsets())
        else {
            candle_core::bail!("adamw: weights must be contiguous f32")
        };
        let mut moments = self.moments.lock().unwrap_or_else(|e| e.into_inner());
        let (m, v) = &mut *moments;
        self.k
            .update(&mut data[start..end], self.g, m, v, self.decays);
        Ok(())
    }
}

/// The scalars of one AdamW step (bias corrections folded in, PyTorch's order).
#[derive(Clone, Copy)]
pub struct Coefficients {
    b1: f32,
    b2: f32,
    eps: f32,
    step_size: f32,
    bias2_sqrt: f32,
    decay: f32,
}

impl Coefficients {
    pub fn new(c: &AdamWConfig, t: u64, lr: f64) -> Self {
        let bias1 = 1.0 - c.beta1.powi(t as i32);
        let bias2_sqrt = (1.0 - c.beta2.powi(t as i32)).sqrt();
        Coefficients {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            eps: c.eps as f32,
            step_size: (lr / bias1) as f32,
            bias2_sqrt: bias2_sqrt as f32,
            decay: 1.0 - lr as f32 * c.weight_decay as f32,
        }
    }

    /// Updates weights `w` and moments `m`, `v` from gradients `g`, element by element.
    pub fn update(&self, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decays: bool) {
        let k = *self;
        let decay = if decays { k.decay } else { 1.0 };
        w.par_iter_mut()
            .zip(m.par_iter_mut())
            .zip(v.par_iter_mut())
            .zip(g.par_iter())
            .with_min_len(4096)
            .for_each(|(((w, m), v), &g)| {
                *w *= decay;
                *m += (1.0 - k.b1) * (g - *m);
                *v = *v * k.b2 + (1.0 - k.b2) * g * g;
                let denom = v.sqrt() / k.bias2_sqrt + k.eps;
                *w -= k.step_size * *m / denom;
            });
    }
}

/// ZeRO-1: this rank's slice `[start, start + len)` of the flattened trainable
/// weights, with AdamW moments for that slice only.
pub struct ShardedAdamW {
    pub config: AdamWConfig,
    pub t: u64,
    pub start: usize,
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl ShardedAdamW {
    /// Takes this rank's slice of a full optimizer state (`flat_m`, `flat_v` are the
    /// trainable moments concatenated, padded to the shard grid).
    pub fn from_full(
        config: AdamWConfig,
        t: u64,
        start: usize,
        len: usize,
        flat_m: &[f32],
        flat_v: &[f32],
    ) -> Self {
        ShardedAdamW {
            config,
            t,
            start,
            m: flat_m[start..start + len].to_vec(),
            v: flat_v[start..start + len].to_vec(),
        }
    }

    /// Updates `w` (this shard of the flat weights) from `g` (its gradient shard).
    /// `segments` are the flat ranges of each trainable tensor and whether it decays.
    pub fn step(&mut self, w: &mut [f32], g: &[f32], segments: &[(usize, usize, bool)], lr: f64) {
        self.t += 1;
        let k = Coefficients::new(&self.config, self.t, lr);
        let (lo, hi) = (self.start, self.start + w.len());
        for &(s, e, decays) in segments {
            let (a, b) = (s.max(lo), e.min(hi));
            if a < b {
                let r = a - lo..b - lo;
                k.update(
                    &mut w[r.clone()],
                    &g[r.clone()],
                    &mut self.m[r.clone()],
                    &mut self.v[r],
                    decays,
                );
            }
        }
    }
}

/// The gradients' global L2 norm, accumulated in f64: each buffer's sum of squares
/// in parallel, then those added in order, so the result does not depend on how
/// rayon splits the work (its parallel `sum` adds partials in whatever order the
/// threads finish, which moved the last bit of the norm between identical runs).
pub fn global_norm(grads: &[Vec<f32>]) -> f64 {
    let squares: Vec<f64> = grads
        .par_iter()
        .map(|g| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
        .collect();
    squares.iter().sum::<f64>().sqrt()
}

/// Scales gradients so their global norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`, same 1e-6 guard); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Vec<f32>], max_norm: f64) -> f64 {
    let norm = global_norm(grads);
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            let coef = coef as f32;
            grads
                .par_iter_mut()
                .for_each(|g| g.iter_mut().for_each(|x| *x *= coef));
        }
    }
    norm
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    fn param(name: &str, data: Vec<f32>, shape: &[usize]) -> Param {
        let t = Tensor::from_vec(data, shape, &Device::Cpu).unwrap();
        Param {
            name: name.into(),
            var: Var::from_tensor(&t).unwrap(),
            trainable: true,
        }
    }

    #[test]
    fn two_steps_match_hand_computation() {
        let w = param("w", vec![1.0, -2.0], &[1, 2]);
        let b = param("b", vec![0.5], &[1]);
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let params = [&w, &b];
        let mut opt = AdamW::new(cfg, &params);
        let lr = 0.01f64;
        let grads = [vec![0.3, -0.4], vec![2.0]];
        opt.step(&params, &grads, lr).unwrap();
        opt.step(&params, &grads, lr).unwrap();
        // Recomputed in f64 from the AdamW paper's update (decoupled decay on w only).
        let reference = |mut x: f64, g: f64, decay: bool| {
            let (mut m, mut v) = (0.0, 0.0);
            for t in 1..=2 {
                if decay {
                    x *= 1.0 - lr * 0.1;
                }
                m = 0.9 * m + 0.1 * g;
                v = 0.95 * v + 0.05 * g * g;
                let mhat = m / (1.0 - 0.9f64.powi(t));
                let vhat = v / (1.0 - 0.95f64.powi(t));
                x -= lr * mhat / (vhat.sqrt() + 1e-8);
            }
            x
        };
        let got_w = w.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let got_b = b.tensor().to_vec1::<f32>().unwrap();
        assert!((got_w[0] as f64 - reference(1.0, 0.3, true)).abs() < 1e-6);
        assert!((got_w[1] as f64 - reference(-2.0, -0.4, true)).abs() < 1e-6);
        assert!((got_b[0] as f64 - reference(0.5, 2.0, false)).abs() < 1e-6);
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![vec![3.0f32], vec![4.0]];
        assert!((clip_grad_norm(&mut g, 1.0) - 5.0).abs() < 1e-9);
        assert!((global_norm(&g) - 1.0).abs() < 1e-6);
        let mut small = vec![vec![0.3f32, 0.4]];
        clip_grad_norm(&mut small, 1.0);
        assert_eq!(small, vec![vec![0.3f32, 0.4]]);
    }
}
