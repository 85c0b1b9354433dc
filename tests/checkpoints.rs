//! Checkpoints that never lose work: exact resume, SIGKILL at random moments,
//! signals, the divergence guard, and corrupted files refused with one-line errors.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn data(tmp: &Path) -> PathBuf {
    prepare_char(tmp, 30_000)
}

const TINY: &[&str] = &[
    "--set",
    "block_size=16",
    "--set",
    "batch_size=4",
    "--set",
    "eval_batches=2",
    "--set",
    "warmup_steps=3",
    "--set",
    "lr=3e-3",
    "--set",
    "dropout=0.1",
    "--set",
    "sample_tokens=5",
    "--set",
    "keep_last=0",
];

fn train_args<'a>(data: &'a Path, run: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["train", "--data", s(data), "--out", s(run)];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(TINY);
    args.extend_from_slice(extra);
    args
}

fn final_bytes(run: &Path, step: usize) -> (Vec<u8>, Vec<u8>) {
    let dir = run.join(format!("checkpoints/step-{step:06}"));
    (
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        std::fs::read(dir.join("optimizer.safetensors")).unwrap(),
    )
}

/// The numbers of every metrics line (timings left out).
fn numbers(run: &Path) -> Vec<Vec<Value>> {
    metric_values(
        run,
        &["step", "loss", "lr", "grad_norm", "val_loss", "skipped"],
    )
}

#[test]
fn stopping_and_resuming_is_bit_identical_to_training_straight() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    // grad_accum 3, dropout on, evaluation every 4 steps; 12 steps straight.
    let common = [
        "--set",
        "grad_accum=3",
        "--set",
        "max_steps=12",
        "--set",
        "eval_every=4",
        "--set",
        "save_every=0",
    ];
    let straight = tmp.path().join("straight");
    ok(&train_args(&data, &straight, &common));
    let want = final_bytes(&straight, 12);

    for k in ["5", "8"] {
        // Step 8 is an evaluation step too: its val loss must not be logged twice.
        let run = tmp.path().join(format!("stop-{k}"));
        let out = ok(&train_args(
            &data,
            &run,
            &[&common[..], &["--stop-at-step", k]].concat(),
        ));
        assert!(
            out.contains(&format!("stopped after step {k}")) && out.contains("--resume"),
            "{out}"
        );
        assert_eq!(
            std::fs::read_to_string(run.join("checkpoints/latest")).unwrap(),
            format!("step-{:06}", k.parse::<usize>().unwrap())
        );
        ok(&["train", "--out", s(&run), "--resume"]);
        assert!(
            final_bytes(&run, 12) == want,
            "stop at {k}: weights or moments differ from the straight run"
        );
        assert_eq!(
            numbers(&run),
            numbers(&straight),
            "stop at {k}: metrics differ"
        );
    }
}

/// Starts (or resumes) training and kills it with SIGKILL after `after`.
fn run_and_kill(args: &[&str], after: Duration) -> Option<std::process::ExitStatus> {
    let mut child = bin()
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < after {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    None
}

#[test]
fn sigkill_at_random_moments_never_loses_a_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    // A checkpoint after every step, so kills land during saves as well as steps.
    let common = [
        "--set",
        "max_steps=200",
        "--set",
        "eval_every=10",
        "--set",
        "save_every=1",
        "--set",
        "keep_last=2",
    ];
    let straight = tmp.path().join("straight");
    ok(&train_args(&data, &straight, &common));

    let run = tmp.path().join("killed");
    let mut delays = [120u64, 250, 60, 400, 180, 330, 90, 500, 220, 150].into_iter();
    let mut kills = 0;
    loop {
        let resume = run.join("checkpoints/latest").exists();
        let mut args = train_args(&data, &run, &common);
        if resume {
            args.push("--resume");
        }
        let after = delays
            .next()
            .map_or(Duration::from_secs(120), Duration::from_millis);
        match run_and_kill(&args, after) {
            Some(status) => {
                assert!(status.success(), "run after {kills} kills failed");
                break;
            }
            None => kills += 1,
        }
        // Whatever moment the kill hit, the newest checkpoint loads completely.
        if let Some(dir) = lmforge::train::checkpoint::latest(&run).unwrap() {
            lmforge::model::hf::load(&dir, &candle_core::Device::Cpu).unwrap();
            lmforge::train::checkpoint::load_state(&dir).unwrap();
            lmforge::data::TextTokenizer::from_file(&dir.join("tokenizer.json")).unwrap();
        }
    }
    assert!(
        kills >= 3,
        "only {kills} kills landed before the run finished"
    );
    assert!(
        final_bytes(&run, 200) == final_bytes(&straight, 200),
        "weights after {kills} kills differ from the straight run"
    );
    assert_eq!(numbers(&run), numbers(&straight));
    // No temporaries left behind by the killed writers.
    for dir in [run.clone(), run.join("checkpoints")] {
        for e in std::fs::read_dir(dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(!name.contains("tmp-"), "stale temporary {name}");
        }
    }
}

fn send(signal: &str, pid: u32) {
    assert!(Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

/// Waits until the run has logged at least `lines` metrics lines.
fn wait_for_progress(run: &Path, lines: usize) {
    let t0 = Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
        < lines
    {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A training run that only a signal ends, its output sent to `stdio()`.
fn spawn_endless(
    data: &Path,
    run: &Path,
    save_every: &str,
    stdio: fn() -> Stdio,
) -> std::process::Child {
    let extra = [
        "--set",
        "max_steps=100000",
        "--set",
        "eval_every=0",
        "--set",
        save_every,
    ];
    bin()
        .args(train_args(data, run, &extra))
        .stdout(stdio())
        .stderr(stdio())
        .spawn()
        .unwrap()
}

#[test]
fn sigint_and_sigterm_save_and_exit_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    for signal in ["-INT", "-TERM"] {
        let run = tmp.path().join(format!("run{signal}"));
        let child = spawn_endless(&data, &run, "save_every=0", Stdio::piped);
        wait_for_progress(&run, 5);
        send(signal, child.id());
        let out = child.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{signal}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("resume with: lmforge train --out"),
            "{stdout}"
        );
        let dir = lmforge::train::checkpoint::latest(&run).unwrap().unwrap();
        let state = lmforge::train::checkpoint::load_state(&dir).unwrap();
        let last_logged = numbers(&run).last().unwrap()[0].as_u64().unwrap() as usize;
        assert_eq!(
            state.step, last_logged,
            "the checkpoint holds the last finished step"
        );
        assert!(stdout.contains(&format!("stopped after step {}", state.step)));
    }

    // A second SIGINT quits at once; whatever it interrupted, the last checkpoint loads.
    let run = tmp.path().join("twice");
    let child = spawn_endless(&data, &run, "save_every=3", Stdio::null);
    wait_for_progress(&run, 10);
    send("-INT", child.id());
    send("-INT", child.id());
    let out = child.wait_with_output().unwrap();
    assert!(
        matches!(out.status.code(), Some(130) | Some(0)),
        "{:?}",
        out.status
    );
    let dir = lmforge::train::checkpoint::latest(&run).unwrap().unwrap();
    lmforge::model::hf::load(&dir, &candle_core::Device::Cpu).unwrap();
    lmforge::train::checkpoint::load_state(&dir).unwrap();
}

#[test]
fn divergence_guard_skips_then_stops_keeping_the_last_good_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let run = tmp.path().join("run");
    // An absurd learning rate: the first update is finite, then the loss is not.
    let args = train_args(
        &data,
        &run,
        &[
            "--set",
            "lr=1e30",
            "--set",
            "warmup_steps=0",
            "--set",
            "max_steps=50",
            "--set",
            "save_every=1",
            "--set",
            "max_bad_steps=3",
            "--set",
            "eval_every=0",
        ],
    );
    let out = bin().args(&args).output().unwrap();
    let err = one_line_error(&out);
    assert!(
        err.contains("3 consecutive steps") && err.contains("step-000001"),
        "{err}"
    );
    let status: Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    assert_eq!(status["state"], "diverged");
    assert!(status["error"]
        .as_str()
        .unwrap()
        .contains("3 consecutive steps"));
    let lines = numbers(&run);
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0][5], Value::Bool(false));
    assert!(lines[1..]
        .iter()
        .all(|l| l[5] == Value::Bool(true) && l[1].is_null()));
    // No checkpoint was written during the bad run of steps.
    assert_eq!(
        std::fs::read_to_string(run.join("checkpoints/latest")).unwrap(),
        "step-000001"
    );
    assert!(!run.join("checkpoints/step-000002").exists());
}

#[test]
fn corrupted_checkpoint_files_are_refused_with_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let data = data(tmp.path());
    let good = tmp.path().join("good");
    ok(&train_args(
        &data,
        &good,
        &["--set", "max_steps=2", "--set", "eval_every=0"],
    ));
    let ckpt = good.join("checkpoints/step-000002");

    type Corruption = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Corruption, &str)> = vec![
        (
            "truncated weights",
            Box::new(|d: &Path| {
                let b = std::fs::read(d.join("model.safetensors")).unwrap();
                std::fs::write(d.join("model.safetensors"), &b[..b.len() / 2]).unwrap();
            }),
            "model.safetensors",
        ),
        (
            "garbage weights",
            Box::new(|d: &Path| {
                std::fs::write(
                    d.join("model.safetensors"),
                    b"\xff\xff\xff\xff\xff\xff\xff\x7fxx",
                )
                .unwrap()
            }),
            "model.safetensors",
        ),
        (
            "missing key",
            Box::new(|d: &Path| {
                let t = std::fs::read_to_string(d.join("config.json"))
                    .unwrap()
                    .replace("\"n_layer\"", "\"n_layers\"");
                std::fs::write(d.join("config.json"), t).unwrap();
            }),
            "n_layer",
        ),
        (
            "absurd size",
            Box::new(|d: &Path| {
                let mut v: Value =
                    serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap())
                        .unwrap();
                v["n_embd"] = Value::from(1u64 << 40);
                v["n_head"] = Value::from(1u64 << 20);
                std::fs::write(d.join("config.json"), v.to_string()).unwrap();
            }),
            "config.json",
        ),
        (
            "bad state",
            Box::new(|d: &Path| {
                std::fs::write(d.join("trainer_state.json"), "{\"step\": -1}").unwrap()
            }),
            "trainer_state.json",
        ),
        (
            "bad optimizer",
            Box::new(|d: &Path| {
                std::fs::write(d.join("optimizer.safetensors"), b"nonsense").unwrap()
            }),
            "optimizer.safetensors",
        ),
        (
            "bad tokenizer",
            Box::new(|d: &Path| std::fs::write(d.join("tokenizer.json"), "{}").unwrap()),
            "tokenizer.json",
        ),
        (
            "pointer escapes",
            Box::new(|d: &Path| {
                std::fs::write(d.parent().unwrap().join("latest"), "../../etc").unwrap()
            }),
            "latest",
        ),
    ];
    for (what, corrupt, names) in cases {
        let run = tmp.path().join(what.replace(' ', "-"));
        let dir = run.join("checkpoints/step-000002");
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(&ckpt).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        std::fs::write(run.join("checkpoints/latest"), "step-000002").unwrap();
        corrupt(&dir);
        let out = bin()
            .args(["train", "--out", s(&run), "--resume"])
            .output()
            .unwrap();
        let err = one_line_error(&out);
        assert!(err.contains(names), "{what}: {err}");
    }
}
