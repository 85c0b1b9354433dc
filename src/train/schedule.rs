//! Learning rate: linear warmup, then cosine decay to `min_lr` at `max_steps`
//! (nanoGPT's `get_lr`, with `lr_decay_iters = max_steps`).

use std::f64::consts::PI;

/// Learning rate for the update at 0-based `step`.
pub fn lr_at(step: usize, lr: f64, min_lr: f64, warmup_steps: usize, max_steps: usize) -> f64 {
    if step < warmup_steps {
        return lr * (step + 1) as f64 / (warmup_steps + 1) as f64;
    }
    if step >= max_steps || max_steps <= warmup_steps {
        return min_lr;
    }
    let ratio = (step - warmup_steps) as f64 / (max_steps - warmup_steps) as f64;
    let coeff = 0.5 * (1.0 + (PI * ratio).cos());
    min_lr + coeff * (lr - min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_at_chosen_steps() {
        let f = |s| lr_at(s, 1e-3, 1e-4, 100, 2000);
        assert!((f(0) - 1e-3 / 101.0).abs() < 1e-15);
        assert!((f(99) - 1e-3 * 100.0 / 101.0).abs() < 1e-15);
        assert!((f(100) - 1e-3).abs() < 1e-15);
        // Halfway through the decay the cosine is at zero: the mean of lr and min_lr.
        assert!((f(1050) - 5.5e-4).abs() < 1e-15);
        assert!(
            (f(1999) - (1e-4 + 0.5 * (1.0 + (PI * 1899.0 / 1900.0).cos()) * 9e-4)).abs() < 1e-15
        );
        assert_eq!(f(2000), 1e-4);
        assert_eq!(f(5000), 1e-4);
    }
}
