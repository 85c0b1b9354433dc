//! `lmforge sweep`: trials as child runs, ASHA pruning, the journal and resume, the
//! report (table, sweep.md, best.toml, plots), confirmation, and bad sweep files.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A one-layer model a trial trains in a fraction of a second.
const TINY: &[&str] = &[
    "--set",
    "n_layer=1",
    "--set",
    "n_embd=16",
    "--set",
    "n_head=2",
    "--set",
    "block_size=16",
    "--set",
    "batch_size=4",
    "--set",
    "eval_batches=2",
    "--set",
    "sample_tokens=0",
    "--set",
    "warmup_steps=2",
    "--set",
    "keep_last=1",
];

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn journal(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("journal.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn events<'a>(journal: &'a [Value], kind: &str) -> Vec<&'a Value> {
    journal.iter().filter(|e| e["event"] == kind).collect()
}

fn trial_dir(out: &Path, id: u64) -> PathBuf {
    out.join(format!("trials/trial-{id:03}"))
}

/// The metric a run's metrics.jsonl recorded at `step`.
fn val_loss_at(run: &Path, step: u64) -> f64 {
    metrics(run)
        .iter()
        .rev()
        .find(|m| m["step"] == step && m.get("val_loss").is_some())
        .unwrap_or_else(|| panic!("{}: no val_loss at {step}", run.display()))["val_loss"]
        .as_f64()
        .unwrap()
}

fn sweep_args<'a>(
    spec: &'a Path,
    out: &'a Path,
    data: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut args = vec![
        "sweep",
        "--config",
        s(spec),
        "--out",
        s(out),
        "--data",
        s(data),
    ];
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    args
}

fn log_sizes(out: &Path) -> Vec<u64> {
    let mut dirs: Vec<_> = std::fs::read_dir(out.join("trials"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    dirs.sort();
    dirs.iter()
        .map(|d| std::fs::metadata(d.join("train.log")).unwrap().len())
        .collect()
}

const ASHA: &str = r#"
method = "random"
run_cap = 8
seed = 3
metric = {name = "val_loss", goal = "minimize"}
[parameters]
lr = {min = 1e-4, max = 3e-2, distribution = "log_uniform_values"}
batch_size = {min = 2, max = 6}
dropout = {values = [0.0, 0.1]}
[early_terminate]
type = "asha"
min_resource = 4
reduction_factor = 2
"#;

#[test]
fn asha_sweep_prunes_journals_reports_and_resumes_without_rerunning() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 20_000);
    let spec = write(tmp.path(), "sweep.toml", ASHA);
    let out = tmp.path().join("sweep");
    let budget = ["--set", "max_steps=16", "--set", "eval_every=4"];
    let stdout = ok(&sweep_args(&spec, &out, &data, &budget));
    let j = journal(&out);
    assert_eq!(j[0]["event"], "sweep");
    let started = events(&j, "started");
    assert_eq!(started.len(), 8);
    let (finished, pruned) = (events(&j, "finished"), events(&j, "pruned"));
    assert_eq!(finished.len() + pruned.len(), 8, "every trial ends once");
    assert!(
        !pruned.is_empty() && !finished.is_empty(),
        "{} pruned",
        pruned.len()
    );
    // Every parameter inside its domain.
    for e in &started {
        let p = &e["params"];
        assert!((1e-4..=3e-2).contains(&p["lr"].as_f64().unwrap()));
        assert!((2..=6).contains(&p["batch_size"].as_i64().unwrap()));
        assert!([0.0, 0.1].contains(&p["dropout"].as_f64().unwrap()));
    }
    // Journal values are the runs' own metrics; pruned runs stopped at their rung.
    for e in finished.iter().chain(&pruned) {
        let run = trial_dir(&out, e["trial"].as_u64().unwrap());
        let step = e["step"].as_u64().unwrap();
        assert_eq!(e["value"].as_f64().unwrap(), val_loss_at(&run, step));
        let last = metrics(&run).last().unwrap()["step"].as_u64().unwrap();
        assert_eq!(last, step, "{}: trained past its end", run.display());
    }
    // ASHA's rule: a pruned trial was not the best to reach its rung before it.
    for (i, e) in j.iter().enumerate().filter(|(_, e)| e["event"] == "pruned") {
        let step = &e["step"];
        let earlier: Vec<f64> = j[..i]
            .iter()
            .filter(|x| (x["event"] == "promoted" || x["event"] == "pruned") && &x["step"] == step)
            .map(|x| x["value"].as_f64().unwrap())
            .collect();
        let v = e["value"].as_f64().unwrap();
        assert!(
            earlier.iter().any(|&b| b < v),
            "pruned {v} at {step} though best"
        );
    }
    assert!(pruned
        .iter()
        .all(|e| [4, 8].contains(&e["step"].as_u64().unwrap())));

    // The table: best first, then pruned.
    let md = std::fs::read_to_string(out.join("sweep.md")).unwrap();
    let statuses: Vec<&str> = md
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| rank"))
        .map(|l| l.split(" | ").nth(2).unwrap())
        .collect();
    assert_eq!(statuses.len(), 8);
    let first_pruned = statuses.iter().position(|s| *s == "pruned").unwrap();
    assert!(statuses[..first_pruned].iter().all(|s| *s == "finished"));
    assert!(statuses[first_pruned..].iter().all(|s| *s == "pruned"));
    let best = finished
        .iter()
        .min_by(|a, b| {
            a["value"]
                .as_f64()
                .unwrap()
                .total_cmp(&b["value"].as_f64().unwrap())
        })
        .unwrap();
    assert!(
        stdout.contains(&format!("best: trial {} with val_loss", best["trial"])),
        "{stdout}"
    );
    for png in [
        "metric-vs-trial.png",
        "metric-vs-lr.png",
        "metric-vs-batch_size.png",
    ] {
        let bytes = std::fs::read(out.join(png)).unwrap();
        assert_eq!(&bytes[1..4], b"PNG", "{png}");
    }
    // best.toml trains the best trial again, in one go, to the same loss (the trial ran
    // in segments between rungs: resume is exact).
    let best_run = tmp.path().join("best-run");
    ok(&[
        "train",
        "--config",
        s(&out.join("best.toml")),
        "--out",
        s(&best_run),
    ]);
    assert_eq!(val_loss_at(&best_run, 16), best["value"].as_f64().unwrap());

    // Rerunning the same command trains nothing.
    let sizes = log_sizes(&out);
    ok(&sweep_args(&spec, &out, &data, &budget));
    assert_eq!(journal(&out), j);
    assert_eq!(log_sizes(&out), sizes);
    // A trial that ended but was not journaled (killed in between) is settled from its
    // checkpoint, without training.
    let last_end = j.iter().rposition(|e| e["event"] == "finished").unwrap();
    let mut lines: Vec<String> = j.iter().map(|e| e.to_string()).collect();
    lines.remove(last_end);
    std::fs::write(out.join("journal.jsonl"), lines.join("\n") + "\n").unwrap();
    ok(&sweep_args(&spec, &out, &data, &budget));
    assert_eq!(events(&journal(&out), "finished").len(), finished.len());
    assert_eq!(log_sizes(&out), sizes);
    // A larger run_cap extends the sweep by exactly the new trials.
    std::fs::write(&spec, ASHA.replace("run_cap = 8", "run_cap = 10")).unwrap();
    ok(&sweep_args(&spec, &out, &data, &budget));
    let j2 = journal(&out);
    assert_eq!(events(&j2, "started").len(), 10);
    assert_eq!(&log_sizes(&out)[..8], &sizes[..]);
    // Another search in the same directory is refused.
    std::fs::write(&spec, ASHA.replace("seed = 3", "seed = 4")).unwrap();
    let e = fails(&sweep_args(&spec, &out, &data, &budget));
    assert!(
        e.contains("journal.jsonl") && e.contains("different sweep"),
        "{e}"
    );
}

#[test]
fn interrupted_sweep_continues_to_the_same_results() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 20_000);
    let spec = write(
        tmp.path(),
        "sweep.toml",
        ASHA.replace("run_cap = 8", "run_cap = 5")
            .split("[early_terminate]")
            .next()
            .unwrap(),
    );
    let budget = [
        "--set",
        "max_steps=150",
        "--set",
        "eval_every=50",
        "--set",
        "save_every=10",
    ];
    let reference = tmp.path().join("reference");
    ok(&sweep_args(&spec, &reference, &data, &budget));

    let out = tmp.path().join("interrupted");
    let child = bin()
        .args(sweep_args(&spec, &out, &data, &budget))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let journal_path = out.join("journal.jsonl");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::fs::read_to_string(&journal_path).map_or(0, |t| t.matches("\"started\"").count()) < 2
    {
        assert!(std::time::Instant::now() < deadline, "sweep did not start");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let stopped = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&stopped.stderr);
    assert!(
        !stopped.status.success() && stderr.contains("rerun the same command"),
        "{stderr}"
    );
    assert!(events(&journal(&out), "finished").len() < 5);

    ok(&sweep_args(&spec, &out, &data, &budget));
    let (a, b) = (journal(&reference), journal(&out));
    let ends = |j: &[Value]| {
        let mut v: Vec<(u64, f64)> = events(j, "finished")
            .iter()
            .map(|e| (e["trial"].as_u64().unwrap(), e["value"].as_f64().unwrap()))
            .collect();
        v.sort_by_key(|p| p.0);
        v
    };
    assert_eq!(events(&b, "started").len(), 5, "no trial started twice");
    assert_eq!(ends(&a), ends(&b));
}

#[test]
fn grid_sweep_records_failed_trials_and_confirms_over_seeds() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 20_000);
    // lr below min_lr is refused by train: those trials fail, the sweep goes on.
    let spec = write(
        tmp.path(),
        "grid.toml",
        "method = \"grid\"\nmetric = {name = \"val_loss\"}\n[parameters]\nlr = {values = [3e-3, 1e-5]}\ndropout = {values = [0.0, 0.1]}\n",
    );
    let out = tmp.path().join("grid");
    let stdout = ok(&sweep_args(
        &spec,
        &out,
        &data,
        &[
            "--set",
            "max_steps=8",
            "--set",
            "min_lr=1e-4",
            "--parallel",
            "2",
            "--confirm",
            "2",
        ],
    ));
    let j = journal(&out);
    let mut points: Vec<String> = events(&j, "started")
        .iter()
        .map(|e| format!("{}/{}", e["params"]["lr"], e["params"]["dropout"]))
        .collect();
    points.sort();
    assert_eq!(
        points,
        vec!["0.00001/0.0", "0.00001/0.1", "0.003/0.0", "0.003/0.1"]
    );
    let failed = events(&j, "failed");
    assert_eq!(failed.len(), 2);
    for f in &failed {
        assert!(f["error"].as_str().unwrap().contains("min_lr"), "{f}");
    }
    assert!(
        stdout.contains("failed: ") && stdout.contains("2 finished, 0 pruned, 2 failed"),
        "{stdout}"
    );
    // Confirmation: the best config and the base config over 2 fresh seeds.
    let confirmed = events(&j, "confirmed");
    assert_eq!(confirmed.len(), 4);
    let mut best = Vec::new();
    let mut base = Vec::new();
    for c in &confirmed {
        let seed = c["seed"].as_u64().unwrap();
        assert!([1338, 1339].contains(&seed));
        let dir = match c["trial"].as_u64() {
            Some(t) => {
                best.push(c["value"].as_f64().unwrap());
                out.join(format!("confirm/trial-{t:03}-seed-{seed}"))
            }
            None => {
                base.push(c["value"].as_f64().unwrap());
                out.join(format!("confirm/base-seed-{seed}"))
            }
        };
        assert_eq!(c["value"].as_f64().unwrap(), val_loss_at(&dir, 8));
    }
    let mean_sd = |v: &[f64]| {
        let m = (v[0] + v[1]) / 2.0;
        (m, ((v[0] - m).powi(2) + (v[1] - m).powi(2)).sqrt())
    };
    let ((bm, bs), (m, sd)) = (mean_sd(&best), mean_sd(&base));
    let line = format!("best config val_loss {bm:.4} ± {bs:.4}, base config {m:.4} ± {sd:.4}");
    assert!(stdout.contains(&line), "{line}\n{stdout}");
}

#[test]
fn bayes_sweep_runs_tpe_after_its_random_startup() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 20_000);
    let spec = write(
        tmp.path(),
        "tpe.toml",
        "method = \"bayes\"\nrun_cap = 13\nmetric = {name = \"val_loss\"}\n[parameters]\nlr = {min = 1e-4, max = 3e-2, distribution = \"log_uniform_values\"}\nwarmup_steps = {min = 0, max = 4}\n",
    );
    let out = tmp.path().join("tpe");
    ok(&sweep_args(
        &spec,
        &out,
        &data,
        &["--set", "max_steps=6", "--parallel", "2"],
    ));
    let j = journal(&out);
    let started = events(&j, "started");
    assert_eq!(started.len(), 13);
    assert_eq!(events(&j, "finished").len(), 13);
    for e in &started {
        assert!((1e-4..=3e-2).contains(&e["params"]["lr"].as_f64().unwrap()));
        assert!((0..=4).contains(&e["params"]["warmup_steps"].as_i64().unwrap()));
    }
}

#[test]
fn bad_sweep_files_get_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 5_000);
    let cases = [
        ("[parameters]\nlearning_rate = {values = [1]}", "parameters.learning_rate: not a train key"),
        ("[parameters]\nlr = {values = []}", "parameters.lr: empty search space"),
        ("[parameters]\nlr = {min = 0.1, max = 0.01}", "parameters.lr: empty search space"),
        ("[parameters]\n", "[parameters] is empty"),
        ("[parameters]\nlr = {values = [\"fast\"]}", "parameters.lr: --set lr=fast: expected a number"),
        ("[parameters]\nlr = {values = [1e-3]}\n[early_terminate]\ntype = \"asha\"\nmin_resource = 3", "min_resource 3 must be a multiple of eval_every"),
        ("[parameters]\nlr = {values = [1e-3]}\n[early_terminate]\ntype = \"hyperband2\"\nmin_resource = 250", "early_terminate.type"),
        ("budget = 3\n[parameters]\nlr = {values = [1e-3]}", "unknown field `budget`"),
    ];
    for (body, says) in cases {
        let text =
            format!("method = \"random\"\nrun_cap = 2\nmetric = {{name = \"val_loss\"}}\n{body}\n");
        let spec = write(tmp.path(), "bad.toml", &text);
        let e = fails(&sweep_args(&spec, &tmp.path().join("out"), &data, &[]));
        assert!(e.contains("bad.toml") && e.contains(says), "{body}: {e}");
    }
    let spec = write(tmp.path(), "acc.toml", "method = \"random\"\nrun_cap = 2\nmetric = {name = \"accuracy\"}\n[parameters]\nlr = {values = [1e-3]}\n");
    let e = fails(&sweep_args(&spec, &tmp.path().join("out"), &data, &[]));
    assert!(
        e.contains("acc.toml") && e.contains("metric.name accuracy"),
        "{e}"
    );
    let spec = write(tmp.path(), "rand.toml", "method = \"random\"\nmetric = {name = \"val_loss\"}\n[parameters]\nlr = {values = [1e-3]}\n");
    let e = fails(&sweep_args(&spec, &tmp.path().join("out"), &data, &[]));
    assert!(e.contains("run_cap is required"), "{e}");
    let e = fails(&[
        "sweep",
        "--config",
        s(&tmp.path().join("missing.toml")),
        "--out",
        s(&tmp.path().join("o")),
    ]);
    assert!(e.contains("missing.toml"), "{e}");
}
