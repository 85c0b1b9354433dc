//! What a sweep searches over: one domain per train key, W&B's sweep-file shape.

use anyhow::{bail, Result};
use rand::Rng;
use serde_json::Value;
use std::collections::BTreeMap;

/// One trial's choice: a value for each swept key.
pub type Params = BTreeMap<String, Value>;

/// A swept key's domain.
#[derive(Debug, Clone, PartialEq)]
pub enum Domain {
    /// A list of choices, searched as categories.
    Values(Vec<Value>),
    /// [lo, hi], uniform or (`log`) log-uniform; whole numbers when `int`.
    Range {
        lo: f64,
        hi: f64,
        log: bool,
        int: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Parameter {
    pub name: String,
    pub domain: Domain,
}

impl Domain {
    /// A draw from the whole domain (Optuna's RandomSampler: log-uniform in log space,
    /// whole numbers from the widened interval [lo − ½, hi + ½] then rounded).
    pub fn sample_uniform(&self, rng: &mut impl Rng) -> Value {
        match self {
            Domain::Values(choices) => choices[rng.random_range(0..choices.len())].clone(),
            &Domain::Range { lo, hi, log, int } => {
                let half = if int { 0.5 } else { 0.0 };
                let x = if log {
                    rng.random_range((lo - half).ln()..=(hi + half).ln()).exp()
                } else {
                    rng.random_range(lo - half..=hi + half)
                };
                self.from_internal(x)
            }
        }
    }

    /// The search's coordinate of a value: the index of a choice, or the number itself.
    pub fn to_internal(&self, value: &Value) -> Option<f64> {
        match self {
            Domain::Values(choices) => choices.iter().position(|c| c == value).map(|i| i as f64),
            Domain::Range { .. } => value.as_f64(),
        }
    }

    /// The value at a coordinate (rounded and clamped for whole numbers).
    pub fn from_internal(&self, x: f64) -> Value {
        match self {
            Domain::Values(choices) => {
                choices[(x.round().max(0.0) as usize).min(choices.len() - 1)].clone()
            }
            &Domain::Range { lo, hi, int, .. } => {
                if int {
                    Value::from(x.round().clamp(lo, hi) as i64)
                } else {
                    Value::from(x.clamp(lo, hi))
                }
            }
        }
    }
}

/// `key=value` for `train --set`.
pub fn assignment(key: &str, value: &Value) -> String {
    match value {
        Value::String(s) => format!("{key}={s}"),
        other => format!("{key}={other}"),
    }
}

/// Reads one `[parameters]` entry: `values`, `value`, or `min`/`max` with an optional
/// `distribution` (uniform, int_uniform, log_uniform_values, categorical, constant).
pub fn parse_parameter(name: &str, spec: &toml::Value) -> Result<Parameter> {
    let table = match spec {
        toml::Value::Table(t) => t,
        _ => bail!("parameters.{name}: expected a table such as {{values = [...]}} or {{min = .., max = ..}}"),
    };
    for key in table.keys() {
        if !["values", "value", "min", "max", "distribution"].contains(&key.as_str()) {
            bail!("parameters.{name}.{key}: unknown field (values, value, min, max, distribution)");
        }
    }
    let json = |v: &toml::Value| -> Result<Value> {
        match v {
            toml::Value::Float(f) if !f.is_finite() => {
                bail!("parameters.{name}: {f} is not a finite number")
            }
            toml::Value::Table(_) | toml::Value::Array(_) | toml::Value::Datetime(_) => {
                bail!("parameters.{name}: {v} is not a number, string or boolean")
            }
            _ => Ok(serde_json::to_value(v)?),
        }
    };
    let distribution = table
        .get("distribution")
        .map(|d| d.as_str().unwrap_or(""))
        .unwrap_or("");
    let domain = match (
        table.get("values"),
        table.get("value"),
        table.get("min"),
        table.get("max"),
    ) {
        (Some(values), None, None, None) => {
            let values = values.as_array().map(Vec::as_slice).unwrap_or_default();
            if values.is_empty() {
                bail!("parameters.{name}: empty search space (values = [])");
            }
            Domain::Values(values.iter().map(json).collect::<Result<_>>()?)
        }
        (None, Some(value), None, None) => Domain::Values(vec![json(value)?]),
        (None, None, Some(min), Some(max)) => {
            let int = matches!(
                (min, max),
                (toml::Value::Integer(_), toml::Value::Integer(_))
            );
            let number = |v: &toml::Value| match v {
                toml::Value::Integer(i) => Ok(*i as f64),
                toml::Value::Float(f) if f.is_finite() => Ok(*f),
                _ => bail!("parameters.{name}: min and max must be numbers"),
            };
            let (lo, hi) = (number(min)?, number(max)?);
            if lo > hi {
                bail!("parameters.{name}: empty search space (min {lo} > max {hi})");
            }
            let log = match distribution {
                "" | "uniform" | "int_uniform" => false,
                "log_uniform_values" => true,
                other => bail!("parameters.{name}: distribution {other:?} is not one of uniform, int_uniform, log_uniform_values, categorical, constant"),
            };
            if distribution == "int_uniform" && !int {
                bail!("parameters.{name}: int_uniform needs integer min and max");
            }
            if log && lo <= 0.0 {
                bail!("parameters.{name}: log_uniform_values needs min > 0 (got {lo})");
            }
            Domain::Range { lo, hi, log, int }
        }
        _ => bail!("parameters.{name}: give either values = [...], value = ..., or min and max"),
    };
    if matches!(domain, Domain::Values(_))
        && !["", "categorical", "constant"].contains(&distribution)
    {
        bail!("parameters.{name}: distribution {distribution:?} needs min and max, not values");
    }
    Ok(Parameter {
        name: name.to_string(),
        domain,
    })
}

/// The `index`-th point of the grid over `parameters` (the last key varies fastest),
/// or `None` past its end; every domain must be a list of values.
pub fn grid_point(parameters: &[Parameter], index: usize) -> Option<Params> {
    let mut rest = index;
    let mut point = Params::new();
    for p in parameters.iter().rev() {
        let Domain::Values(choices) = &p.domain else {
            return None;
        };
        point.insert(p.name.clone(), choices[rest % choices.len()].clone());
        rest /= choices.len();
    }
    (rest == 0).then_some(point)
}

/// Points in the grid (saturating).
pub fn grid_size(parameters: &[Parameter]) -> usize {
    parameters
        .iter()
        .map(|p| match &p.domain {
            Domain::Values(v) => v.len(),
            Domain::Range { .. } => 0,
        })
        .fold(1usize, usize::saturating_mul)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn param(text: &str) -> Result<Parameter> {
        let table: toml::Table = toml::from_str(&format!("p = {text}")).unwrap();
        parse_parameter("p", &table["p"])
    }

    #[test]
    fn parses_each_shape_and_refuses_empty_spaces() {
        assert_eq!(
            param("{values = [1, 2]}").unwrap().domain,
            Domain::Values(vec![Value::from(1), Value::from(2)])
        );
        assert_eq!(
            param("{min = 1e-4, max = 1e-2, distribution = \"log_uniform_values\"}")
                .unwrap()
                .domain,
            Domain::Range {
                lo: 1e-4,
                hi: 1e-2,
                log: true,
                int: false
            }
        );
        assert_eq!(
            param("{min = 8, max = 32}").unwrap().domain,
            Domain::Range {
                lo: 8.0,
                hi: 32.0,
                log: false,
                int: true
            }
        );
        for (bad, says) in [
            ("{values = []}", "empty search space"),
            ("{min = 3, max = 2}", "empty search space"),
            (
                "{min = 0.0, max = 1.0, distribution = \"log_uniform_values\"}",
                "min > 0",
            ),
            ("{min = 1}", "either values"),
            ("{values = [1], step = 2}", "unknown field"),
            (
                "{min = 1, max = 2, distribution = \"normal\"}",
                "not one of",
            ),
        ] {
            let e = param(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn uniform_draws_stay_inside_and_cover_the_domain() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let ints = param("{min = 1, max = 4, distribution = \"log_uniform_values\"}").unwrap();
        let mut seen = [0; 5];
        for _ in 0..2000 {
            let v = ints.domain.sample_uniform(&mut rng).as_i64().unwrap();
            seen[v as usize] += 1;
        }
        assert_eq!(seen[0], 0);
        assert!(seen[1..].iter().all(|&n| n > 100), "{seen:?}");
        let floats =
            param("{min = 1e-4, max = 1e-2, distribution = \"log_uniform_values\"}").unwrap();
        let below_1e3 = (0..2000)
            .map(|_| floats.domain.sample_uniform(&mut rng).as_f64().unwrap())
            .inspect(|x| assert!((1e-4..=1e-2).contains(x)))
            .filter(|&x| x < 1e-3)
            .count();
        // Log-uniform: half the mass below the geometric midpoint.
        assert!((900..1100).contains(&below_1e3), "{below_1e3}");
    }

    #[test]
    fn grid_enumerates_every_point_once() {
        let ps = vec![
            Parameter {
                name: "a".into(),
                domain: Domain::Values(vec![1.into(), 2.into()]),
            },
            Parameter {
                name: "b".into(),
                domain: Domain::Values(vec!["x".into(), "y".into(), "z".into()]),
            },
        ];
        assert_eq!(grid_size(&ps), 6);
        let points: Vec<_> = (0..7).map(|i| grid_point(&ps, i)).collect();
        assert!(points[6].is_none());
        let mut pairs: Vec<String> = points[..6]
            .iter()
            .map(|p| format!("{}{}", p.as_ref().unwrap()["a"], p.as_ref().unwrap()["b"]))
            .collect();
        assert_eq!(pairs[0], "1\"x\"");
        assert_eq!(pairs[1], "1\"y\"");
        pairs.sort();
        pairs.dedup();
        assert_eq!(pairs.len(), 6);
    }
}
