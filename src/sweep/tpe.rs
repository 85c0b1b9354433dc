//! The Tree-structured Parzen Estimator (Bergstra et al., 2011) as Optuna's
//! `TPESampler` runs by default: univariate, one kernel per observation plus a prior
//! of weight 1, "magic clip" bandwidths, γ(n) = min(⌈n/10⌉, 25) trials in the good
//! group, 24 candidates drawn from the good density l(x) and the one with the largest
//! log l(x) − log g(x) kept. Random draws until 10 trials have ended.

use super::space::{Domain, Parameter, Params};
use super::Goal;
use rand::Rng;
use std::f64::consts::{PI, SQRT_2};

pub const STARTUP_TRIALS: usize = 10;
pub const CANDIDATES: usize = 24;
const PRIOR_WEIGHT: f64 = 1.0;

/// An ended trial as TPE sees it.
pub struct Observed<'a> {
    pub trial: usize,
    pub params: &'a Params,
    pub value: f64,
    /// The step a pruned trial stopped at (its `value` is the metric there).
    pub pruned_at: Option<usize>,
}

/// The size of the good group among `n` ended trials.
pub fn gamma(n: usize) -> usize {
    n.div_ceil(10).min(25)
}

/// Kernel weights by age, oldest first: equal up to 25, then a ramp from 1/n for the
/// oldest n − 25 (Optuna's `default_weights`).
pub fn age_weights(n: usize) -> Vec<f64> {
    if n < 25 {
        return vec![1.0; n];
    }
    let ramp = n - 25;
    let mut w: Vec<f64> = (0..ramp)
        .map(|i| {
            let start = 1.0 / n as f64;
            if ramp == 1 {
                start
            } else {
                start + (1.0 - start) * i as f64 / (ramp - 1) as f64
            }
        })
        .collect();
    w.extend(std::iter::repeat_n(1.0, 25));
    w
}

/// Splits ended trials into the good group (below) and the rest (above), each in trial
/// order: finished trials by value, then pruned ones by how far they got and their
/// value there.
pub fn split<'a, 'b>(
    observed: &'b [Observed<'a>],
    goal: Goal,
) -> (Vec<&'b Observed<'a>>, Vec<&'b Observed<'a>>) {
    let signed = |o: &Observed| goal.signed(o.value);
    let mut ranked: Vec<&Observed> = observed.iter().collect();
    ranked.sort_by(|a, b| match (a.pruned_at, b.pruned_at) {
        (None, None) => signed(a).total_cmp(&signed(b)),
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (Some(sa), Some(sb)) => sb.cmp(&sa).then(signed(a).total_cmp(&signed(b))),
    });
    let mut above = ranked.split_off(gamma(observed.len()).min(ranked.len()));
    let mut below = ranked;
    below.sort_by_key(|o| o.trial);
    above.sort_by_key(|o| o.trial);
    (below, above)
}

/// A mixture of truncated Gaussians (a number) or of smoothed one-hots (a choice) fitted
/// to observations of one parameter, in the search's coordinates.
#[derive(Debug)]
pub enum Parzen {
    Numeric(Gaussians),
    Categorical {
        weights: Vec<f64>,
        table: Vec<Vec<f64>>,
    },
}

/// Truncated Gaussian kernels over one numeric parameter.
#[derive(Debug)]
pub struct Gaussians {
    weights: Vec<f64>,
    mus: Vec<f64>,
    sigmas: Vec<f64>,
    /// The (log-)interval the kernels live on, widened by half a step for integers.
    low: f64,
    high: f64,
    log: bool,
    /// 1 for integers: the density becomes the mass of [x − ½, x + ½].
    step: Option<f64>,
    range: (f64, f64),
}

fn mixture_weights(n: usize) -> Vec<f64> {
    let mut w = age_weights(n);
    w.push(if n == 0 { 1.0 } else { PRIOR_WEIGHT });
    let total: f64 = w.iter().sum();
    w.iter().map(|x| x / total).collect()
}

impl Parzen {
    pub fn fit(domain: &Domain, observations: &[f64]) -> Parzen {
        let n = observations.len();
        let weights = mixture_weights(n);
        match domain {
            Domain::Values(choices) => {
                let k = choices.len();
                if n == 0 {
                    return Parzen::Categorical {
                        weights,
                        table: vec![vec![1.0 / k as f64; k]],
                    };
                }
                let kernels = n + 1;
                let mut table = vec![vec![PRIOR_WEIGHT / kernels as f64; k]; kernels];
                for (row, &c) in table.iter_mut().zip(observations) {
                    row[c as usize] += 1.0;
                }
                for row in &mut table {
                    let sum: f64 = row.iter().sum();
                    row.iter_mut().for_each(|p| *p /= sum);
                }
                Parzen::Categorical { weights, table }
            }
            &Domain::Range { lo, hi, log, int } => {
                let step = int.then_some(1.0);
                let half = step.unwrap_or(0.0) / 2.0;
                let t = |x: f64| if log { x.ln() } else { x };
                let (low, high) = (t(lo - half), t(hi + half));
                let mus: Vec<f64> = observations.iter().map(|&x| t(x)).collect();
                // Each kernel as wide as the larger gap to its neighbours (the interval's
                // ends included), the outermost ones by their inner gap alone.
                let mut order: Vec<usize> = (0..n).collect();
                order.sort_by(|&a, &b| mus[a].total_cmp(&mus[b]));
                let mut ends = vec![low];
                ends.extend(order.iter().map(|&i| mus[i]));
                ends.push(high);
                let mut sorted: Vec<f64> = (1..=n)
                    .map(|i| (ends[i] - ends[i - 1]).max(ends[i + 1] - ends[i]))
                    .collect();
                if n >= 2 {
                    sorted[0] = ends[2] - ends[1];
                    sorted[n - 1] = ends[n] - ends[n - 1];
                }
                let width = high - low;
                let min_sigma = width / (1.0 + (n + 1) as f64).min(100.0);
                let mut sigmas = vec![0.0; n];
                for (rank, &i) in order.iter().enumerate() {
                    sigmas[i] = sorted[rank].clamp(min_sigma, width);
                }
                let mut mus = mus;
                mus.push(0.5 * (low + high));
                sigmas.push(width);
                Parzen::Numeric(Gaussians {
                    weights,
                    mus,
                    sigmas,
                    low,
                    high,
                    log,
                    step,
                    range: (lo, hi),
                })
            }
        }
    }

    /// One draw, in the search's coordinates (a choice's index, or the number).
    pub fn sample(&self, rng: &mut impl Rng) -> f64 {
        let kernel = |weights: &[f64], rng: &mut dyn rand::RngCore| {
            let u: f64 = rng.random();
            let mut acc = 0.0;
            for (i, w) in weights.iter().enumerate() {
                acc += w;
                if u < acc {
                    return i;
                }
            }
            weights.len() - 1
        };
        match self {
            Parzen::Categorical { weights, table } => {
                let k = kernel(weights, rng);
                kernel(&table[k], rng) as f64
            }
            Parzen::Numeric(g) => {
                let k = kernel(&g.weights, rng);
                let (mu, sigma) = (g.mus[k], g.sigmas[k]);
                // Rejection: the kernel's centre lies inside and its width is at most
                // the interval's, so at least a third of the draws land inside.
                let mut t = mu;
                for _ in 0..1000 {
                    let z: f64 = rng.sample(rand_distr::StandardNormal);
                    let x = mu + sigma * z;
                    if (g.low..=g.high).contains(&x) {
                        t = x;
                        break;
                    }
                }
                let x = if g.log { t.exp() } else { t };
                let (lo, hi) = g.range;
                match g.step {
                    Some(s) => (lo + ((x - lo) / s).round() * s).clamp(lo, hi),
                    None => x.clamp(lo, hi),
                }
            }
        }
    }

    /// The log density (a number) or log probability (a choice, an integer) at `x`.
    pub fn log_pdf(&self, x: f64) -> f64 {
        match self {
            Parzen::Categorical { weights, table } => log_sum_exp(
                weights
                    .iter()
                    .zip(table)
                    .map(|(w, row)| w.ln() + row[x as usize].ln()),
            ),
            Parzen::Numeric(g) => {
                let t = |x: f64| if g.log { x.ln() } else { x };
                log_sum_exp(g.weights.iter().zip(&g.mus).zip(&g.sigmas).map(
                    |((w, &mu), &sigma)| {
                        let z = |v: f64| (v - mu) / sigma;
                        let norm = log_gauss_mass(z(g.low), z(g.high));
                        let density = match g.step {
                            Some(s) => log_gauss_mass(z(t(x - s / 2.0)), z(t(x + s / 2.0))),
                            None => -0.5 * z(t(x)).powi(2) - sigma.ln() - 0.5 * (2.0 * PI).ln(),
                        };
                        w.ln() + density - norm
                    },
                ))
            }
        }
    }
}

fn log_sum_exp(terms: impl Iterator<Item = f64>) -> f64 {
    let terms: Vec<f64> = terms.collect();
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + terms.iter().map(|t| (t - max).exp()).sum::<f64>().ln()
}

/// ln erfc(x), kept finite far in the tail where erfc itself underflows.
fn log_erfc(x: f64) -> f64 {
    if x < 25.0 {
        libm::erfc(x).ln()
    } else {
        let x2 = x * x;
        -x2 - x.ln() - 0.5 * PI.ln() + (1.0 - 0.5 / x2 + 0.75 / (x2 * x2)).ln()
    }
}

/// ln(Φ(b) − Φ(a)) for a ≤ b, accurate in either tail.
pub fn log_gauss_mass(a: f64, b: f64) -> f64 {
    if a > 0.0 {
        // Both in the right tail: Φ(b) − Φ(a) = ½(erfc(a/√2) − erfc(b/√2)).
        let (la, lb) = (log_erfc(a / SQRT_2), log_erfc(b / SQRT_2));
        (-std::f64::consts::LN_2) + la + (-(lb - la).exp()).ln_1p()
    } else if b < 0.0 {
        log_gauss_mass(-b, -a)
    } else {
        (1.0 - 0.5 * libm::erfc(-a / SQRT_2) - 0.5 * libm::erfc(b / SQRT_2)).ln()
    }
}

/// TPE's choice for every parameter (each on its own, as Optuna's univariate default).
pub fn suggest(
    parameters: &[Parameter],
    observed: &[Observed],
    goal: Goal,
    rng: &mut impl Rng,
) -> Params {
    let (below, above) = split(observed, goal);
    let mut params = Params::new();
    for p in parameters {
        let coords = |group: &[&Observed]| -> Vec<f64> {
            group
                .iter()
                .filter_map(|o| o.params.get(&p.name).and_then(|v| p.domain.to_internal(v)))
                .collect()
        };
        let good = Parzen::fit(&p.domain, &coords(&below));
        let bad = Parzen::fit(&p.domain, &coords(&above));
        let mut best = (f64::NEG_INFINITY, None);
        for _ in 0..CANDIDATES {
            let x = good.sample(rng);
            let score = good.log_pdf(x) - bad.log_pdf(x);
            if best.1.is_none() || score > best.0 {
                best = (score, Some(x));
            }
        }
        let x = best.1.expect("at least one candidate");
        params.insert(p.name.clone(), p.domain.from_internal(x));
    }
    params
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use serde_json::Value;

    fn domain(lo: f64, hi: f64, log: bool, int: bool) -> Domain {
        Domain::Range { lo, hi, log, int }
    }

    /// Optuna's own estimator on the same observations (scripts/optuna_parzen_cases.py).
    #[test]
    fn parzen_density_equals_optunas() {
        let fixture: Value =
            serde_json::from_str(include_str!("../../tests/fixtures/sweep/parzen.json")).unwrap();
        for case in fixture["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let spec = toml::Value::try_from(&case["parameter"]).unwrap();
            let domain = super::super::space::parse_parameter("p", &spec)
                .unwrap()
                .domain;
            let floats = |k: &str| -> Vec<f64> {
                case[k]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect()
            };
            let parzen = Parzen::fit(&domain, &floats("observations"));
            for (x, want) in floats("points").into_iter().zip(floats("log_pdf")) {
                let got = parzen.log_pdf(x);
                assert!(
                    (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                    "{name} at {x}: {got} vs optuna {want}"
                );
            }
        }
    }

    #[test]
    fn gamma_and_weights_follow_optuna() {
        assert_eq!(
            (gamma(10), gamma(11), gamma(24), gamma(1000)),
            (1, 2, 3, 25)
        );
        assert_eq!(age_weights(3), vec![1.0; 3]);
        let w = age_weights(30);
        assert_eq!(w.len(), 30);
        assert!((w[0] - 1.0 / 30.0).abs() < 1e-15 && (w[4] - 1.0).abs() < 1e-15);
        assert!(w[1] > w[0] && w[2] > w[1]);
    }

    #[test]
    fn gauss_mass_is_right_in_both_tails() {
        // Φ(1) − Φ(−1) and a far tail where naive differences underflow to 0.
        assert!((log_gauss_mass(-1.0, 1.0) - 0.682_689_492_137_085_9f64.ln()).abs() < 1e-12);
        let far = log_gauss_mass(40.0, 41.0);
        assert!(far.is_finite() && (far - log_gauss_mass(-41.0, -40.0)).abs() < 1e-12);
        // Φ(b) − Φ(a) ≈ φ(a)/a for large a: ln φ(40) − ln 40.
        let approx = -800.0 - 0.5 * (2.0 * PI).ln() - 40f64.ln();
        assert!((far - approx).abs() < 1e-3, "{far} vs {approx}");
    }

    #[test]
    fn densities_integrate_to_one() {
        let obs = [0.2, 0.25, 0.7];
        let p = Parzen::fit(&domain(0.0, 1.0, false, false), &obs);
        let n = 20000;
        let integral: f64 = (0..n)
            .map(|i| p.log_pdf((i as f64 + 0.5) / n as f64).exp() / n as f64)
            .sum();
        assert!((integral - 1.0).abs() < 1e-6, "{integral}");
        let ints = Parzen::fit(&domain(1.0, 9.0, false, true), &[3.0, 3.0, 8.0]);
        let mass: f64 = (1..=9).map(|x| ints.log_pdf(x as f64).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-12, "{mass}");
        let cats = Parzen::fit(&Domain::Values(vec![Value::from(1); 3]), &[0.0, 2.0, 2.0]);
        let mass: f64 = (0..3).map(|c| cats.log_pdf(c as f64).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-12);
    }

    #[test]
    fn samples_follow_the_density() {
        let p = Parzen::fit(&domain(1e-4, 1e-1, true, false), &[1e-3, 2e-3]);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let draws: Vec<f64> = (0..20000).map(|_| p.sample(&mut rng)).collect();
        assert!(draws.iter().all(|x| (1e-4..=1e-1).contains(x)));
        // Share of draws in [5e-4, 5e-3] against the density's integral over ln x there.
        let share = draws.iter().filter(|&&x| (5e-4..5e-3).contains(&x)).count() as f64 / 2e4;
        let (a, b) = (5e-4f64.ln(), 5e-3f64.ln());
        let n = 4000;
        let mass: f64 = (0..n)
            .map(|i| {
                let t = a + (b - a) * (i as f64 + 0.5) / n as f64;
                p.log_pdf(t.exp()).exp() * (b - a) / n as f64
            })
            .sum();
        assert!((share - mass).abs() < 0.015, "{share} vs {mass}");
    }

    #[test]
    fn split_ranks_finished_before_pruned() {
        let params = Params::new();
        let o = |trial, value, pruned_at| Observed {
            trial,
            params: &params,
            value,
            pruned_at,
        };
        let observed: Vec<Observed> = vec![
            o(0, 3.0, None),
            o(1, 1.0, Some(100)),
            o(2, 2.0, None),
            o(3, 0.5, Some(400)),
        ]
        .into_iter()
        .chain((4..15).map(|t| o(t, 5.0 + t as f64, None)))
        .collect();
        // 15 ended: γ = 2, the two best finished trials.
        let (below, above) = split(&observed, Goal::Minimize);
        assert_eq!(
            below.iter().map(|o| o.trial).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(above.len(), 13);
        let (below, _) = split(&observed, Goal::Maximize);
        assert_eq!(
            below.iter().map(|o| o.trial).collect::<Vec<_>>(),
            vec![13, 14]
        );
    }

    /// On a smooth objective TPE's 30th–40th suggestions beat random ones, over seeds.
    #[test]
    fn tpe_beats_random_search_on_a_quadratic() {
        let parameters = vec![
            Parameter {
                name: "x".into(),
                domain: domain(-5.0, 5.0, false, false),
            },
            Parameter {
                name: "lr".into(),
                domain: domain(1e-5, 1e-1, true, false),
            },
            Parameter {
                name: "n".into(),
                domain: domain(1.0, 20.0, false, true),
            },
        ];
        let f = |p: &Params| {
            (p["x"].as_f64().unwrap() - 1.5).powi(2)
                + (p["lr"].as_f64().unwrap().log10() + 3.0).powi(2)
                + 0.05 * (p["n"].as_f64().unwrap() - 7.0).powi(2)
        };
        let best_after = |tpe: bool, seed: u64| {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut history: Vec<(Params, f64)> = Vec::new();
            for trial in 0..40 {
                let params = if tpe && trial >= STARTUP_TRIALS {
                    let observed: Vec<Observed> = history
                        .iter()
                        .enumerate()
                        .map(|(i, (p, v))| Observed {
                            trial: i,
                            params: p,
                            value: *v,
                            pruned_at: None,
                        })
                        .collect();
                    suggest(&parameters, &observed, Goal::Minimize, &mut rng)
                } else {
                    parameters
                        .iter()
                        .map(|p| (p.name.clone(), p.domain.sample_uniform(&mut rng)))
                        .collect()
                };
                let v = f(&params);
                history.push((params, v));
            }
            history.iter().map(|h| h.1).fold(f64::INFINITY, f64::min)
        };
        let wins = (0..10)
            .filter(|&s| best_after(true, s) < best_after(false, s))
            .count();
        assert!(wins >= 8, "TPE beat random on {wins} of 10 seeds");
    }
}
