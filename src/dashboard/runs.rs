//! What the dashboard knows of the runs and sweeps under its root: found by walking
//! the root without following symlinks, read only through [`open_inside`] (so nothing
//! outside the root is ever read), and each run's metrics.jsonl read incrementally —
//! only the bytes appended since the last look.

use super::downsample::{Curve, Points};
use crate::sweep::{End, History};
use crate::train::checkpoint;
use crate::train::config::Metric;
use crate::train::status::{RunState, RunStatus};
use anyhow::{Context, Result};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

/// Buckets kept per curve: the most points a curve is ever sent with.
pub const CURVE_CAP: usize = 1024;
/// Malformed line numbers reported per run (the count is always exact).
const SKIPPED_SHOWN: usize = 20;
/// Steps the tokens/s and ETA figures average over.
const RECENT: usize = 20;
const MAX_DEPTH: usize = 8;

/// Opens `path` for reading only if it is a regular file inside `root` (a canonical
/// path): every symlink resolved first, then the last component opened without
/// following one, so neither `..`, a symlinked directory nor a symlinked file leads out.
pub fn open_inside(root: &Path, path: &Path) -> std::io::Result<File> {
    let real = path.canonicalize()?;
    if !real.starts_with(root) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{}: outside the dashboard's root", path.display()),
        ));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&real)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a regular file", path.display()),
        ));
    }
    Ok(file)
}

/// A small file inside `root`, whole (at most `limit` bytes, its tail if longer).
fn read_inside(root: &Path, path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut file = open_inside(root, path)?;
    let len = file.metadata()?.len();
    if len > limit {
        file.seek(SeekFrom::Start(len - limit))?;
    }
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Run,
    Sweep,
}

/// Run and sweep directories under `root`, by id (their path below the root, with `/`).
/// Symlinks are not followed, hidden directories and checkpoints are not entered.
pub fn discover(root: &Path) -> BTreeMap<String, (PathBuf, Kind)> {
    let mut found = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let (mut is_run, mut is_sweep) = (false, false);
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if kind.is_file() {
                is_run |= name == "metrics.jsonl" || name == "run.json";
                is_sweep |= name == "journal.jsonl";
            } else if kind.is_dir()
                && depth < MAX_DEPTH
                && !name.starts_with('.')
                && name != "checkpoints"
            {
                stack.push((entry.path(), depth + 1));
            }
        }
        let id = run_id(root, &dir);
        if is_sweep {
            found.insert(id, (dir, Kind::Sweep));
        } else if is_run {
            found.insert(id, (dir, Kind::Run));
        }
    }
    found
}

/// A directory's path below the root, with `/` (the root itself: its own name).
fn run_id(root: &Path, dir: &Path) -> String {
    let rel = dir.strip_prefix(root).unwrap_or(dir);
    let parts: Vec<_> = rel
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_string_lossy().into_owned()),
            _ => None,
        })
        .collect();
    match parts.is_empty() {
        true => root
            .file_name()
            .map_or(".".into(), |n| n.to_string_lossy().into_owned()),
        false => parts.join("/"),
    }
}

/// One metrics line's numbers (other values ignored), parsed without building a tree
/// and, where the key holds no escapes, without copying it.
struct Record<'a>(Vec<(Key<'a>, f64)>);

struct Key<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> Visitor<'de> for Text {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a key")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(Text)
    }
}

impl<'de> Deserialize<'de> for Record<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = Record<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Record<'de>, A::Error> {
                let mut out = Vec::with_capacity(16);
                while let Some(key) = map.next_key::<Key<'de>>()? {
                    if let Number(Some(v)) = map.next_value::<Number>()? {
                        out.push((key, v));
                    }
                }
                Ok(Record(out))
            }
        }
        d.deserialize_map(Fields)
    }
}

/// A JSON number, or `None` for any other value.
struct Number(Option<f64>);

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Any;
        impl<'de> Visitor<'de> for Any {
            type Value = Number;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON value")
            }
            fn visit_f64<E>(self, v: f64) -> Result<Number, E> {
                Ok(Number(Some(v)))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Number, E> {
                Ok(Number(Some(v as f64)))
            }
            fn visit_i64<E>(self, v: i64) -> Result<Number, E> {
                Ok(Number(Some(v as f64)))
            }
            fn visit_bool<E>(self, _: bool) -> Result<Number, E> {
                Ok(Number(None))
            }
            fn visit_unit<E>(self) -> Result<Number, E> {
                Ok(Number(None))
            }
            fn visit_str<E>(self, _: &str) -> Result<Number, E> {
                Ok(Number(None))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut s: A) -> Result<Number, A::Error> {
                while s.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Number(None))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Number, A::Error> {
                while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Number(None))
            }
        }
        d.deserialize_any(Any)
    }
}

/// A run as the runs table shows it.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct RunRow {
    pub id: String,
    pub status: &'static str,
    pub step: u64,
    pub max_steps: Option<u64>,
    /// The key of the metric the run is judged by, whether lower is better, and its best.
    pub metric: String,
    pub lower_is_better: bool,
    pub best: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub eta_s: Option<f64>,
    pub elapsed_s: f64,
    /// Metrics lines read; changes whenever the curves do.
    pub lines: usize,
    pub skipped_lines: Vec<usize>,
    pub skipped_count: usize,
    pub error: Option<String>,
}

/// A run's metrics, as far as they have been read.
pub struct RunLog {
    pub id: String,
    dir: PathBuf,
    file: Option<(u64, u64)>,
    offset: u64,
    partial: Vec<u8>,
    lines: usize,
    skipped: Vec<usize>,
    skipped_count: usize,
    curves: BTreeMap<String, Curve>,
    step: u64,
    elapsed: f64,
    recent: VecDeque<(f64, f64)>,
}

impl RunLog {
    pub fn new(id: String, dir: PathBuf) -> Self {
        RunLog {
            id,
            dir,
            file: None,
            offset: 0,
            partial: Vec::new(),
            lines: 0,
            skipped: Vec::new(),
            skipped_count: 0,
            curves: BTreeMap::new(),
            step: 0,
            elapsed: 0.0,
            recent: VecDeque::new(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn lines(&self) -> usize {
        self.lines
    }

    /// Reads what was appended to metrics.jsonl since the last call; a file that was
    /// replaced or shrank (a resumed run rewrites it) is read again from the start.
    pub fn refresh(&mut self, root: &Path) -> std::io::Result<()> {
        let mut file = match open_inside(root, &self.dir.join("metrics.jsonl")) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let identity = (meta.dev(), meta.ino());
        if self.file != Some(identity) || meta.len() < self.offset {
            *self = RunLog::new(std::mem::take(&mut self.id), std::mem::take(&mut self.dir));
            self.file = Some(identity);
        }
        if meta.len() == self.offset {
            return Ok(());
        }
        file.seek(SeekFrom::Start(self.offset))?;
        // In pieces, so a large log never sits in memory whole.
        let mut piece = vec![0u8; 4 << 20];
        let mut reader = file.take(meta.len() - self.offset);
        loop {
            let n = reader.read(&mut piece)?;
            if n == 0 {
                return Ok(());
            }
            self.offset += n as u64;
            self.feed(&piece[..n]);
        }
    }

    /// Takes the next bytes of the file: complete lines are parsed, a partial last line
    /// waits for the rest.
    pub fn feed(&mut self, bytes: &[u8]) {
        let Some(end) = bytes.iter().rposition(|&b| b == b'\n') else {
            self.partial.extend_from_slice(bytes);
            return;
        };
        let mut complete = Some(&bytes[..end]);
        // The line the last read left unfinished, completed by these bytes.
        if let Some(text) = complete.filter(|_| !self.partial.is_empty()) {
            let first = text.iter().position(|&b| b == b'\n');
            let mut line = std::mem::take(&mut self.partial);
            line.extend_from_slice(&text[..first.unwrap_or(text.len())]);
            self.line(&line);
            complete = first.map(|i| &text[i + 1..]);
        }
        for line in complete.into_iter().flat_map(|t| t.split(|&b| b == b'\n')) {
            self.line(line);
        }
        self.partial = bytes[end + 1..].to_vec();
    }

    fn line(&mut self, line: &[u8]) {
        self.lines += 1;
        // A blank line holds nothing to skip.
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let taken = serde_json::from_slice::<Record>(line).is_ok_and(|r| self.take(r));
        if !taken {
            self.skipped_count += 1;
            if self.skipped.len() < SKIPPED_SHOWN {
                self.skipped.push(self.lines);
            }
        }
    }

    /// Adds one record's numbers to the curves; a record without a step is refused.
    fn take(&mut self, Record(fields): Record) -> bool {
        let get = |k: &str| fields.iter().find(|(key, _)| key.0 == k).map(|(_, v)| *v);
        let Some(step) = get("step").filter(|s| *s >= 0.0 && s.fract() == 0.0) else {
            return false;
        };
        let step = step as u64;
        // Logs from before elapsed_s was written on every step: sum the step times.
        self.elapsed = match get("elapsed_s") {
            Some(t) => t,
            None => self.elapsed + get("ms_per_step").unwrap_or(0.0) / 1e3,
        };
        self.step = self.step.max(step);
        if let (Some(ms), Some(tok_s)) = (get("ms_per_step"), get("tokens_per_s")) {
            if self.recent.len() == RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back((ms, tok_s));
        }
        for (Key(key), value) in fields {
            if key == "step" || key == "elapsed_s" {
                continue;
            }
            match self.curves.get_mut(key.as_ref()) {
                Some(curve) => curve.push(step, self.elapsed, value),
                None => {
                    let mut curve = Curve::new(CURVE_CAP);
                    curve.push(step, self.elapsed, value);
                    self.curves.insert(key.into_owned(), curve);
                }
            }
        }
        true
    }

    /// The curves `keys` names (all when `None`), at most `points` points each.
    pub fn curves(&self, points: usize, keys: Option<&[&str]>) -> BTreeMap<String, Points> {
        self.curves
            .iter()
            .filter(|(k, _)| keys.is_none_or(|keys| keys.contains(&k.as_str())))
            .map(|(k, c)| (k.clone(), c.points(points)))
            .collect()
    }

    pub fn row(&self, root: &Path) -> RunRow {
        let status = run_status(root, &self.dir);
        let (state, max_steps, config, error) = match &status {
            Ok(s) => (
                Some(s.state),
                Some(s.max_steps as u64),
                Some(&s.config),
                s.error.clone(),
            ),
            Err(_) => (None, None, None, None),
        };
        let metric = config
            .and_then(|c| c["metric"].as_str())
            .and_then(|m| Metric::parse(m).ok())
            .unwrap_or(Metric::ValLoss);
        let lower_is_better = metric.better(0.0, 1.0);
        let key = metric.record_key();
        let best = self.curves.get(&key).and_then(|c| {
            let extremes = c.buckets().iter().map(|b| match lower_is_better {
                true => b.min,
                false => -b.max,
            });
            let best = extremes.fold(f64::INFINITY, f64::min);
            best.is_finite()
                .then_some(if lower_is_better { best } else { -best })
        });
        let n = self.recent.len() as f64;
        let tokens_per_s = (n > 0.0).then(|| self.recent.iter().map(|r| r.1).sum::<f64>() / n);
        let ms_per_step = self.recent.iter().map(|r| r.0).sum::<f64>() / n;
        let eta_s = match (state, max_steps) {
            (Some(RunState::Running), Some(max)) if n > 0.0 => {
                Some(max.saturating_sub(self.step) as f64 * ms_per_step / 1e3)
            }
            _ => None,
        };
        RunRow {
            id: self.id.clone(),
            status: match state {
                Some(RunState::Running) => "running",
                Some(RunState::Finished) => "finished",
                Some(RunState::Stopped) => "stopped",
                Some(RunState::Diverged) => "diverged",
                None => "unknown",
            },
            step: self.step,
            max_steps,
            metric: key,
            lower_is_better,
            best,
            tokens_per_s,
            eta_s,
            elapsed_s: self.elapsed,
            lines: self.lines,
            skipped_lines: self.skipped.clone(),
            skipped_count: self.skipped_count,
            error,
        }
    }
}

/// run.json, or for a run from before it existed, what its latest checkpoint says.
fn run_status(root: &Path, dir: &Path) -> Result<RunStatus> {
    match read_inside(root, &RunStatus::path(dir), 1 << 20) {
        Ok(bytes) => {
            let mut status: RunStatus = serde_json::from_slice(&bytes)?;
            status.state = status.current_state();
            return Ok(status);
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e.into()),
        Err(_) => {}
    }
    let pointer = read_inside(root, &checkpoint::latest_pointer(dir), 256)?;
    let latest = checkpoint::pointed(dir, &String::from_utf8_lossy(&pointer))?;
    // As JSON, not a TrainerState: a run of another version still shows.
    let state: Value = serde_json::from_slice(&read_inside(
        root,
        &latest.join(checkpoint::STATE_FILE),
        1 << 20,
    )?)?;
    let step = state["step"].as_u64().context("no step")?;
    let max_steps = state["config"]["max_steps"]
        .as_u64()
        .context("no max_steps")?;
    Ok(RunStatus {
        state: match step >= max_steps {
            true => RunState::Finished,
            false => RunState::Stopped,
        },
        pid: 0,
        host: String::new(),
        started_at: 0.0,
        ended_at: None,
        start_step: 0,
        max_steps: max_steps as usize,
        error: None,
        config: state["config"].clone(),
    })
}

/// A run's resolved config (`null` if it has none yet).
pub fn config(root: &Path, dir: &Path) -> Value {
    run_status(root, dir).map_or(Value::Null, |s| s.config)
}

/// The keys (dotted for nested tables) whose values differ between two configs.
pub fn config_diff(a: &Value, b: &Value) -> Vec<(String, Value, Value)> {
    fn flatten(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    let key = match prefix {
                        "" => k.clone(),
                        p => format!("{p}.{k}"),
                    };
                    flatten(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let (mut fa, mut fb) = (BTreeMap::new(), BTreeMap::new());
    flatten("", a, &mut fa);
    flatten("", b, &mut fb);
    let keys: std::collections::BTreeSet<_> = fa.keys().chain(fb.keys()).cloned().collect();
    keys.into_iter()
        .filter_map(|k| {
            let (x, y) = (
                fa.get(&k).cloned().unwrap_or(Value::Null),
                fb.get(&k).cloned().unwrap_or(Value::Null),
            );
            (x != y).then_some((k, x, y))
        })
        .collect()
}

/// The last `n` samples a run wrote at its evaluations (malformed lines skipped).
pub fn samples(root: &Path, dir: &Path, n: usize) -> Vec<Value> {
    let Ok(bytes) = read_inside(root, &dir.join("samples.jsonl"), 1 << 20) else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut out: Vec<Value> = text
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["step"].is_u64() && v["text"].is_string())
        .take(n)
        .collect();
    out.reverse();
    out
}

/// A sweep's trials as its journal records them.
pub fn sweep(root: &Path, id: &str, dir: &Path) -> Result<Value> {
    // The journal is read through the same root check as every other file.
    open_inside(root, &dir.join("journal.jsonl"))
        .with_context(|| format!("{id}: cannot read its journal"))?;
    let history = History::read(dir)?;
    let trials: Vec<Value> = history
        .trials
        .iter()
        .map(|t| {
            let (state, value, step, error) = match &t.end {
                None => ("running", None, None, None),
                Some(End::Finished { step, value }) => {
                    ("finished", Some(*value), Some(*step), None)
                }
                Some(End::Pruned { step, value }) => ("pruned", Some(*value), Some(*step), None),
                Some(End::Failed(e)) => ("failed", None, None, Some(e.clone())),
            };
            json!({
                "trial": t.id, "params": t.params, "state": state, "value": value,
                "step": step, "rungs": t.rungs, "error": error,
                "run": run_id(root, &crate::sweep::trial_dir(dir, t.id)),
            })
        })
        .collect();
    Ok(json!({
        "id": id,
        "metric": history.spec.metric_key(),
        "goal": history.spec.goal.name(),
        "run_cap": history.spec.run_cap,
        "trials": trials,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log_of(text: &str) -> RunLog {
        let mut log = RunLog::new("r".into(), PathBuf::new());
        log.feed(text.as_bytes());
        log
    }

    #[test]
    fn byte_chunks_read_like_one_read() {
        let mut text = String::new();
        for step in 1..=300 {
            text.push_str(&format!(
                "{{\"step\":{step},\"loss\":{},\"lr\":0.001,\"skipped\":false,\"elapsed_s\":{}}}\n",
                3.0 / step as f64,
                step as f64 * 0.01
            ));
            if step % 50 == 0 {
                text.push_str(&format!(
                    "{{\"step\":{step},\"val_loss\":{}}}\n",
                    2.0 / step as f64
                ));
            }
        }
        let whole = log_of(&text);
        let mut pieces = RunLog::new("r".into(), PathBuf::new());
        for chunk in text.as_bytes().chunks(37) {
            pieces.feed(chunk);
        }
        assert_eq!(whole.lines, 306);
        assert_eq!(pieces.lines, whole.lines);
        assert_eq!(pieces.curves(100, None), whole.curves(100, None));
        assert_eq!(whole.curves(10_000, None)["val_loss"].mean.len(), 6);
        assert_eq!(whole.step, 300);
    }

    #[test]
    fn malformed_lines_are_counted_and_skipped() {
        let log = log_of(
            "{\"step\":1,\"loss\":2.5}\nnot json\n{\"loss\":1}\n\n{\"step\":2,\"loss\":NaN}\n{\"step\":3,\"loss\":2.0,\"note\":\"x\",\"v\":[1,{\"a\":2}]}\n",
        );
        assert_eq!(log.skipped, vec![2, 3, 5]);
        assert_eq!(log.skipped_count, 3);
        assert_eq!(log.curves(10, None)["loss"].mean, vec![2.5, 2.0]);
        assert_eq!(log.step, 3);
    }

    #[test]
    fn a_partial_last_line_waits() {
        let mut log = log_of("{\"step\":1,\"loss\":2.5}\n{\"step\":2,\"lo");
        assert_eq!(log.lines, 1);
        log.feed(b"ss\":2.25}\n");
        assert_eq!(log.lines, 2);
        assert_eq!(log.curves(10, None)["loss"].mean, vec![2.5, 2.25]);
    }

    #[test]
    fn a_root_that_is_itself_a_run_is_named_after_its_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("my-run");
        std::fs::create_dir_all(root.join("checkpoints/step-000010")).unwrap();
        std::fs::write(root.join("metrics.jsonl"), "").unwrap();
        std::fs::write(root.join("checkpoints/step-000010/metrics.jsonl"), "").unwrap();
        let found = discover(&root);
        assert_eq!(found.keys().collect::<Vec<_>>(), ["my-run"]);
        assert_eq!(found["my-run"], (root, Kind::Run));
    }

    #[test]
    fn config_diff_lists_changed_added_and_removed_keys() {
        let a = json!({"lr": 0.001, "n_layer": 4, "nested": {"x": 1, "y": 2}, "only_a": true});
        let b = json!({"lr": 0.002, "n_layer": 4, "nested": {"x": 1, "y": 3}, "only_b": "z"});
        let diff = config_diff(&a, &b);
        let keys: Vec<_> = diff.iter().map(|d| d.0.as_str()).collect();
        assert_eq!(keys, ["lr", "nested.y", "only_a", "only_b"]);
        assert_eq!(diff[0].1, json!(0.001));
        assert_eq!(diff[3].1, Value::Null);
        assert!(config_diff(&a, &a).is_empty());
    }
}
