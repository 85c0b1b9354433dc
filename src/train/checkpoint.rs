//! Checkpoints: `RUN_DIR/checkpoints/step-NNNNNN/` is a Hugging Face model directory
//! (config.json, model.safetensors, tokenizer.json) plus the trainer's own state
//! (optimizer.safetensors, trainer_state.json). Each is written into a temporary
//! directory, fsynced and renamed; `checkpoints/latest` names the newest complete one
//! and is itself replaced atomically.

use super::config::Metric;
use super::optim::{AdamW, Moments};
use super::TrainConfig;
use crate::data::{LoaderState, RngState, TextTokenizer};
use crate::fsutil;
use crate::model::{hf, Model, Param};
use anyhow::{anyhow, ensure, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub const STATE_FILE: &str = "trainer_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Everything besides weights and moments that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainerState {
    pub step: usize,
    pub adam_t: u64,
    pub loader: LoaderState,
    pub dropout: RngState,
    /// The best value of the run's `metric` so far (older checkpoints: val loss).
    #[serde(alias = "best_val_loss")]
    pub best_metric: Option<f64>,
    /// The step `best_metric` was measured at.
    #[serde(default)]
    pub best_step: Option<usize>,
    /// Evaluations since `best_metric` last improved (for `patience`).
    #[serde(default)]
    pub evals_since_best: usize,
    /// Validation loss measured at this very step, if an evaluation ran here.
    #[serde(default)]
    pub val_loss: Option<f64>,
    /// The run's `metric` measured at this very step, if an evaluation ran here.
    #[serde(default)]
    pub val_metric: Option<f64>,
    /// Steps skipped so far for a non-finite loss or gradient norm.
    #[serde(default)]
    pub skipped_steps: usize,
    /// Ranks of the run that wrote it (its global batch is batch_size × world_size).
    #[serde(default = "one")]
    pub world_size: usize,
    pub config: TrainConfig,
    /// fp16's dynamic loss scale (absent for f32 and bf16 runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<super::precision::LossScaler>,
}

fn one() -> usize {
    1
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

pub fn step_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Writes a checkpoint and prunes old ones beyond `config.keep_last` (0 keeps all).
pub fn save(
    run_dir: &Path,
    model: &Model,
    optimizer: &AdamW,
    tokenizer: &TextTokenizer,
    state: &TrainerState,
) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    std::fs::create_dir_all(&root).with_context(|| format!("{}: cannot create", root.display()))?;
    let name = step_name(state.step);
    let tmp = root.join(format!(".tmp-{name}-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    hf::save(model, &tmp, Some(tokenizer.eot_id()))?;
    tokenizer.save_to_model_dir(&tmp, model.config().context_len())?;
    save_optimizer(&tmp.join(OPTIMIZER_FILE), model, optimizer)?;
    fsutil::write_atomic(
        &tmp.join(STATE_FILE),
        serde_json::to_string_pretty(state)?.as_bytes(),
    )?;

    let dest = root.join(&name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest)
            .with_context(|| format!("{}: cannot replace", dest.display()))?;
    }
    std::fs::rename(&tmp, &dest)
        .with_context(|| format!("{}: cannot rename into place", dest.display()))?;
    fsutil::sync_dir(&root)?;
    fsutil::write_atomic(&root.join("latest"), name.as_bytes())?;
    let keep_best = match state.config.keep_best {
        true => Some(state.config.metric()?),
        false => None,
    };
    prune(&root, state.config.keep_last, keep_best, &name)?;
    Ok(dest)
}

/// The `step-*` checkpoint names under `root`, oldest first.
fn list_checkpoints(root: &Path) -> Result<Vec<String>> {
    let mut steps: Vec<String> = std::fs::read_dir(root)
        .with_context(|| format!("{}: cannot list", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("step-"))
        .collect();
    steps.sort();
    Ok(steps)
}

/// Which checkpoints retention keeps: the `keep_last` newest (all when 0), the one
/// `latest` names, and with `keep_best = Some(metric)` the one whose own value of the
/// metric is best (the oldest of equals). `names_and_val` pairs each name, oldest
/// first, with its metric value.
pub fn retained(
    names_and_val: &[(String, Option<f64>)],
    keep_last: usize,
    keep_best: Option<Metric>,
    latest: &str,
) -> Vec<String> {
    let n = names_and_val.len();
    let newest_from = if keep_last == 0 {
        0
    } else {
        n.saturating_sub(keep_last)
    };
    let mut best: Option<(&String, f64)> = None;
    if let Some(metric) = keep_best {
        for (name, v) in names_and_val {
            if let Some(v) = v.filter(|v| v.is_finite()) {
                if best.is_none_or(|(_, b)| metric.better(v, b)) {
                    best = Some((name, v));
                }
            }
        }
    }
    names_and_val
        .iter()
        .enumerate()
        .filter(|(i, (name, _))| {
            *i >= newest_from || name == latest || best.is_some_and(|(b, _)| b == name)
        })
        .map(|(_, (name, _))| name.clone())
        .collect()
}

/// Removes the checkpoints that retention does not keep; nothing else.
fn prune(root: &Path, keep_last: usize, keep_best: Option<Metric>, latest: &str) -> Result<()> {
    let names = list_checkpoints(root)?;
    let with_val: Vec<(String, Option<f64>)> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                match keep_best {
                    Some(_) => load_state(&root.join(n))
                        .ok()
                        .and_then(|s| s.val_metric.or(s.val_loss)),
                    None => None,
                },
            )
        })
        .collect();
    let keep = retained(&with_val, keep_last, keep_best, latest);
    for name in names.iter().filter(|n| !keep.contains(n)) {
        std::fs::remove_dir_all(root.join(name))
            .with_context(|| format!("{name}: cannot remove old checkpoint"))?;
    }
    Ok(())
}

/// Removes temporary files and directories an interrupted run left behind (ours all
/// start with `.` and carry `tmp-` in their names).
pub fn remove_stale_temporaries(run_dir: &Path) -> Result<()> {
    for dir in [run_dir.to_path_buf(), checkpoints_dir(run_dir)] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains("tmp-") {
                let path = e.path();
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.with_context(|| {
                    format!("{}: cannot remove stale temporary", path.display())
                })?;
            }
        }
    }
    Ok(())
}

/// The file naming a run's newest complete checkpoint.
pub fn latest_pointer(run_dir: &Path) -> PathBuf {
    checkpoints_dir(run_dir).join("latest")
}

/// The checkpoint directory `pointer_text` (the pointer file's contents) names, if it
/// names one of the run's checkpoints and nothing else.
pub fn pointed(run_dir: &Path, pointer_text: &str) -> Result<PathBuf> {
    let name = pointer_text.trim();
    ensure!(
        name.starts_with("step-") && !name.contains('/') && !name.contains(".."),
        "{}: does not name a checkpoint",
        latest_pointer(run_dir).display()
    );
    Ok(checkpoints_dir(run_dir).join(name))
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = latest_pointer(run_dir);
    if !pointer.exists() {
        return Ok(None);
    }
    pointed(run_dir, &fsutil::read_string(&pointer)?).map(Some)
}

/// A model directory given as itself, or as a run directory (its newest checkpoint).
pub fn resolve_model_dir(path: &Path) -> Result<PathBuf> {
    if path.join(hf::CONFIG_FILE).exists() {
        return Ok(path.to_path_buf());
    }
    latest(path)?.ok_or_else(|| {
        anyhow!(
            "{}: no config.json and no checkpoints/latest: not a model directory",
            path.display()
        )
    })
}

fn save_optimizer(path: &Path, model: &Model, opt: &AdamW) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (p, moments) in model.params().iter().zip(&opt.moments) {
        let Some((m, v)) = moments.to_host()? else {
            continue;
        };
        let shape = p.tensor().shape();
        tensors.push((
            format!("m.{}", p.name),
            Tensor::from_vec(m, shape, &Device::Cpu)?,
        ));
        tensors.push((
            format!("v.{}", p.name),
            Tensor::from_vec(v, shape, &Device::Cpu)?,
        ));
    }
    let meta = HashMap::from([("adam_t".to_string(), opt.t.to_string())]);
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| anyhow!("serialising optimizer state: {e}"))?;
    fsutil::write_atomic(path, &bytes)
}

/// Loads AdamW moments saved by [`save`] into `opt` (shapes checked against `params`),
/// placed on each weight's device: a checkpoint written on one device resumes on another.
pub fn load_optimizer(path: &Path, params: &[&Param], opt: &mut AdamW, adam_t: u64) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| anyhow!("{}: cannot read optimizer state: {e}", path.display()))?;
    for (i, p) in params.iter().enumerate().filter(|(_, p)| p.trainable) {
        let read = |kind: &str| -> Result<Vec<f32>> {
            let key = format!("{kind}.{}", p.name);
            let t = tensors
                .get(&key)
                .ok_or_else(|| anyhow!("{}: missing {key}", path.display()))?;
            ensure!(
                t.dims() == p.tensor().dims(),
                "{}: {key} has shape {:?}, expected {:?}",
                path.display(),
                t.dims(),
                p.tensor().dims()
            );
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        opt.moments[i] = Moments::from_host(p, read("m")?, read("v")?)?;
    }
    opt.t = adam_t;
    Ok(())
}

pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    parse_state(&fsutil::read(&path)?, &path)
}

/// Parses `trainer_state.json` bytes and checks what serde cannot: the resolved
/// config is valid and the counters agree.
pub fn parse_state(bytes: &[u8], path: &Path) -> Result<TrainerState> {
    let state: TrainerState = serde_json::from_slice(bytes)
        .with_context(|| format!("{}: invalid trainer state", path.display()))?;
    state
        .config
        .validate()
        .with_context(|| format!("{}: invalid config", path.display()))?;
    ensure!(
        state.adam_t as usize <= state.step,
        "{}: {} optimizer updates recorded for {} steps",
        path.display(),
        state.adam_t,
        state.step
    );
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::retained;
    use crate::train::config::Metric;

    fn run(vals: &[Option<f64>]) -> Vec<(String, Option<f64>)> {
        vals.iter()
            .enumerate()
            .map(|(i, v)| (format!("step-{:06}", (i + 1) * 10), *v))
            .collect()
    }

    fn steps(kept: Vec<String>) -> Vec<usize> {
        kept.iter().map(|n| n[5..].parse().unwrap()).collect()
    }

    #[test]
    fn retention_combinations() {
        let ckpts = run(&[Some(3.0), Some(1.0), Some(2.0), None, Some(2.5), Some(2.2)]);
        let latest = "step-000060";
        // Best (step 20) older than the two newest: kept alongside them.
        assert_eq!(
            steps(retained(&ckpts, 2, Some(Metric::ValLoss), latest)),
            vec![20, 50, 60]
        );
        assert_eq!(steps(retained(&ckpts, 2, None, latest)), vec![50, 60]);
        // K = 1: the newest only, plus the best when asked.
        assert_eq!(steps(retained(&ckpts, 1, None, latest)), vec![60]);
        assert_eq!(
            steps(retained(&ckpts, 1, Some(Metric::ValLoss), latest)),
            vec![20, 60]
        );
        // Best among the newest: nothing extra.
        let newest_best = run(&[Some(3.0), Some(2.0), Some(1.0)]);
        assert_eq!(
            steps(retained(
                &newest_best,
                1,
                Some(Metric::ValLoss),
                "step-000030"
            )),
            vec![30]
        );
        // keep_last = 0 keeps everything.
        assert_eq!(retained(&ckpts, 0, Some(Metric::ValLoss), latest).len(), 6);
        // The checkpoint `latest` names is never removed, even when it is not the newest.
        assert_eq!(
            steps(retained(&ckpts, 1, None, "step-000030")),
            vec![30, 60]
        );
        // No evaluation anywhere: keep_best changes nothing; NaN never counts as best.
        let none = run(&[None, Some(f64::NAN), None]);
        assert_eq!(
            steps(retained(&none, 1, Some(Metric::ValLoss), "step-000030")),
            vec![30]
        );
        // Ties go to the oldest.
        let ties = run(&[Some(1.0), Some(1.0), Some(5.0), Some(6.0)]);
        assert_eq!(
            steps(retained(&ties, 1, Some(Metric::ValLoss), "step-000040")),
            vec![10, 40]
        );
        // A metric where higher is better keeps the highest (step 10 here), not the lowest.
        let f1 = run(&[Some(0.9), Some(0.5), Some(0.7), Some(0.6)]);
        assert_eq!(
            steps(retained(&f1, 1, Some(Metric::F1Macro), "step-000040")),
            vec![10, 40]
        );
        assert_eq!(
            steps(retained(&f1, 1, Some(Metric::ValLoss), "step-000040")),
            vec![20, 40]
        );
    }

    /// Moments kept as tensors (a GPU's) are written as the same f32 values a CPU run
    /// writes, and read back beside each weight: host vectors for a CPU model. So a
    /// checkpoint moves between devices.
    #[test]
    fn optimizer_state_moves_between_tensor_and_host_moments() {
        use crate::model::Model;
        use crate::train::optim::{AdamW, Moments};
        use crate::train::TrainConfig;
        use candle_core::{Device, Tensor};
        let mut cfg = TrainConfig::default();
        (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size) = (1, 2, 8, 8);
        let model = Model::init(&cfg.model_config(11, None).unwrap(), 3, &Device::Cpu).unwrap();
        let params = model.params();
        let adamw = cfg.adamw();
        let mut on_gpu = AdamW::new(adamw, &params).unwrap();
        for (i, (slot, p)) in on_gpu.moments.iter_mut().zip(&params).enumerate() {
            let values = |k: f32| {
                let n = p.tensor().elem_count();
                let v: Vec<f32> = (0..n).map(|j| k * (i * 1000 + j) as f32).collect();
                Tensor::from_vec(v, p.tensor().shape(), &Device::Cpu).unwrap()
            };
            *slot = Moments::Device {
                m: values(1e-3),
                v: values(1e-6),
            };
        }
        on_gpu.t = 7;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(super::OPTIMIZER_FILE);
        super::save_optimizer(&path, &model, &on_gpu).unwrap();
        let mut on_cpu = AdamW::new(adamw, &params).unwrap();
        super::load_optimizer(&path, &params, &mut on_cpu, 7).unwrap();
        assert_eq!(on_cpu.t, 7);
        for (a, b) in on_gpu.moments.iter().zip(&on_cpu.moments) {
            assert!(matches!(b, Moments::Host { .. }));
            assert_eq!(a.to_host().unwrap(), b.to_host().unwrap());
        }
        // And back: the host state writes the same bytes.
        let again = dir.path().join("again.safetensors");
        super::save_optimizer(&again, &model, &on_cpu).unwrap();
        assert_eq!(
            std::fs::read(&path).unwrap(),
            std::fs::read(&again).unwrap()
        );
    }
}
