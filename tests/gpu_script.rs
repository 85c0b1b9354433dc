//! bench/gpu.sh (issue 23's device run) on the CPU: its checks pass here, it writes
//! every figure it promises, and the PyTorch side by side runs through the same code
//! it takes on a GPU (small preset, f32, no torch.compile).

mod common;

use serde_json::Value;
use std::process::Command;

#[test]
fn gpu_script_runs_its_checks_and_benchmark_on_the_cpu() {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = Command::new("bash");
    cmd.args(["bench/gpu.sh", "--device", "cpu", "--quick", "--out"])
        .arg(out.path())
        .args(["--lmforge", env!("CARGO_BIN_EXE_lmforge")])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("RUST_LOG", "warn");
    // The transformers/torch peer venv, where it can be built; else the script says SKIP.
    if let Some(python) = common::hf_python() {
        cmd.env("PYTHON", python);
    }
    let run = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let checks = std::fs::read_to_string(out.path().join("checks.txt")).unwrap();
    assert!(
        run.status.success(),
        "{checks}\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    for name in [
        "train_f32",
        "train_bf16",
        "bf16_tracks_f32",
        "save_on_device",
        "resume_on_cpu",
        "whole_on_device",
        "resumed_matches",
        "lmforge_bench",
    ] {
        assert!(
            checks.contains(&format!("PASS {name}\n")),
            "{name}:\n{checks}"
        );
    }
    assert!(!checks.contains("FAIL"), "{checks}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("summary.json")).unwrap())
            .unwrap();
    let ours = &summary["lmforge"];
    assert!(ours["tokens_per_s"].as_f64().unwrap() > 0.0, "{summary}");
    assert!(
        ours["generate_tokens_per_s"].as_f64().unwrap() > 0.0,
        "{summary}"
    );
    assert!(summary["lmforge_mfu_vs_peak"].as_f64().unwrap() > 0.0);
    if checks.contains("PASS torch_bench") {
        assert!(summary["train_ratio"].as_f64().unwrap() > 0.0, "{summary}");
        assert!(
            summary["generate_ratio"].as_f64().unwrap() > 0.0,
            "{summary}"
        );
    }
    // At most 8 files come back from the device: the logs travel as one archive.
    let files = std::fs::read_dir(out.path()).unwrap().count();
    assert!(files <= 8, "{files} files in the output");
    let untar = Command::new("tar")
        .args(["xzf", "logs.tar.gz"])
        .current_dir(out.path())
        .status()
        .unwrap();
    assert!(untar.success());
    // The bf16 check really compared ten steps (its log says so).
    let log = std::fs::read_to_string(out.path().join("bf16_tracks_f32.log")).unwrap();
    assert!(log.contains("over 10 steps"), "{log}");
}
