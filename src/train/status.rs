//! `run.json`: what a run is doing, for the dashboard — running (with the process that
//! trains it), finished, stopped or diverged — and the config it resolved to. Written
//! atomically when training starts and again when it ends, however it ends.

use super::TrainConfig;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    /// Reached max_steps, or its patience ran out.
    Finished,
    /// Interrupted (signal, `--stop-at-step`, a sweep's rung) or failed: resumable.
    Stopped,
    /// Stopped by the divergence guard: too many non-finite steps in a row.
    Diverged,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct RunStatus {
    pub state: RunState,
    /// The training process while running; the dashboard calls a running run whose
    /// process is gone stopped.
    pub pid: u32,
    pub host: String,
    /// Unix seconds.
    pub started_at: f64,
    pub ended_at: Option<f64>,
    pub start_step: usize,
    pub max_steps: usize,
    /// Why a run stopped, when it failed.
    pub error: Option<String>,
    /// Kept as JSON so a dashboard reads runs of other versions.
    pub config: serde_json::Value,
}

/// The error the divergence guard stops a run with.
#[derive(Debug)]
pub struct Diverged(pub String);

impl fmt::Display for Diverged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Diverged {}

impl RunStatus {
    pub fn path(run_dir: &Path) -> PathBuf {
        run_dir.join("run.json")
    }

    /// Records that training of `cfg` starts at `start_step`.
    pub fn begin(run_dir: &Path, cfg: &TrainConfig, start_step: usize) -> Result<Self> {
        let status = RunStatus {
            state: RunState::Running,
            pid: std::process::id(),
            host: hostname(),
            started_at: unix_now(),
            ended_at: None,
            start_step,
            max_steps: cfg.max_steps,
            error: None,
            config: serde_json::to_value(cfg)?,
        };
        status.write(run_dir)?;
        Ok(status)
    }

    /// Records how training ended: `stopped_early` says whether a finished loop was
    /// interrupted; an error is a divergence or a failure.
    pub fn end(mut self, run_dir: &Path, outcome: Result<bool, &anyhow::Error>) -> Result<()> {
        (self.state, self.error) = match outcome {
            Ok(false) => (RunState::Finished, None),
            Ok(true) => (RunState::Stopped, None),
            Err(e) if e.is::<Diverged>() => (RunState::Diverged, Some(e.to_string())),
            Err(e) => (RunState::Stopped, Some(format!("{e:#}"))),
        };
        self.ended_at = Some(unix_now());
        self.write(run_dir)
    }

    fn write(&self, run_dir: &Path) -> Result<()> {
        crate::fsutil::write_atomic(
            &Self::path(run_dir),
            serde_json::to_string_pretty(self)?.as_bytes(),
        )
    }

    /// The state as seen now: a run that says it is running on this host but whose
    /// process has gone (killed, power lost) is stopped.
    pub fn current_state(&self) -> RunState {
        if self.state == RunState::Running && self.host == hostname() && !process_alive(self.pid) {
            RunState::Stopped
        } else {
            self.state
        }
    }
}

pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // Signal 0 checks existence; EPERM means it exists under another user.
    // SAFETY: kill with signal 0 sends nothing.
    let exists = unsafe { libc::kill(pid, 0) == 0 || *libc::__errno_location() == libc::EPERM };
    // A killed process its parent has not reaped yet is a zombie: gone all the same.
    let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
    });
    exists && !zombie
}
