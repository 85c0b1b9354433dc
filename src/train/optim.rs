//! AdamW over flat f32 buffers, PyTorch's arithmetic to the letter, and global-norm
//! gradient clipping. Weight decay applies only to weights with two or more
//! dimensions. On the CPU the state is plain vectors updated in place; on a GPU it is
//! tensors beside the weights, updated by the same arithmetic in tensor operations.

use crate::model::Param;
use anyhow::{ensure, Result};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Tensor};
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
    /// One slot per parameter, in the model's parameter order.
    pub moments: Vec<Moments>,
}

/// AdamW's first and second moments of one weight, kept where the weight is.
#[derive(Clone)]
pub enum Moments {
    /// A frozen weight, or (ZeRO-1) one whose state another rank's shard holds.
    Empty,
    /// Plain vectors, updated in place by [`AdamW::step`] (a CPU model).
    Host { m: Vec<f32>, v: Vec<f32> },
    /// f32 tensors on the weight's device, updated by [`AdamW::step_tensors`].
    Device { m: Tensor, v: Tensor },
}

impl Moments {
    /// Zeros for `p` on its device (host vectors on the CPU); empty when it is frozen.
    fn zeros(p: &Param) -> Result<Self> {
        let t = p.tensor();
        Ok(match (p.trainable, t.device().is_cpu()) {
            (false, _) => Moments::Empty,
            (true, true) => Moments::Host {
                m: vec![0.0; t.elem_count()],
                v: vec![0.0; t.elem_count()],
            },
            (true, false) => {
                let z = Tensor::zeros(t.shape(), DType::F32, t.device())?;
                Moments::Device { m: z.clone(), v: z }
            }
        })
    }

    /// Moments read from a checkpoint, placed beside `p`.
    pub fn from_host(p: &Param, m: Vec<f32>, v: Vec<f32>) -> Result<Self> {
        let t = p.tensor();
        if t.device().is_cpu() {
            return Ok(Moments::Host { m, v });
        }
        let place = |x: Vec<f32>| Tensor::from_vec(x, t.shape(), t.device());
        Ok(Moments::Device {
            m: place(m)?,
            v: place(v)?,
        })
    }

    /// The moments as host vectors (copied from a device), `None` when empty.
    pub fn to_host(&self) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        let host = |x: &Tensor| x.flatten_all()?.to_vec1::<f32>();
        Ok(match self {
            Moments::Empty => None,
            Moments::Host { m, v } => Some((m.clone(), v.clone())),
            Moments::Device { m, v } => Some((host(m)?, host(v)?)),
        })
    }

    /// Floats held (both moments).
    pub fn len(&self) -> usize {
        match self {
            Moments::Empty => 0,
            Moments::Host { m, v } => m.len() + v.len(),
            Moments::Device { m, v } => m.elem_count() + v.elem_count(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl AdamW {
    /// Zero state for `params`, beside each weight (only the trainable ones get any).
    pub fn new(config: AdamWConfig, params: &[&Param]) -> Result<Self> {
        Ok(AdamW {
            config,
            t: 0,
            moments: params
                .iter()
                .map(|p| Moments::zeros(p))
                .collect::<Result<_>>()?,
        })
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `params[i]`. Every
    /// trainable weight is updated in place in its own storage, all of them in one
    /// parallel pass (no copies of the weights out and back). The CPU fast path:
    /// needs host moments.
    pub fn step(&mut self, params: &[&Param], grads: &[Vec<f32>], lr: f64) -> Result<()> {
        ensure!(
            params.len() == grads.len() && params.len() == self.moments.len(),
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
            .zip(self.moments.par_iter_mut())
            .filter(|((p, _), _)| p.trainable)
            .try_for_each(|((p, g), moments)| {
                let Moments::Host { m, v } = moments else {
                    anyhow::bail!("{}: AdamW::step needs host moments", p.name)
                };
                p.tensor().inplace_op1(&InPlaceUpdate {
                    k,
                    g,
                    moments: Mutex::new((m, v)),
                    decays: p.decays(),
                })?;
                Ok(())
            })?;
        Ok(())
    }

    /// The same update in tensor operations, on whatever device the weights are (the
    /// GPU path, and the reference the fast path is tested against). `grads[i]` is
    /// `params[i]`'s f32 gradient (`None` for a frozen weight); needs device moments.
    pub fn step_tensors(
        &mut self,
        params: &[&Param],
        grads: &[Option<Tensor>],
        lr: f64,
    ) -> Result<()> {
        ensure!(
            params.len() == grads.len() && params.len() == self.moments.len(),
            "optimizer state out of sync with the model"
        );
        self.t += 1;
        let k = Coefficients::new(&self.config, self.t, lr);
        for ((p, g), moments) in params.iter().zip(grads).zip(self.moments.iter_mut()) {
            if !p.trainable {
                continue;
            }
            let (Moments::Device { m, v }, Some(g)) = (&mut *moments, g) else {
                anyhow::bail!(
                    "{}: AdamW::step_tensors needs device moments and a gradient",
                    p.name
                )
            };
            let w = p.tensor().detach();
            let decay = if p.decays() { k.decay as f64 } else { 1.0 };
            let (b1, b2) = (k.b1 as f64, k.b2 as f64);
            // PyTorch's order: m += (1 - β1)(g - m); v = β2 v + (1 - β2) g²;
            // w = w·decay - step · m / (√v / √(1 - β2ᵗ) + ε).
            *m = (&*m + ((g - &*m)? * (1.0 - b1))?)?;
            *v = ((&*v * b2)? + (g.sqr()? * (1.0 - b2))?)?;
            let denom = ((v.sqrt()? / k.bias2_sqrt as f64)? + k.eps as f64)?;
            let next = ((&w * decay)? - ((&*m / denom)? * k.step_size as f64)?)?;
            p.var.set(&next)?;
        }
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
        let mut opt = AdamW::new(cfg, &params).unwrap();
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

    /// The tensor path (what a GPU runs) against the in-place CPU path: three steps
    /// with different gradients, weights and moments equal to float rounding.
    #[test]
    fn tensor_path_matches_the_in_place_path() {
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let make = || {
            [
                param(
                    "w",
                    (0..12).map(|i| (i as f32 - 5.5) * 0.1).collect(),
                    &[3, 4],
                ),
                param("b", vec![0.5, -0.25, 0.125], &[3]),
            ]
        };
        let (fast, reference) = (make(), make());
        let fast_params: Vec<&Param> = fast.iter().collect();
        let ref_params: Vec<&Param> = reference.iter().collect();
        let mut fast_opt = AdamW::new(cfg, &fast_params).unwrap();
        let mut ref_opt = AdamW::new(cfg, &ref_params).unwrap();
        // The reference keeps its moments as tensors, as on a GPU.
        ref_opt.moments = ref_params
            .iter()
            .map(|p| {
                let z = Tensor::zeros(p.tensor().shape(), DType::F32, &Device::Cpu).unwrap();
                Moments::Device { m: z.clone(), v: z }
            })
            .collect();
        for step in 0..3 {
            let grads: Vec<Vec<f32>> = fast_params
                .iter()
                .map(|p| {
                    (0..p.tensor().elem_count())
                        .map(|i| ((i * 7 + step * 3) % 11) as f32 * 0.05 - 0.2)
                        .collect()
                })
                .collect();
            let tensors: Vec<Option<Tensor>> = grads
                .iter()
                .zip(&ref_params)
                .map(|(g, p)| {
                    Some(Tensor::from_slice(g, p.tensor().shape(), &Device::Cpu).unwrap())
                })
                .collect();
            fast_opt.step(&fast_params, &grads, 1e-2).unwrap();
            ref_opt.step_tensors(&ref_params, &tensors, 1e-2).unwrap();
        }
        for (i, (a, b)) in fast_params.iter().zip(&ref_params).enumerate() {
            let a = a.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = b.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (ma, va) = fast_opt.moments[i].to_host().unwrap().unwrap();
            let (mb, vb) = ref_opt.moments[i].to_host().unwrap().unwrap();
            for (x, y) in a
                .iter()
                .zip(&b)
                .chain(ma.iter().zip(&mb))
                .chain(va.iter().zip(&vb))
            {
                assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-3), "{x} vs {y}");
            }
        }
        assert_eq!(ref_opt.t, 3);
        // Each path refuses the other's state.
        let g = vec![vec![0.0; 12], vec![0.0; 3]];
        assert!(ref_opt.step(&ref_params, &g, 1e-2).is_err());
        assert!(fast_opt
            .step_tensors(&fast_params, &[None, None], 1e-2)
            .is_err());
    }
}
