//! Mixed precision (`dtype = "bf16" | "fp16"`, ADR 014): the model computes in the
//! narrow type while its weights, gradients and AdamW state stay f32; fp16 adds
//! dynamic loss scaling, PyTorch's `GradScaler` to the letter.

use anyhow::{bail, Result};
use candle_core::DType;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// The type matmuls and activations run in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    #[default]
    F32,
    Bf16,
    Fp16,
}

impl Precision {
    pub fn compute_dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
            Precision::Fp16 => DType::F16,
        }
    }

    /// fp16's range is too narrow for small gradients: only it scales the loss.
    pub fn needs_loss_scaling(self) -> bool {
        self == Precision::Fp16
    }
}

impl FromStr for Precision {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" | "fp32" | "float32" => Precision::F32,
            "bf16" | "bfloat16" => Precision::Bf16,
            "fp16" | "f16" | "float16" => Precision::Fp16,
            other => bail!("dtype {other:?}: expected f32, bf16 or fp16"),
        })
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        })
    }
}

serde_as_string!(Precision);

/// Dynamic loss scaling: the loss is multiplied by `scale` before backward and the
/// gradients divided by it after. A step whose gradients overflow is skipped and
/// halves the scale; `GROWTH_INTERVAL` good steps in a row double it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScaler {
    pub scale: f64,
    /// Good steps since the scale last changed.
    pub good_steps: usize,
}

impl LossScaler {
    /// PyTorch's defaults: init_scale 2^16, growth and backoff ×2, interval 2000.
    pub const INITIAL: f64 = 65536.0;
    pub const GROWTH_INTERVAL: usize = 2000;

    pub fn new() -> Self {
        LossScaler {
            scale: Self::INITIAL,
            good_steps: 0,
        }
    }

    /// After a step: `overflowed` when its gradients were not finite.
    pub fn update(&mut self, overflowed: bool) {
        if overflowed {
            self.scale /= 2.0;
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        }
    }
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_ones_are_refused() {
        for (name, p, dtype) in [
            ("f32", Precision::F32, DType::F32),
            ("bf16", Precision::Bf16, DType::BF16),
            ("fp16", Precision::Fp16, DType::F16),
        ] {
            let parsed: Precision = name.parse().unwrap();
            assert_eq!(parsed, p);
            assert_eq!(parsed.to_string(), name);
            assert_eq!(parsed.compute_dtype(), dtype);
        }
        assert_eq!("bfloat16".parse::<Precision>().unwrap(), Precision::Bf16);
        let e = "int8".parse::<Precision>().unwrap_err().to_string();
        assert!(e.contains("expected f32, bf16 or fp16"), "{e}");
        assert!(Precision::Fp16.needs_loss_scaling() && !Precision::Bf16.needs_loss_scaling());
    }

    #[test]
    fn scale_halves_on_overflow_and_doubles_after_the_growth_interval() {
        let mut s = LossScaler::new();
        s.update(true);
        assert_eq!(s.scale, 32768.0);
        for _ in 0..LossScaler::GROWTH_INTERVAL - 1 {
            s.update(false);
        }
        assert_eq!((s.scale, s.good_steps), (32768.0, 1999));
        // An overflow restarts the count.
        s.update(true);
        assert_eq!((s.scale, s.good_steps), (16384.0, 0));
        for _ in 0..LossScaler::GROWTH_INTERVAL {
            s.update(false);
        }
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
    }
}
