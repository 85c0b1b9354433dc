//! `lmforge sweep`: hyperparameter search over `train` runs. The sweep file has W&B's
//! shape (method, metric, parameters, run_cap, early_terminate); each trial is an
//! ordinary run directory under `SWEEP_DIR/trials/`, trained by a child `lmforge train`
//! process, and a JSONL journal records every decision so a killed sweep continues
//! where it stopped without running a finished trial twice.

pub mod prune;
pub mod report;
pub mod space;
pub mod tpe;

use crate::train::checkpoint;
use crate::train::config::Metric;
use crate::train::TrainConfig;
use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use prune::Pruner;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use space::{Domain, Parameter, Params};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Grid,
    Random,
    Bayes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Goal {
    Minimize,
    Maximize,
}

impl Goal {
    /// The value in the direction where smaller is better.
    pub fn signed(self, v: f64) -> f64 {
        match self {
            Goal::Minimize => v,
            Goal::Maximize => -v,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Goal::Minimize => "minimize",
            Goal::Maximize => "maximize",
        }
    }
}

/// A parsed sweep file.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    pub method: Method,
    pub metric: Metric,
    pub goal: Goal,
    pub parameters: Vec<Parameter>,
    pub run_cap: usize,
    pub seed: u64,
    pub pruner: Pruner,
    /// A train preset the trials start from (default: the embedded one).
    pub preset: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    method: String,
    metric: RawMetric,
    parameters: toml::Table,
    run_cap: Option<usize>,
    #[serde(default)]
    seed: u64,
    early_terminate: Option<RawEarly>,
    preset: Option<PathBuf>,
    // W&B's descriptive fields, accepted and unused.
    #[allow(dead_code)]
    name: Option<String>,
    #[allow(dead_code)]
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetric {
    name: String,
    goal: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEarly {
    #[serde(rename = "type")]
    kind: String,
    #[serde(alias = "min_iter")]
    min_resource: Option<usize>,
    #[serde(alias = "eta")]
    reduction_factor: Option<usize>,
    startup_trials: Option<usize>,
}

impl SweepSpec {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_string(path)?;
        Self::parse(&text).map_err(|e| anyhow!("{}: {e:#}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let raw: RawSpec = toml::from_str(text).map_err(|e| anyhow!("{}", e.message()))?;
        let method = match raw.method.as_str() {
            "grid" => Method::Grid,
            "random" => Method::Random,
            "bayes" | "tpe" => Method::Bayes,
            other => bail!("method {other:?}: expected grid, random or bayes"),
        };
        let metric = Metric::parse(
            raw.metric
                .name
                .strip_prefix("val_")
                .unwrap_or(&raw.metric.name),
        )
        .or_else(|_| Metric::parse(&raw.metric.name))
        .map_err(|e| anyhow!("metric.name: {e}"))?;
        let goal = match raw.metric.goal.as_deref() {
            Some("minimize") => Goal::Minimize,
            Some("maximize") => Goal::Maximize,
            None if metric == Metric::ValLoss => Goal::Minimize,
            None => Goal::Maximize,
            Some(other) => bail!("metric.goal {other:?}: expected minimize or maximize"),
        };
        if raw.parameters.is_empty() {
            bail!("[parameters] is empty: an empty search space");
        }
        let parameters = raw
            .parameters
            .iter()
            .map(|(name, spec)| space::parse_parameter(name, spec))
            .collect::<Result<Vec<_>>>()?;
        let run_cap = match (method, raw.run_cap) {
            (_, Some(0)) => bail!("run_cap must be positive"),
            (Method::Grid, cap) => {
                if let Some(p) = parameters
                    .iter()
                    .find(|p| !matches!(p.domain, Domain::Values(_)))
                {
                    bail!("parameters.{}: grid search needs values = [...]", p.name);
                }
                cap.unwrap_or(usize::MAX).min(space::grid_size(&parameters))
            }
            (_, Some(cap)) => cap,
            (_, None) => bail!("run_cap is required for random and bayes search"),
        };
        let pruner = match raw.early_terminate {
            None => Pruner::None,
            Some(e) => {
                let min_resource = e.min_resource.filter(|&m| m > 0).ok_or_else(|| {
                    anyhow!("early_terminate.min_resource: a positive step count is required")
                })?;
                match e.kind.as_str() {
                    "asha" | "hyperband" => {
                        let reduction_factor = e.reduction_factor.unwrap_or(4);
                        if reduction_factor < 2 {
                            bail!("early_terminate.reduction_factor must be at least 2");
                        }
                        Pruner::Asha {
                            min_resource,
                            reduction_factor,
                        }
                    }
                    "median" => Pruner::Median {
                        min_resource,
                        startup_trials: e.startup_trials.unwrap_or(5),
                    },
                    other => bail!("early_terminate.type {other:?}: expected asha or median"),
                }
            }
        };
        Ok(SweepSpec {
            method,
            metric,
            goal,
            parameters,
            run_cap,
            seed: raw.seed,
            pruner,
            preset: raw.preset,
        })
    }

    /// The key each evaluation writes the metric under in metrics.jsonl.
    pub fn metric_key(&self) -> String {
        self.metric.record_key()
    }

    /// Checks the parameters against the trials' base config: every key a train key,
    /// every value one `--set` accepts, the rungs on evaluation steps.
    pub fn check(&self, base: &TrainConfig) -> Result<()> {
        let keys = TrainConfig::keys();
        for p in &self.parameters {
            if !keys.contains(&p.name) {
                bail!(
                    "parameters.{}: not a train key (train keys: {})",
                    p.name,
                    keys.join(" ")
                );
            }
            if p.name == "out_dir" {
                bail!(
                    "parameters.out_dir: each trial has its own directory under SWEEP_DIR/trials"
                );
            }
            let probes: Vec<serde_json::Value> = match &p.domain {
                Domain::Values(v) => v.clone(),
                d @ Domain::Range { lo, hi, .. } => {
                    vec![d.from_internal(*lo), d.from_internal(*hi)]
                }
            };
            for v in probes {
                base.clone()
                    .set(&space::assignment(&p.name, &v))
                    .map_err(|e| anyhow!("parameters.{}: {e}", p.name))?;
            }
        }
        if self.metric != Metric::ValLoss && base.task != "classify" {
            bail!(
                "metric.name {}: only a classifier (task = \"classify\") reports it; a language model reports val_loss",
                self.metric.name()
            );
        }
        if self.pruner != Pruner::None {
            for fixed in ["max_steps", "epochs", "eval_every"] {
                if self.parameters.iter().any(|p| p.name == fixed) {
                    bail!("parameters.{fixed}: early_terminate needs it fixed across trials");
                }
            }
            let (Pruner::Asha { min_resource, .. } | Pruner::Median { min_resource, .. }) =
                self.pruner
            else {
                unreachable!()
            };
            if base.epochs > 0.0 {
                bail!("early_terminate needs a step budget: set max_steps, not epochs");
            }
            if base.eval_every == 0 || min_resource % base.eval_every != 0 {
                bail!(
                    "early_terminate.min_resource {min_resource} must be a multiple of eval_every ({})",
                    base.eval_every
                );
            }
            if min_resource >= base.max_steps {
                bail!(
                    "early_terminate.min_resource {min_resource} must be below max_steps ({})",
                    base.max_steps
                );
            }
        }
        Ok(())
    }
}

/// How `lmforge sweep` was called.
pub struct SweepOptions {
    pub spec_path: PathBuf,
    pub out: PathBuf,
    /// Passed to every trial: `train --data`.
    pub data: Option<PathBuf>,
    /// Passed to every trial before its own parameters: `train --set`.
    pub sets: Vec<String>,
    /// Trials at a time; the cores are split between them.
    pub parallel: usize,
    /// Seeds to rerun the best config (and the base config) over, after the search.
    pub confirm: usize,
    /// The `lmforge` executable the trials run.
    pub exe: PathBuf,
    pub cores: usize,
    pub stop: Option<Arc<AtomicBool>>,
}

/// One line of `journal.jsonl`.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Sweep {
        spec: String,
        data: Option<PathBuf>,
        sets: Vec<String>,
    },
    Started {
        trial: usize,
        params: Params,
    },
    /// Reached a rung and goes on.
    Promoted {
        trial: usize,
        step: usize,
        value: f64,
    },
    Pruned {
        trial: usize,
        step: usize,
        value: f64,
    },
    Finished {
        trial: usize,
        step: usize,
        value: f64,
    },
    Failed {
        trial: usize,
        error: String,
    },
    /// A confirmation run: the best trial's config (`trial`) or the base config (`None`).
    Confirmed {
        trial: Option<usize>,
        seed: u64,
        value: f64,
    },
}

/// How a trial ended.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    Finished { step: usize, value: f64 },
    Pruned { step: usize, value: f64 },
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Trial {
    pub id: usize,
    pub params: Params,
    /// The metric at each rung the trial reached.
    pub rungs: BTreeMap<usize, f64>,
    pub end: Option<End>,
}

impl Trial {
    /// The value TPE and the table rank it by, and the step it was measured at.
    pub fn result(&self) -> Option<(f64, usize)> {
        match self.end {
            Some(End::Finished { step, value }) | Some(End::Pruned { step, value }) => {
                Some((value, step))
            }
            _ => None,
        }
    }
}

pub fn trial_dir(out: &Path, id: usize) -> PathBuf {
    out.join("trials").join(format!("trial-{id:03}"))
}

/// Appends events, each line flushed to disk before the sweep acts on it.
struct Journal {
    file: File,
}

impl Journal {
    fn path(out: &Path) -> PathBuf {
        out.join("journal.jsonl")
    }

    /// The events so far (an unterminated last line, cut off by a kill, is dropped).
    fn read(out: &Path) -> Result<Vec<Event>> {
        let path = Self::path(out);
        if !path.exists() {
            return Ok(Vec::new());
        }
        let text = crate::fsutil::read_string(&path)?;
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .enumerate()
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .map_err(|e| anyhow!("{}:{}: not a journal event: {e}", path.display(), i + 1))
            })
            .collect()
    }

    fn open(out: &Path) -> Result<Self> {
        let path = Self::path(out);
        if path.exists() {
            // Drop a torn last line so appends start on a line of their own.
            let text = crate::fsutil::read_string(&path)?;
            if !text.is_empty() && !text.ends_with('\n') {
                let keep = text.rfind('\n').map_or(0, |i| i + 1);
                crate::fsutil::write_atomic(&path, &text.as_bytes()[..keep])?;
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        Ok(Journal { file })
    }

    fn append(&mut self, event: &Event) -> Result<()> {
        let line = serde_json::to_string(event)? + "\n";
        self.file
            .write_all(line.as_bytes())
            .and_then(|_| self.file.sync_data())
            .context("writing journal.jsonl")
    }
}

/// The metric recorded at `step` in a run's metrics.jsonl (`None` when absent or not
/// finite, which metrics.jsonl writes as null).
pub fn metric_at(run_dir: &Path, key: &str, step: usize) -> Result<Option<f64>> {
    let path = run_dir.join("metrics.jsonl");
    if !path.exists() {
        return Ok(None);
    }
    Ok(crate::fsutil::read_string(&path)?
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["step"].as_u64() == Some(step as u64))
        .find_map(|v| v.get(key).map(|x| x.as_f64()))
        .flatten())
}

/// The step of a run's newest checkpoint (0 when it has none).
fn checkpoint_step(run_dir: &Path) -> Result<usize> {
    Ok(latest_state(run_dir)?.map_or(0, |s| s.step))
}

/// The trainer state of a run's newest checkpoint, if it has one.
fn latest_state(run_dir: &Path) -> Result<Option<checkpoint::TrainerState>> {
    checkpoint::latest(run_dir)?
        .map(|dir| checkpoint::load_state(&dir))
        .transpose()
}

/// The last non-empty line a child wrote (its one-line error, when it failed).
fn last_log_line(run_dir: &Path) -> String {
    std::fs::read_to_string(run_dir.join("train.log"))
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.trim().to_string())
        })
        .unwrap_or_else(|| "no output".into())
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Job {
    Trial(usize),
    /// A confirmation run: (trial or base, seed).
    Confirm(Option<usize>, u64),
}

/// Child `train` processes, at most `width` at a time.
struct Pool {
    width: usize,
    running: Vec<(Job, usize, Child)>,
}

impl Pool {
    /// The next child to exit: its job, the step it started from, and its status; `None`
    /// when the sweep was interrupted while waiting.
    fn wait_any(&mut self, stopped: &dyn Fn() -> bool) -> Result<Option<(Job, usize, ExitStatus)>> {
        loop {
            for i in 0..self.running.len() {
                if let Some(status) = self.running[i].2.try_wait()? {
                    let (job, start, _) = self.running.remove(i);
                    return Ok(Some((job, start, status)));
                }
            }
            if stopped() {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// After an interrupt: asks every child to save and stop (SIGTERM, which `train`
    /// handles like Ctrl-C); any still running after a grace period are killed (every
    /// file they write is atomic, so a rerun resumes from their last checkpoint).
    fn drain(&mut self) {
        for (_, _, child) in &self.running {
            // SAFETY: signals a child process this pool started and has not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !self.running.is_empty() {
            self.running
                .retain_mut(|(_, _, child)| child.try_wait().ok().flatten().is_none());
            if std::time::Instant::now() > deadline {
                for (_, _, child) in &mut self.running {
                    let _ = child.kill();
                    let _ = child.wait();
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

/// What the trial needs next.
enum Next {
    Ended,
    /// Train from its checkpoint to this step (`None`: to the end).
    Run(Option<usize>),
}

/// A sweep in progress: the spec, the trials' base config and what the journal says.
pub struct Sweep<'a> {
    pub spec: SweepSpec,
    pub opts: &'a SweepOptions,
    pub base: TrainConfig,
    pub trials: Vec<Trial>,
    /// Confirmation results: (trial or base, seed) → value.
    pub confirmed: BTreeMap<(Option<usize>, u64), f64>,
    rungs: Vec<usize>,
    journal: Journal,
    bar: ProgressBar,
}

/// Runs (or continues) the sweep and writes its report; returns the finished sweep.
pub fn run(opts: &SweepOptions) -> Result<Sweep<'_>> {
    let spec_text = crate::fsutil::read_string(&opts.spec_path)?;
    let spec =
        SweepSpec::parse(&spec_text).map_err(|e| anyhow!("{}: {e:#}", opts.spec_path.display()))?;
    let mut base = match &spec.preset {
        Some(path) => TrainConfig::from_file(path)?,
        None => TrainConfig::default(),
    };
    if let Some(data) = &opts.data {
        base.data = data.clone();
        base.corpus = None;
    }
    for s in &opts.sets {
        base.set(s)?;
    }
    spec.check(&base)
        .map_err(|e| anyhow!("{}: {e:#}", opts.spec_path.display()))?;
    let data_keys = ["data", "corpus", "tokenizer", "val_fraction", "task"];
    if !base.is_classification()
        && !spec
            .parameters
            .iter()
            .any(|p| data_keys.contains(&p.name.as_str()))
    {
        // Once here, rather than by parallel trials racing to build the same shards.
        crate::data::prepare::ensure_prepared(
            &base.data,
            base.corpus.as_deref(),
            &base.tokenizer,
            base.val_fraction,
        )?;
    }
    std::fs::create_dir_all(opts.out.join("trials"))
        .with_context(|| format!("{}: cannot create", opts.out.display()))?;
    let events = Journal::read(&opts.out)?;
    let header = Event::Sweep {
        spec: spec_text,
        data: opts.data.clone(),
        sets: opts.sets.clone(),
    };
    match events.first() {
        None => {}
        Some(Event::Sweep { spec: old, data, sets })
            if data == &opts.data && sets == &opts.sets && same_search(old, &spec) => {}
        Some(_) => bail!(
            "{}: holds a different sweep (its sweep file, --data or --set differ; only run_cap may change); use another --out",
            Journal::path(&opts.out).display()
        ),
    }
    let mut journal = Journal::open(&opts.out)?;
    if events.is_empty() {
        journal.append(&header)?;
    }
    let bar = ProgressBar::new(spec.run_cap as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} trials {msg} [{elapsed_precise}]")
            .map_err(|e| anyhow!("{e}"))?,
    );
    let mut sweep = Sweep {
        rungs: spec.pruner.rungs(base.max_steps),
        spec,
        opts,
        base,
        trials: Vec::new(),
        confirmed: BTreeMap::new(),
        journal,
        bar,
    };
    for event in events {
        sweep.replay(event).with_context(|| {
            format!(
                "{}: inconsistent journal",
                Journal::path(&opts.out).display()
            )
        })?;
    }
    sweep.bar.set_position(sweep.ended() as u64);
    sweep.search()?;
    sweep.confirm()?;
    sweep.bar.finish_and_clear();
    report::write(&sweep)?;
    Ok(sweep)
}

/// Whether a journal's sweep file describes the same search as `spec` (run_cap aside).
fn same_search(old_text: &str, spec: &SweepSpec) -> bool {
    SweepSpec::parse(old_text).is_ok_and(|old| {
        SweepSpec {
            run_cap: spec.run_cap,
            ..old
        } == *spec
    })
}

/// What a sweep's journal says so far: its spec, its trials and confirmation results.
pub struct History {
    pub spec: SweepSpec,
    pub trials: Vec<Trial>,
    pub confirmed: BTreeMap<(Option<usize>, u64), f64>,
}

impl History {
    /// Reads the journal in the sweep directory `out` (for a reader beside the sweep,
    /// such as the dashboard).
    pub fn read(out: &Path) -> Result<Self> {
        let path = Journal::path(out);
        let events = Journal::read(out)?;
        let Some(Event::Sweep { spec, .. }) = events.first() else {
            bail!("{}: no sweep header", path.display());
        };
        let spec = SweepSpec::parse(spec).map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
        let (mut trials, mut confirmed) = (Vec::new(), BTreeMap::new());
        for event in events {
            replay(&mut trials, &mut confirmed, event)
                .with_context(|| format!("{}: inconsistent journal", path.display()))?;
        }
        Ok(History {
            spec,
            trials,
            confirmed,
        })
    }
}

/// Applies one journal event to the trials and confirmation results it describes.
fn replay(
    trials: &mut Vec<Trial>,
    confirmed: &mut BTreeMap<(Option<usize>, u64), f64>,
    event: Event,
) -> Result<()> {
    fn trial(trials: &mut [Trial], id: usize) -> Result<&mut Trial> {
        trials
            .get_mut(id)
            .with_context(|| format!("trial {id} was never started"))
    }
    match event {
        Event::Sweep { .. } => {}
        Event::Started { trial, params } => trials.push(Trial {
            id: trial,
            params,
            rungs: BTreeMap::new(),
            end: None,
        }),
        Event::Promoted {
            trial: id,
            step,
            value,
        } => {
            trial(trials, id)?.rungs.insert(step, value);
        }
        Event::Pruned {
            trial: id,
            step,
            value,
        } => {
            let t = trial(trials, id)?;
            t.rungs.insert(step, value);
            t.end = Some(End::Pruned { step, value });
        }
        Event::Finished {
            trial: id,
            step,
            value,
        } => trial(trials, id)?.end = Some(End::Finished { step, value }),
        Event::Failed { trial: id, error } => trial(trials, id)?.end = Some(End::Failed(error)),
        Event::Confirmed { trial, seed, value } => {
            confirmed.insert((trial, seed), value);
        }
    }
    Ok(())
}

impl Sweep<'_> {
    fn replay(&mut self, event: Event) -> Result<()> {
        replay(&mut self.trials, &mut self.confirmed, event)
    }

    fn record(&mut self, event: Event) -> Result<()> {
        self.journal.append(&event)?;
        let message = match &event {
            Event::Promoted { trial, step, value } => {
                format!(
                    "trial {trial}: {} {value:.4} at step {step}, continues",
                    self.spec.metric_key()
                )
            }
            Event::Pruned { trial, step, value } => {
                format!(
                    "trial {trial}: pruned at step {step} ({} {value:.4})",
                    self.spec.metric_key()
                )
            }
            Event::Finished { trial, value, .. } => {
                format!(
                    "trial {trial}: finished, {} {value:.4}",
                    self.spec.metric_key()
                )
            }
            Event::Failed { trial, error } => format!("trial {trial}: failed: {error}"),
            _ => String::new(),
        };
        self.replay(event)?;
        if !message.is_empty() {
            self.bar.suspend(|| tracing::info!("{message}"));
        }
        self.bar.set_position(self.ended() as u64);
        Ok(())
    }

    fn ended(&self) -> usize {
        self.trials.iter().filter(|t| t.end.is_some()).count()
    }

    fn stopped(&self) -> bool {
        self.opts
            .stop
            .as_ref()
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    /// The base config with a trial's parameters set.
    pub fn trial_config(&self, params: &Params) -> Result<TrainConfig> {
        let mut cfg = self.base.clone();
        for (k, v) in params {
            cfg.set(&space::assignment(k, v))?;
        }
        Ok(cfg)
    }

    /// A new trial's parameters: the next grid point, a random draw, or TPE's choice
    /// once enough trials have ended. Each trial draws from its own random stream.
    fn propose(&self, id: usize) -> Params {
        let mut rng = ChaCha8Rng::seed_from_u64(self.spec.seed);
        rng.set_stream(id as u64);
        let params = &self.spec.parameters;
        let observed: Vec<tpe::Observed> = self
            .trials
            .iter()
            .filter_map(|t| {
                let (value, step) = t.result()?;
                Some(tpe::Observed {
                    trial: t.id,
                    params: &t.params,
                    value,
                    pruned_at: matches!(t.end, Some(End::Pruned { .. })).then_some(step),
                })
            })
            .collect();
        match self.spec.method {
            Method::Grid => space::grid_point(params, id).expect("run_cap bounds the grid"),
            Method::Bayes if observed.len() >= tpe::STARTUP_TRIALS => {
                tpe::suggest(params, &observed, self.spec.goal, &mut rng)
            }
            Method::Random | Method::Bayes => params
                .iter()
                .map(|p| (p.name.clone(), p.domain.sample_uniform(&mut rng)))
                .collect(),
        }
    }

    /// The child `train` command for a run directory, resuming its checkpoint if any.
    fn command(&self, dir: &Path, params: &Params, stop_at: Option<usize>) -> Result<Command> {
        let resume = checkpoint::latest(dir)?.is_some();
        if !resume && dir.exists() {
            // Killed before its first checkpoint: start it again from nothing.
            std::fs::remove_dir_all(dir)
                .with_context(|| format!("{}: cannot clear", dir.display()))?;
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create", dir.display()))?;
        let mut cmd = Command::new(&self.opts.exe);
        cmd.arg("train");
        if let Some(preset) = &self.spec.preset {
            cmd.arg("--config").arg(preset);
        }
        cmd.arg("--out").arg(dir);
        if let Some(data) = &self.opts.data {
            cmd.arg("--data").arg(data);
        }
        for s in &self.opts.sets {
            cmd.arg("--set").arg(s);
        }
        for (k, v) in params {
            cmd.arg("--set").arg(space::assignment(k, v));
        }
        if resume {
            cmd.arg("--resume");
        }
        if let Some(step) = stop_at {
            cmd.arg("--stop-at-step").arg(step.to_string());
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("train.log"))
            .with_context(|| format!("{}: cannot open train.log", dir.display()))?;
        let threads = (self.opts.cores / self.opts.parallel.max(1)).max(1);
        cmd.env("RAYON_NUM_THREADS", threads.to_string())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        Ok(cmd)
    }

    /// Decides what a trial needs from its newest checkpoint: judged at a rung it has
    /// reached, finished at the end of its budget (or when its patience ran out), or
    /// trained on to the next rung.
    fn settle(&mut self, id: usize) -> Result<Next> {
        let dir = trial_dir(&self.opts.out, id);
        let key = self.spec.metric_key();
        let state = latest_state(&dir)?;
        let step = state.as_ref().map_or(0, |s| s.step);
        let value_at = |step: usize| -> Result<f64> {
            metric_at(&dir, &key, step)?.ok_or_else(|| {
                anyhow!("no finite {key} at step {step} in its metrics.jsonl (diverged?)")
            })
        };
        let out_of_patience = state
            .as_ref()
            .is_some_and(|s| s.config.patience > 0 && s.evals_since_best >= s.config.patience);
        if step >= self.base.max_steps || out_of_patience {
            let event = match value_at(step) {
                Ok(value) => Event::Finished {
                    trial: id,
                    step,
                    value,
                },
                Err(e) => Event::Failed {
                    trial: id,
                    error: e.to_string(),
                },
            };
            self.record(event)?;
            return Ok(Next::Ended);
        }
        if self.rungs.contains(&step) && !self.trials[id].rungs.contains_key(&step) {
            let value = match value_at(step) {
                Ok(v) => v,
                Err(e) => {
                    self.record(Event::Failed {
                        trial: id,
                        error: e.to_string(),
                    })?;
                    return Ok(Next::Ended);
                }
            };
            let event = if self.promotes(id, step, value) {
                Event::Promoted {
                    trial: id,
                    step,
                    value,
                }
            } else {
                Event::Pruned {
                    trial: id,
                    step,
                    value,
                }
            };
            let pruned = matches!(event, Event::Pruned { .. });
            self.record(event)?;
            if pruned {
                return Ok(Next::Ended);
            }
        }
        Ok(Next::Run(self.rungs.iter().copied().find(|&r| r > step)))
    }

    fn promotes(&self, id: usize, step: usize, value: f64) -> bool {
        let goal = self.spec.goal;
        match self.spec.pruner {
            Pruner::None => true,
            Pruner::Asha {
                reduction_factor, ..
            } => {
                let competing: Vec<f64> = self
                    .trials
                    .iter()
                    .filter(|t| t.id != id)
                    .filter_map(|t| t.rungs.get(&step).copied())
                    .chain([value])
                    .collect();
                prune::asha_promotes(value, &competing, reduction_factor, goal)
            }
            Pruner::Median { startup_trials, .. } => {
                let finished: Vec<f64> = self
                    .trials
                    .iter()
                    .filter(|t| matches!(t.end, Some(End::Finished { .. })))
                    .filter_map(|t| t.rungs.get(&step).copied())
                    .collect();
                let best_so_far = self.trials[id]
                    .rungs
                    .values()
                    .copied()
                    .chain([value])
                    .min_by(|a, b| goal.signed(*a).total_cmp(&goal.signed(*b)))
                    .unwrap_or(value);
                finished.len() < startup_trials
                    || prune::median_continues(best_so_far, &finished, goal)
            }
        }
    }

    /// The next trial to (re)start: an unfinished one from the journal, else a new one.
    fn next_trial(&mut self, pool: &Pool) -> Result<Option<usize>> {
        let busy = |id: usize| pool.running.iter().any(|(j, ..)| *j == Job::Trial(id));
        if let Some(t) = self.trials.iter().find(|t| t.end.is_none() && !busy(t.id)) {
            return Ok(Some(t.id));
        }
        let id = self.trials.len();
        if id >= self.spec.run_cap {
            return Ok(None);
        }
        let params = self.propose(id);
        self.record(Event::Started { trial: id, params })?;
        Ok(Some(id))
    }

    fn interrupted(&self, pool: &mut Pool) -> anyhow::Error {
        pool.drain();
        anyhow!(
            "sweep interrupted; rerun the same command to continue ({})",
            Journal::path(&self.opts.out).display()
        )
    }

    fn search(&mut self) -> Result<()> {
        let mut pool = Pool {
            width: self.opts.parallel.max(1),
            running: Vec::new(),
        };
        loop {
            if self.stopped() {
                return Err(self.interrupted(&mut pool));
            }
            while pool.running.len() < pool.width {
                let Some(id) = self.next_trial(&pool)? else {
                    break;
                };
                if let Next::Run(target) = self.settle(id)? {
                    let dir = trial_dir(&self.opts.out, id);
                    let start = checkpoint_step(&dir)?;
                    let child = self
                        .command(&dir, &self.trials[id].params.clone(), target)?
                        .spawn()
                        .with_context(|| format!("cannot start {}", self.opts.exe.display()))?;
                    pool.running.push((Job::Trial(id), start, child));
                }
            }
            if pool.running.is_empty() {
                return Ok(());
            }
            let stopped = || self.stopped();
            let Some((job, start, status)) = pool.wait_any(&stopped)? else {
                continue;
            };
            let Job::Trial(id) = job else { unreachable!() };
            if self.stopped() {
                continue;
            }
            let dir = trial_dir(&self.opts.out, id);
            if !status.success() {
                let error = last_log_line(&dir);
                self.record(Event::Failed { trial: id, error })?;
            } else if checkpoint_step(&dir)? == start {
                let error = format!(
                    "made no progress past step {start}: {}",
                    last_log_line(&dir)
                );
                self.record(Event::Failed { trial: id, error })?;
            }
            // Otherwise the next pass settles it (judge at the rung, finish, or go on).
        }
    }

    /// The best trial: finished, best value (the lowest id among ties).
    pub fn best(&self) -> Option<&Trial> {
        self.trials
            .iter()
            .filter(|t| matches!(t.end, Some(End::Finished { .. })))
            .min_by(|a, b| {
                let v = |t: &Trial| self.spec.goal.signed(t.result().expect("finished").0);
                v(a).total_cmp(&v(b)).then(a.id.cmp(&b.id))
            })
    }

    /// The seeds confirmation runs use: fresh ones after the base config's.
    pub fn confirm_seeds(&self) -> Vec<u64> {
        (1..=self.opts.confirm as u64)
            .map(|i| self.base.seed.wrapping_add(i))
            .collect()
    }

    pub fn confirm_dir(&self, trial: Option<usize>, seed: u64) -> PathBuf {
        let name = match trial {
            Some(id) => format!("trial-{id:03}-seed-{seed}"),
            None => format!("base-seed-{seed}"),
        };
        self.opts.out.join("confirm").join(name)
    }

    /// Reruns the best trial's config and the base config over `--confirm` fresh seeds.
    fn confirm(&mut self) -> Result<()> {
        let Some(best) = self.best().map(|t| t.id) else {
            return Ok(());
        };
        let mut jobs: Vec<Job> = Vec::new();
        for seed in self.confirm_seeds() {
            for trial in [Some(best), None] {
                if !self.confirmed.contains_key(&(trial, seed)) {
                    jobs.push(Job::Confirm(trial, seed));
                }
            }
        }
        let mut pool = Pool {
            width: self.opts.parallel.max(1),
            running: Vec::new(),
        };
        let key = self.spec.metric_key();
        loop {
            if self.stopped() {
                return Err(self.interrupted(&mut pool));
            }
            while pool.running.len() < pool.width && !jobs.is_empty() {
                let job = jobs.remove(0);
                let Job::Confirm(trial, seed) = job else {
                    unreachable!()
                };
                let dir = self.confirm_dir(trial, seed);
                let done = checkpoint_step(&dir)?;
                if done >= self.base.max_steps {
                    // Trained before a kill, not yet journaled.
                    if let Some(value) = metric_at(&dir, &key, done)? {
                        self.record(Event::Confirmed { trial, seed, value })?;
                        continue;
                    }
                }
                let mut params = trial
                    .map(|id| self.trials[id].params.clone())
                    .unwrap_or_default();
                params.insert("seed".into(), serde_json::Value::from(seed));
                let child = self
                    .command(&dir, &params, None)?
                    .spawn()
                    .with_context(|| format!("cannot start {}", self.opts.exe.display()))?;
                pool.running.push((job, 0, child));
            }
            if pool.running.is_empty() {
                return Ok(());
            }
            let stopped = || self.stopped();
            let Some((job, _, status)) = pool.wait_any(&stopped)? else {
                continue;
            };
            let Job::Confirm(trial, seed) = job else {
                unreachable!()
            };
            if self.stopped() {
                continue;
            }
            let dir = self.confirm_dir(trial, seed);
            let step = checkpoint_step(&dir)?;
            let value = metric_at(&dir, &key, step)?.filter(|_| status.success());
            let Some(value) = value else {
                pool.drain();
                bail!(
                    "confirmation run {} failed: {}",
                    dir.display(),
                    last_log_line(&dir)
                );
            };
            self.record(Event::Confirmed { trial, seed, value })?;
        }
    }
}
