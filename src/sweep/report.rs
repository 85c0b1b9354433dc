//! What a sweep leaves behind: the trial table (stdout and `sweep.md`), `best.toml`,
//! and PNGs of the metric against trial and against each parameter.

use super::space::{Domain, Params};
use super::{checkpoint_step, trial_dir, End, Sweep, Trial};
use crate::train::metrics::draw_png;
use crate::train::TrainConfig;
use anyhow::Result;
use std::fmt::Write as _;

/// Trials best first: finished by value, then pruned (furthest first, then by value),
/// then failed and unfinished ones, by id.
pub fn ranked<'a>(sweep: &'a Sweep) -> Vec<&'a Trial> {
    let goal = sweep.spec.goal;
    let mut trials: Vec<&Trial> = sweep.trials.iter().collect();
    let class = |t: &Trial| match t.end {
        Some(End::Finished { .. }) => 0,
        Some(End::Pruned { .. }) => 1,
        Some(End::Failed(_)) => 2,
        None => 3,
    };
    trials.sort_by(|a, b| {
        class(a)
            .cmp(&class(b))
            .then_with(|| match (a.result(), b.result()) {
                (Some((va, sa)), Some((vb, sb))) => sb
                    .cmp(&sa)
                    .then(goal.signed(va).total_cmp(&goal.signed(vb))),
                _ => std::cmp::Ordering::Equal,
            })
            .then(a.id.cmp(&b.id))
    });
    trials
}

fn cell(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.4e}")
                .parse::<f64>()
                .map(|r| r.to_string())
                .unwrap_or_else(|_| f.to_string()),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// Rows of the trial table, header first.
fn rows(sweep: &Sweep) -> Vec<Vec<String>> {
    let names: Vec<&str> = sweep
        .spec
        .parameters
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    let mut header = vec!["rank".to_string(), "trial".into(), "status".into()];
    header.push(sweep.spec.metric_key());
    header.push("step".into());
    header.extend(names.iter().map(|n| n.to_string()));
    let mut rows = vec![header];
    for (rank, t) in ranked(sweep).into_iter().enumerate() {
        let (status, metric, step) = match &t.end {
            Some(End::Finished { step, value }) => (
                "finished".to_string(),
                format!("{value:.4}"),
                step.to_string(),
            ),
            Some(End::Pruned { step, value }) => (
                "pruned".to_string(),
                format!("{value:.4}"),
                step.to_string(),
            ),
            Some(End::Failed(e)) => (format!("failed: {e}"), "-".into(), "-".into()),
            None => ("unfinished".into(), "-".into(), "-".into()),
        };
        let mut row = vec![
            (rank + 1).to_string(),
            t.id.to_string(),
            status,
            metric,
            step,
        ];
        row.extend(
            names
                .iter()
                .map(|n| t.params.get(*n).map(cell).unwrap_or_default()),
        );
        rows.push(row);
    }
    rows
}

/// The trial table as aligned text (what `lmforge sweep` prints).
pub fn table(sweep: &Sweep) -> String {
    let rows = rows(sweep);
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| {
            rows.iter()
                .filter(|r| !r[2].starts_with("failed"))
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in &rows {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .enumerate()
            .map(|(c, (v, &w))| {
                if c == 2 && v.starts_with("failed") {
                    v.clone()
                } else {
                    format!("{v:<w$}")
                }
            })
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

/// Mean and sample standard deviation.
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// Summary lines: the search, the compute it used, the best trial and confirmation.
pub fn summary(sweep: &Sweep) -> String {
    let count = |f: fn(&Option<End>) -> bool| sweep.trials.iter().filter(|t| f(&t.end)).count();
    let finished = count(|e| matches!(e, Some(End::Finished { .. })));
    let pruned = count(|e| matches!(e, Some(End::Pruned { .. })));
    let failed = count(|e| matches!(e, Some(End::Failed(_))));
    let (steps, tokens) = compute(sweep);
    let key = sweep.spec.metric_key();
    let mut out = format!(
        "{:?} search, {key} ({}): {} trials — {finished} finished, {pruned} pruned, {failed} failed; compute {steps} steps, {tokens} tokens\n",
        sweep.spec.method,
        sweep.spec.goal.name(),
        sweep.trials.len(),
    )
    .to_lowercase();
    if let Some(best) = sweep.best() {
        let (value, _) = best.result().expect("finished");
        let _ = writeln!(
            out,
            "best: trial {} with {key} {value:.4} (best.toml)",
            best.id
        );
        let seeds = sweep.confirm_seeds();
        let confirmed = |trial: Option<usize>| -> Vec<f64> {
            seeds
                .iter()
                .filter_map(|s| sweep.confirmed.get(&(trial, *s)).copied())
                .collect()
        };
        let (best_runs, base_runs) = (confirmed(Some(best.id)), confirmed(None));
        if !seeds.is_empty() && best_runs.len() == seeds.len() && base_runs.len() == seeds.len() {
            let (bm, bs) = mean_sd(&best_runs);
            let (m, s) = mean_sd(&base_runs);
            let _ = writeln!(
                out,
                "confirmed over seeds {seeds:?}: best config {key} {bm:.4} ± {bs:.4}, base config {m:.4} ± {s:.4} (difference {:+.4})",
                bm - m
            );
        }
    }
    out
}

/// Training steps and tokens (batch × accumulation × block per step) all trials used.
pub fn compute(sweep: &Sweep) -> (usize, usize) {
    let mut steps = 0;
    let mut tokens = 0;
    for t in &sweep.trials {
        let done = checkpoint_step(&trial_dir(&sweep.opts.out, t.id)).unwrap_or(0);
        let per_step = sweep
            .trial_config(&t.params)
            .map(|c| c.batch_size * c.grad_accum * c.block_size)
            .unwrap_or(0);
        steps += done;
        tokens += done * per_step;
    }
    (steps, tokens)
}

/// `best.toml`: the best trial's config as a preset — only the keys that differ from
/// the default preset, and its own run directory.
fn best_preset(sweep: &Sweep, best: &Trial) -> Result<String> {
    let mut cfg = sweep.trial_config(&best.params)?;
    cfg.out_dir = sweep.opts.out.join("best");
    let defaults = toml::Table::try_from(TrainConfig::default())?;
    let mine = toml::Table::try_from(&cfg)?;
    let diff: toml::Table = mine
        .into_iter()
        .filter(|(k, v)| defaults.get(k) != Some(v))
        .collect();
    let (value, _) = best.result().expect("finished");
    Ok(format!(
        "# The best config of the sweep in {} (trial {}, {} {value:.4}).\n# Train it: lmforge train --config best.toml\n{}",
        sweep.opts.out.display(),
        best.id,
        sweep.spec.metric_key(),
        toml::to_string(&diff)?
    ))
}

pub fn write(sweep: &Sweep) -> Result<()> {
    let out = &sweep.opts.out;
    let rows = rows(sweep);
    let mut md = format!("# Sweep {}\n\n", out.display());
    for line in summary(sweep).lines() {
        let _ = writeln!(md, "{line}  ");
    }
    md.push('\n');
    for (i, row) in rows.iter().enumerate() {
        let _ = writeln!(md, "| {} |", row.join(" | "));
        if i == 0 {
            let _ = writeln!(md, "|{}", "---|".repeat(row.len()));
        }
    }
    crate::fsutil::write_atomic(&out.join("sweep.md"), md.as_bytes())?;
    if let Some(best) = sweep.best() {
        crate::fsutil::write_atomic(&out.join("best.toml"), best_preset(sweep, best)?.as_bytes())?;
    }
    plot(sweep)
}

/// An axis label at whole numbers only.
fn whole(x: f64) -> String {
    if (x - x.round()).abs() < 1e-9 {
        format!("{x:.0}")
    } else {
        String::new()
    }
}

/// (x, value, pruned) for each trial with a result.
type Points = Vec<(f64, f64, bool)>;

fn plot(sweep: &Sweep) -> Result<()> {
    let results: Vec<(&Trial, f64, bool)> = sweep
        .trials
        .iter()
        .filter_map(|t| {
            let (v, _) = t.result()?;
            Some((t, v, matches!(t.end, Some(End::Pruned { .. }))))
        })
        .collect();
    if results.is_empty() {
        return Ok(());
    }
    let key = sweep.spec.metric_key();
    let by_trial: Points = results
        .iter()
        .map(|(t, v, p)| (t.id as f64, *v, *p))
        .collect();
    scatter(
        &sweep.opts.out.join("metric-vs-trial.png"),
        &by_trial,
        ("trial", &key),
        &whole,
        Some(sweep.spec.goal),
    )?;
    for p in &sweep.spec.parameters {
        let coord = |params: &Params| -> Option<f64> {
            let x = p.domain.to_internal(params.get(&p.name)?)?;
            Some(match p.domain {
                Domain::Range { log: true, .. } => x.log10(),
                _ => x,
            })
        };
        let points: Points = results
            .iter()
            .filter_map(|(t, v, pruned)| Some((coord(&t.params)?, *v, *pruned)))
            .collect();
        let label = |x: f64| -> String {
            match &p.domain {
                Domain::Values(choices) => {
                    let i = x.round();
                    if (x - i).abs() < 1e-9 && i >= 0.0 && (i as usize) < choices.len() {
                        super::report::cell(&choices[i as usize])
                    } else {
                        String::new()
                    }
                }
                Domain::Range { log: true, .. } => format!("{:.2e}", 10f64.powf(x)),
                Domain::Range { int: true, .. } => whole(x),
                Domain::Range { .. } => format!("{x:.3}"),
            }
        };
        scatter(
            &sweep.opts.out.join(format!("metric-vs-{}.png", p.name)),
            &points,
            (&p.name, &key),
            &label,
            None,
        )?;
    }
    Ok(())
}

/// Finished trials as blue dots, pruned ones as grey crosses; with `best_line`, the
/// best value so far as a red step line.
fn scatter(
    path: &std::path::Path,
    points: &Points,
    (x_desc, y_desc): (&str, &str),
    x_label: &dyn Fn(f64) -> String,
    best_line: Option<super::Goal>,
) -> Result<()> {
    use plotters::prelude::*;
    let (mut x0, mut x1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = points
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    let pad = |lo: &mut f64, hi: &mut f64| {
        let span = (*hi - *lo).max(1e-9 * lo.abs().max(1.0));
        *lo -= 0.05 * span;
        *hi += 0.05 * span;
    };
    if (x1 - x0).abs() < 1e-12 {
        (x0, x1) = (x0 - 0.5, x1 + 0.5);
    }
    pad(&mut x0, &mut x1);
    pad(&mut y0, &mut y1);
    draw_png(path, |root| {
        let mut chart = ChartBuilder::on(root)
            .caption(format!("{y_desc} against {x_desc}"), ("sans-serif", 24))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        chart
            .configure_mesh()
            .x_label_formatter(&|x: &f64| x_label(*x))
            .x_desc(x_desc)
            .y_desc(y_desc)
            .draw()?;
        if let Some(goal) = best_line {
            let mut best = f64::NAN;
            let mut line = Vec::new();
            for &(x, y, pruned) in points {
                if best.is_finite() {
                    line.push((x, best));
                }
                if !pruned && (best.is_nan() || goal.signed(y) < goal.signed(best)) {
                    best = y;
                }
                if best.is_finite() {
                    line.push((x, best));
                }
            }
            chart
                .draw_series(LineSeries::new(line, RED.stroke_width(2)))?
                .label("best so far")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        }
        chart
            .draw_series(
                points
                    .iter()
                    .filter(|p| !p.2)
                    .map(|&(x, y, _)| Circle::new((x, y), 5, BLUE.filled())),
            )?
            .label("finished")
            .legend(|(x, y)| Circle::new((x + 10, y), 5, BLUE.filled()));
        if points.iter().any(|p| p.2) {
            chart
                .draw_series(
                    points
                        .iter()
                        .filter(|p| p.2)
                        .map(|&(x, y, _)| Cross::new((x, y), 5, BLACK.mix(0.5).stroke_width(2))),
                )?
                .label("pruned (value at its last rung)")
                .legend(|(x, y)| Cross::new((x + 10, y), 5, BLACK.mix(0.5).stroke_width(2)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()?;
        Ok(())
    })
}
