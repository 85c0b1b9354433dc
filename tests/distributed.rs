//! Data-parallel training under `mpirun` (feature `mpi`): N ranks equal one process
//! with N times the batch, with and without ZeRO-1; checkpoints are rank-independent;
//! a hung rank ends the job with a timeout instead of a hang.
#![cfg(feature = "mpi")]

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn mpirun(np: usize, args: &[&str]) -> Command {
    let mut c = Command::new("mpirun");
    c.args([
        "--oversubscribe",
        "--allow-run-as-root",
        "-np",
        &np.to_string(),
        env!("CARGO_BIN_EXE_lmforge"),
    ])
    .args(args)
    .env("RUST_LOG", "warn")
    .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    c
}

fn ok_mpi(np: usize, args: &[&str]) -> Output {
    let out = mpirun(np, args).output().unwrap();
    assert!(
        out.status.success(),
        "mpirun -np {np} {args:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn losses(run: &Path) -> Vec<f64> {
    metrics(run)
        .iter()
        .filter_map(|l| l["loss"].as_f64())
        .collect()
}

fn assert_close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= 1e-5,
            "{what}: step {} loss {x} vs {y}",
            i + 1
        );
    }
}

fn args<'a>(data: &'a Path, run: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut a = vec!["train", "--data", s(data), "--out", s(run)];
    a.extend_from_slice(TINY_MODEL);
    a.extend_from_slice(&[
        "--set",
        "block_size=32",
        "--set",
        "eval_every=10",
        "--set",
        "eval_batches=2",
        "--set",
        "sample_tokens=5",
    ]);
    a.extend_from_slice(extra);
    a
}

#[test]
fn two_ranks_equal_one_process_with_twice_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 30_000);
    for (name, accum, zero) in [
        ("plain", "1", "0"),
        ("accum", "2", "0"),
        ("zero1", "1", "1"),
        ("zero1-accum", "2", "1"),
    ] {
        let single = tmp.path().join(format!("{name}-1"));
        let double = tmp.path().join(format!("{name}-2"));
        let (accum, zero) = (format!("grad_accum={accum}"), format!("zero_stage={zero}"));
        let with_batch = |batch: &'static str| {
            [
                "--set",
                "max_steps=20",
                "--set",
                &accum,
                "--set",
                &zero,
                "--set",
                batch,
            ]
        };
        let (e1, e2) = (with_batch("batch_size=12"), with_batch("batch_size=6"));
        ok(&args(&data, &single, &e1));
        let out = ok_mpi(2, &args(&data, &double, &e2));
        // Only rank 0 reports.
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .matches("--- sample ---")
                .count(),
            1
        );
        let (a, b) = (losses(&single), losses(&double));
        assert_eq!(a.len(), 20);
        assert_close(&a, &b, name);
    }
}

#[test]
fn a_two_rank_checkpoint_resumes_on_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 30_000);
    for zero in ["0", "1"] {
        let z = format!("zero_stage={zero}");
        let straight = tmp.path().join(format!("straight-{zero}"));
        let two_ranks = [
            "--set",
            "max_steps=20",
            "--set",
            "batch_size=6",
            "--set",
            &z,
        ];
        ok_mpi(2, &args(&data, &straight, &two_ranks));
        let moved = tmp.path().join(format!("moved-{zero}"));
        ok_mpi(
            2,
            &args(
                &data,
                &moved,
                &[&two_ranks[..], &["--stop-at-step", "10"]].concat(),
            ),
        );
        // Same global batch on one rank: 12 rows.
        let e = fails(&["train", "--out", s(&moved), "--resume"]);
        assert!(e.contains("global batch") && e.contains("12"), "{e}");
        ok(&[
            "train",
            "--out",
            s(&moved),
            "--resume",
            "--set",
            "batch_size=12",
        ]);
        assert_close(
            &losses(&straight),
            &losses(&moved),
            &format!("resume on 1 rank, zero {zero}"),
        );
    }
}

/// Starts a 2-rank run, sends `signal` to rank 1 once it trains, and waits (bounded)
/// for the job to end; returns its status and stderr.
fn signal_rank_one(data: &Path, run: &Path, signal: &str) -> (std::process::ExitStatus, String) {
    let mut child = mpirun(
        2,
        &args(
            data,
            run,
            &[
                "--set",
                "max_steps=1000000",
                "--set",
                "batch_size=6",
                "--set",
                "collective_timeout_s=3",
            ],
        ),
    )
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let t0 = Instant::now();
    while metrics_lines(run) < 5 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let rank1 = rank_pid(1).expect("rank 1's process");
    assert!(Command::new("kill")
        .args([signal, &rank1.to_string()])
        .status()
        .unwrap()
        .success());
    let sent = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            sent.elapsed() < Duration::from_secs(60),
            "the job hung after kill {signal} on rank 1"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = Command::new("kill")
        .args(["-KILL", &rank1.to_string()])
        .status();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

#[test]
fn a_hung_rank_stops_the_job_with_a_timeout_and_mismatched_configs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 30_000);
    // A frozen rank: rank 0's watchdog ends the job with its message.
    let (status, stderr) = signal_rank_one(&data, &tmp.path().join("hang"), "-STOP");
    assert!(!status.success());
    assert!(
        stderr.contains("rank 0") && stderr.contains("no answer from the other ranks"),
        "{stderr}"
    );
    // A killed rank: the job ends (mpirun or the survivors' watchdog), bounded in time.
    let (status, _) = signal_rank_one(&data, &tmp.path().join("killed"), "-KILL");
    assert!(!status.success());

    // Ranks started with different settings are refused at start.
    let out = Command::new("mpirun")
        .args([
            "--oversubscribe",
            "--allow-run-as-root",
            "-np",
            "1",
            env!("CARGO_BIN_EXE_lmforge"),
        ])
        .args(args(
            &data,
            &tmp.path().join("a"),
            &["--set", "max_steps=2", "--set", "lr=1e-3"],
        ))
        .args([":", "-np", "1", env!("CARGO_BIN_EXE_lmforge")])
        .args(args(
            &data,
            &tmp.path().join("a"),
            &["--set", "max_steps=2", "--set", "lr=2e-3"],
        ))
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("rank 1 was started with a different configuration"),
        "{stderr}"
    );
}

fn metrics_lines(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl")).map_or(0, |t| t.lines().count())
}

/// The pid of the lmforge process whose environment says it is MPI rank `rank`.
fn rank_pid(rank: usize) -> Option<u32> {
    let want = format!("OMPI_COMM_WORLD_RANK={rank}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
        let is_us = String::from_utf8_lossy(&cmd).contains("lmforge")
            && String::from_utf8_lossy(&cmd).contains("collective_timeout_s=3");
        (is_us && env.split(|&b| b == 0).any(|kv| kv == want.as_bytes())).then_some(pid)
    })
}

#[test]
fn two_ranks_of_a_masked_lm_equal_one_process_with_twice_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_with(tmp.path(), 40_000, "wordpiece:300");
    // Each rank normalises by the labelled positions of the whole global batch.
    for zero in ["zero_stage=0", "zero_stage=1"] {
        let single = tmp.path().join(format!("{zero}-1"));
        let double = tmp.path().join(format!("{zero}-2"));
        let extra = |batch: &'static str| {
            [
                "--set",
                "model_type=bert",
                "--set",
                "max_steps=12",
                "--set",
                zero,
                "--set",
                batch,
            ]
        };
        let (e1, e2) = (extra("batch_size=8"), extra("batch_size=4"));
        ok(&args(&data, &single, &e1));
        ok_mpi(2, &args(&data, &double, &e2));
        let (a, b) = (losses(&single), losses(&double));
        assert_eq!(a.len(), 12);
        assert_close(&a, &b, zero);
    }
}

#[test]
fn a_classifier_on_two_ranks_equals_one_process_with_twice_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_sentiment(tmp.path(), &["amazon"], "wordpiece:400");
    let run = |dir: &Path, batch: &str, patience: &str| {
        let settings = [
            "max_steps=16",
            "eval_every=4",
            "metric=accuracy",
            "keep_best=true",
            "class_weights=balanced",
            batch,
            patience,
        ];
        let extra: Vec<&str> = settings.iter().flat_map(|x| ["--set", x]).collect();
        classify_args(&data, dir, &extra)
            .iter()
            .map(|x| x.to_string())
            .collect::<Vec<String>>()
    };
    let single = tmp.path().join("one");
    let double = tmp.path().join("two");
    let one = run(&single, "batch_size=8", "patience=2");
    let two = run(&double, "batch_size=4", "patience=2");
    ok(&one.iter().map(String::as_str).collect::<Vec<_>>());
    ok_mpi(2, &two.iter().map(String::as_str).collect::<Vec<_>>());
    let keys = ["step", "val_accuracy", "val_f1_macro"];
    assert_eq!(metric_values(&single, &keys), metric_values(&double, &keys));
    assert_close(&losses(&single), &losses(&double), "classifier");
}

#[test]
fn distillation_on_two_ranks_equals_one_process_with_twice_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 30_000);
    let teacher = tmp.path().join("teacher");
    ok(&args(
        &data,
        &teacher,
        &["--set", "max_steps=10", "--set", "n_layer=3"],
    ));
    let run = |dir: &Path, batch: &str| {
        let mut a = args(&data, dir, &["--set", "max_steps=12", "--set", batch]);
        a[0] = "distill";
        a.extend_from_slice(&["--teacher", s(&teacher), "--student-layers", "2"]);
        a.into_iter().map(String::from).collect::<Vec<String>>()
    };
    let (single, double) = (tmp.path().join("one"), tmp.path().join("two"));
    let one = run(&single, "batch_size=12");
    let two = run(&double, "batch_size=6");
    ok(&one.iter().map(String::as_str).collect::<Vec<_>>());
    ok_mpi(2, &two.iter().map(String::as_str).collect::<Vec<_>>());
    assert_close(&losses(&single), &losses(&double), "distillation");
}
