//! Checkpoints: `RUN_DIR/checkpoints/step-NNNNNN/` is a Hugging Face model directory
//! (config.json, model.safetensors, tokenizer.json) plus the trainer's own state
//! (optimizer.safetensors, trainer_state.json). Each is written into a temporary
//! directory, fsynced and renamed; `checkpoints/latest` names the newest complete one
//! and is itself replaced atomically.

use super::optim::AdamW;
use super::TrainConfig;
use crate::data::{RngState, TextTokenizer};
use crate::fsutil;
use crate::model::{hf, Gpt, Param};
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
    pub loader: RngState,
    pub dropout: RngState,
    pub best_val_loss: Option<f64>,
    pub config: TrainConfig,
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

fn step_name(step: usize) -> String {
    format!("step-{step:06}")
}

/// Writes a checkpoint and prunes old ones beyond `config.keep_last` (0 keeps all).
pub fn save(
    run_dir: &Path,
    model: &Gpt,
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
    tokenizer.save_to_model_dir(&tmp, model.config.n_positions)?;
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
    prune(&root, state.config.keep_last, &name)?;
    Ok(dest)
}

/// Removes the oldest `step-*` directories beyond `keep_last`, never `protect`.
fn prune(root: &Path, keep_last: usize, protect: &str) -> Result<()> {
    if keep_last == 0 {
        return Ok(());
    }
    let mut steps: Vec<String> = std::fs::read_dir(root)?
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|n| n.starts_with("step-"))
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep_last);
    for name in steps.into_iter().take(excess).filter(|n| n != protect) {
        std::fs::remove_dir_all(root.join(&name))
            .with_context(|| format!("{}: cannot remove old checkpoint", name))?;
    }
    Ok(())
}

/// The newest complete checkpoint of a run, if any.
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    let pointer = checkpoints_dir(run_dir).join("latest");
    if !pointer.exists() {
        return Ok(None);
    }
    let name = fsutil::read_string(&pointer)?.trim().to_string();
    ensure!(
        name.starts_with("step-") && !name.contains('/') && !name.contains(".."),
        "{}: does not name a checkpoint",
        pointer.display()
    );
    Ok(Some(checkpoints_dir(run_dir).join(name)))
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

fn save_optimizer(path: &Path, model: &Gpt, opt: &AdamW) -> Result<()> {
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (i, p) in model
        .params()
        .iter()
        .enumerate()
        .filter(|(_, p)| p.trainable)
    {
        let shape = p.tensor().shape();
        tensors.push((
            format!("m.{}", p.name),
            Tensor::from_slice(&opt.m[i], shape, &Device::Cpu)?,
        ));
        tensors.push((
            format!("v.{}", p.name),
            Tensor::from_slice(&opt.v[i], shape, &Device::Cpu)?,
        ));
    }
    let meta = HashMap::from([("adam_t".to_string(), opt.t.to_string())]);
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| anyhow!("serialising optimizer state: {e}"))?;
    fsutil::write_atomic(path, &bytes)
}

/// Loads AdamW moments saved by [`save`] into `opt` (shapes checked against `params`).
pub fn load_optimizer(path: &Path, params: &[&Param], opt: &mut AdamW, adam_t: u64) -> Result<()> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| anyhow!("{}: cannot read optimizer state: {e}", path.display()))?;
    for (i, p) in params.iter().enumerate().filter(|(_, p)| p.trainable) {
        for (kind, slot) in [("m", &mut opt.m[i]), ("v", &mut opt.v[i])] {
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
            *slot = t.flatten_all()?.to_vec1::<f32>()?;
        }
    }
    opt.t = adam_t;
    Ok(())
}

pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    serde_json::from_str(&fsutil::read_string(&path)?)
        .with_context(|| format!("{}: invalid trainer state", path.display()))
}
