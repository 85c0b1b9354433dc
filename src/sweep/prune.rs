//! Early termination: asynchronous successive halving (ASHA, Li et al. 2020) and median
//! pruning, as Optuna's `SuccessiveHalvingPruner` and `MedianPruner` decide. A trial
//! runs to a rung, stops (its checkpoint makes the stop invisible: resume is exact),
//! and is either promoted to the next rung or pruned.

use super::Goal;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pruner {
    None,
    /// Rungs at min_resource · reduction_factorᵏ steps; a trial continues past a rung
    /// when it is in the best 1/reduction_factor of the trials that reached it.
    Asha {
        min_resource: usize,
        reduction_factor: usize,
    },
    /// Checks every `min_resource` steps; a trial stops when its best value so far is
    /// worse than the median of finished trials at that step (after `startup_trials`
    /// have finished).
    Median {
        min_resource: usize,
        startup_trials: usize,
    },
}

impl Pruner {
    /// The steps, below `max_steps`, at which a trial is judged.
    pub fn rungs(&self, max_steps: usize) -> Vec<usize> {
        let mut rungs = Vec::new();
        match *self {
            Pruner::None => {}
            Pruner::Asha {
                min_resource,
                reduction_factor,
            } => {
                let mut r = min_resource;
                while r < max_steps {
                    rungs.push(r);
                    r = r.saturating_mul(reduction_factor);
                }
            }
            Pruner::Median { min_resource, .. } => rungs.extend(
                (1..)
                    .map(|k| k * min_resource)
                    .take_while(|&r| r < max_steps),
            ),
        }
        rungs
    }
}

/// ASHA's rule at one rung: `value` (already counted in `competing`, the values of every
/// trial that reached this rung) is promoted when it ranks within the top
/// ⌊n / reduction_factor⌋. While fewer than reduction_factor trials have reached the
/// rung, only the best so far continues (trials are never resumed later, so waiting for
/// more competitors is not an option).
pub fn asha_promotes(value: f64, competing: &[f64], reduction_factor: usize, goal: Goal) -> bool {
    let mut signed: Vec<f64> = competing.iter().map(|&v| goal.signed(v)).collect();
    signed.sort_by(f64::total_cmp);
    let keep = (competing.len() / reduction_factor).max(1);
    goal.signed(value) <= signed[keep - 1]
}

/// The median rule: continue unless the trial's best so far is worse than the median of
/// the finished trials' values at this step. `None` while there are too few to judge.
pub fn median_continues(best_so_far: f64, finished_at_step: &[f64], goal: Goal) -> bool {
    if finished_at_step.is_empty() {
        return true;
    }
    let mut v: Vec<f64> = finished_at_step.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    };
    goal.signed(best_so_far) <= goal.signed(median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rungs_grow_geometrically_below_the_budget() {
        let asha = Pruner::Asha {
            min_resource: 50,
            reduction_factor: 4,
        };
        assert_eq!(asha.rungs(1000), vec![50, 200, 800]);
        assert_eq!(asha.rungs(800), vec![50, 200]);
        let median = Pruner::Median {
            min_resource: 250,
            startup_trials: 5,
        };
        assert_eq!(median.rungs(1000), vec![250, 500, 750]);
        assert!(Pruner::None.rungs(1000).is_empty());
    }

    #[test]
    fn asha_keeps_the_top_fraction() {
        let goal = Goal::Minimize;
        // First arrivals: only a new best continues.
        assert!(asha_promotes(2.0, &[2.0], 4, goal));
        assert!(!asha_promotes(2.5, &[2.0, 2.5], 4, goal));
        assert!(asha_promotes(1.9, &[2.0, 2.5, 1.9], 4, goal));
        // Eight at the rung: the best two continue.
        let eight = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7];
        assert!(asha_promotes(1.1, &eight, 4, goal));
        assert!(!asha_promotes(1.2, &eight, 4, goal));
        // Maximising flips the order.
        assert!(asha_promotes(1.7, &eight, 4, Goal::Maximize));
        assert!(!asha_promotes(1.5, &eight, 4, Goal::Maximize));
    }

    #[test]
    fn median_stops_the_worse_half() {
        assert!(median_continues(1.0, &[], Goal::Minimize));
        assert!(median_continues(1.5, &[1.0, 2.0], Goal::Minimize));
        assert!(!median_continues(1.6, &[1.0, 1.5, 2.0], Goal::Minimize));
        assert!(median_continues(1.6, &[1.0, 1.5, 2.0], Goal::Maximize));
    }
}
