//! `lmforge dashboard`'s JSON API on run directories made here: runs found (nested,
//! not hidden, not inside checkpoints), their status, best figure, tokens/s and ETA;
//! curves downsampled before they are sent; appended lines read and only they;
//! malformed lines skipped and reported; samples, configs and their diff; a sweep's
//! trials; and nothing outside --runs served, whatever the path or symlink.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::Path;

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn status(state: &str, pid: u32, max_steps: u64, config: Value) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    json!({
        "state": state, "pid": pid, "host": host.trim(), "started_at": 1.0e9, "ended_at": null,
        "start_step": 0, "max_steps": max_steps, "error": null, "config": config,
    })
    .to_string()
}

/// `n` training lines at 10 ms a step (5,000 tokens/s) and a validation line every 50.
fn metrics(n: u64, loss: impl Fn(u64) -> f64) -> String {
    let mut out = String::new();
    for step in 1..=n {
        out.push_str(&format!(
            "{{\"step\":{step},\"loss\":{},\"lr\":0.001,\"grad_norm\":1.5,\"skipped\":false,\"tokens_per_s\":5000.0,\"ms_per_step\":10.0,\"mfu\":0.25,\"elapsed_s\":{}}}\n",
            loss(step),
            step as f64 * 0.01
        ));
        if step % 50 == 0 {
            out.push_str(&format!(
                "{{\"step\":{step},\"elapsed_s\":{},\"val_loss\":{}}}\n",
                step as f64 * 0.01,
                3.0 - step as f64 / 100.0
            ));
        }
    }
    out
}

fn dashboard(root: &Path) -> Server {
    Server::spawn(&["dashboard", "--runs", s(root), "--addr", "127.0.0.1:0"])
}

fn get(server: &Server, path: &str) -> Value {
    let res = reqwest::blocking::get(server.url(path)).unwrap();
    assert!(res.status().is_success(), "{path}: {}", res.status());
    res.json().unwrap()
}

fn runs_by_id(server: &Server) -> std::collections::BTreeMap<String, Value> {
    get(server, "/api/runs")["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["id"].as_str().unwrap().to_string(), r.clone()))
        .collect()
}

#[test]
fn runs_show_status_step_best_speed_and_skipped_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("runs");
    let lm = json!({"metric": "val_loss", "lr": 0.001});
    let mut text = metrics(100, |s| 4.0 - s as f64 / 100.0);
    text.insert_str(text.find('\n').unwrap() + 1, "oops, not json\n");
    write(&root.join("a/running/metrics.jsonl"), &text);
    let me = std::process::id();
    write(
        &root.join("a/running/run.json"),
        &status("running", me, 1000, lm.clone()),
    );
    write(
        &root.join("b/nested/finished/metrics.jsonl"),
        &metrics(50, |_| 2.0),
    );
    write(
        &root.join("b/nested/finished/run.json"),
        &status("finished", me, 50, lm.clone()),
    );
    // Said running, but its process is gone: stopped.
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    write(&root.join("killed/metrics.jsonl"), &metrics(10, |_| 2.0));
    write(
        &root.join("killed/run.json"),
        &status("running", gone.id(), 100, lm.clone()),
    );
    write(&root.join("diverged/metrics.jsonl"), &metrics(3, |_| 2.0));
    write(
        &root.join("diverged/run.json"),
        &status("diverged", me, 100, lm.clone()),
    );
    // A run from before run.json: its latest checkpoint says where it stands.
    write(&root.join("legacy/metrics.jsonl"), &metrics(20, |_| 2.0));
    write(&root.join("legacy/checkpoints/latest"), "step-000020\n");
    write(
        &root.join("legacy/checkpoints/step-000020/trainer_state.json"),
        &json!({"step": 20, "config": {"max_steps": 40, "metric": "val_loss"}}).to_string(),
    );
    // A classifier is judged by its metric, higher better.
    write(
        &root.join("clf/metrics.jsonl"),
        "{\"step\":10,\"val_loss\":0.6,\"val_accuracy\":0.75}\n{\"step\":20,\"val_loss\":0.7,\"val_accuracy\":0.8}\n{\"step\":30,\"val_loss\":0.5,\"val_accuracy\":0.7}\n",
    );
    write(
        &root.join("clf/run.json"),
        &status("finished", me, 30, json!({"metric": "accuracy"})),
    );
    write(
        &root.join(".hidden/run/metrics.jsonl"),
        &metrics(5, |_| 1.0),
    );
    write(
        &root.join("legacy/checkpoints/inner/metrics.jsonl"),
        &metrics(5, |_| 1.0),
    );

    let server = dashboard(&root);
    let runs = runs_by_id(&server);
    let ids: Vec<&str> = runs.keys().map(String::as_str).collect();
    assert_eq!(
        ids,
        [
            "a/running",
            "b/nested/finished",
            "clf",
            "diverged",
            "killed",
            "legacy"
        ]
    );
    let status_of = |id: &str| runs[id]["status"].as_str().unwrap().to_string();
    assert_eq!(status_of("a/running"), "running");
    assert_eq!(status_of("b/nested/finished"), "finished");
    assert_eq!(status_of("killed"), "stopped");
    assert_eq!(status_of("diverged"), "diverged");
    assert_eq!(status_of("legacy"), "stopped");
    assert_eq!(runs["legacy"]["max_steps"], 40);

    let running = &runs["a/running"];
    assert_eq!(running["step"], 100);
    assert_eq!(running["max_steps"], 1000);
    assert_eq!(running["best"], 2.0, "val_loss 3 - 100/100");
    assert_eq!(running["tokens_per_s"], 5000.0);
    // 900 steps left at 10 ms each.
    assert!((running["eta_s"].as_f64().unwrap() - 9.0).abs() < 1e-9);
    assert_eq!(running["skipped_count"], 1);
    assert_eq!(running["skipped_lines"], json!([2]));
    assert_eq!(running["lines"], 103);
    assert_eq!(runs["b/nested/finished"]["eta_s"], Value::Null);

    assert_eq!(runs["clf"]["metric"], "val_accuracy");
    assert_eq!(runs["clf"]["lower_is_better"], false);
    assert_eq!(runs["clf"]["best"], 0.8);
}

#[test]
fn curves_are_downsampled_before_they_are_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("runs");
    // 100k steps with one spike: a chart of 300 points must still show it.
    let text = metrics(100_000, |s| {
        if s == 77_777 {
            50.0
        } else {
            2.0 + 1.0 / s as f64
        }
    });
    write(&root.join("big/metrics.jsonl"), &text);
    let server = dashboard(&root);
    let body = reqwest::blocking::get(server.url("/api/curves?run=big&points=300"))
        .unwrap()
        .text()
        .unwrap();
    assert!(
        body.len() < 150_000,
        "{} bytes for 7 curves of 300 points",
        body.len()
    );
    let v: Value = serde_json::from_str(&body).unwrap();
    let loss = &v["curves"]["loss"];
    let n = loss["mean"].as_array().unwrap().len();
    assert!((150..=300).contains(&n), "{n} points");
    for key in ["step", "time", "min", "max"] {
        assert_eq!(loss[key].as_array().unwrap().len(), n);
    }
    let max = floats(&loss["max"]).into_iter().fold(0.0, f64::max);
    assert_eq!(max, 50.0, "the spike survives as its bucket's max");
    let steps = floats(&loss["step"]);
    assert!(steps.windows(2).all(|w| w[0] < w[1]));
    assert!(steps[0] < 1000.0 && *steps.last().unwrap() > 99_000.0);
    // Every point is the mean of its bucket: the whole curve's mean is kept.
    let means = floats(&loss["mean"]);
    let overall = means.iter().sum::<f64>() / n as f64;
    assert!((overall - 2.0).abs() < 0.01, "{overall}");
    // A sparse curve (2,000 evaluations) is downsampled too; a short one is sent whole.
    assert!(v["curves"]["val_loss"]["mean"].as_array().unwrap().len() <= 300);
    let whole = tmp.path().join("runs/small/metrics.jsonl");
    write(&whole, &metrics(100, |_| 1.0));
    std::thread::sleep(std::time::Duration::from_millis(2100)); // the next directory walk
    let small = get(&server, "/api/curves?run=small&points=300");
    assert_eq!(small["curves"]["val_loss"]["step"], json!([50.0, 100.0]));
    assert_eq!(
        small["curves"]["loss"]["mean"].as_array().unwrap().len(),
        100
    );
}

#[test]
fn appended_lines_are_read_and_only_they() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("runs");
    let path = root.join("live/metrics.jsonl");
    write(&path, &metrics(10, |_| 2.0));
    let server = dashboard(&root);
    assert_eq!(runs_by_id(&server)["live"]["step"], 10);
    // Bytes already read are not read again: change one in place, then append.
    let text = std::fs::read_to_string(&path).unwrap();
    let changed = text.replacen("\"loss\":2,", "\"loss\":9,", 1);
    assert_eq!(changed.len(), text.len());
    let mut f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all(changed.as_bytes()).unwrap();
    f.write_all(b"{\"step\":11,\"loss\":1.5}\n{\"step\":12,\"lo")
        .unwrap();
    drop(f);
    let curves = get(&server, "/api/curves?run=live");
    assert_eq!(curves["lines"], 11, "the partial line waits");
    let means = floats(&curves["curves"]["loss"]["mean"]);
    assert_eq!(means[0], 2.0, "the first line was not read again");
    assert_eq!(*means.last().unwrap(), 1.5);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    f.write_all(b"ss\":1.25}\n").unwrap();
    drop(f);
    assert_eq!(runs_by_id(&server)["live"]["step"], 12);
    // A resumed run rewrites the file (a new one, renamed into place): read afresh.
    let tmp_file = root.join("live/.metrics.tmp");
    std::fs::write(&tmp_file, metrics(3, |_| 3.0)).unwrap();
    std::fs::rename(&tmp_file, &path).unwrap();
    let runs = runs_by_id(&server);
    assert_eq!(
        (runs["live"]["step"].clone(), runs["live"]["lines"].clone()),
        (json!(3), json!(3))
    );
}

#[test]
fn samples_configs_and_their_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("runs");
    for (name, lr) in [("x", 0.001), ("y", 0.003)] {
        write(&root.join(name).join("metrics.jsonl"), &metrics(5, |_| 2.0));
        write(
            &root.join(name).join("run.json"),
            &status(
                "finished",
                1,
                5,
                json!({"lr": lr, "n_layer": 4, "metric": "val_loss"}),
            ),
        );
    }
    let samples: String = (0..7)
        .map(|i| format!("{{\"step\":{},\"text\":\"sample {i}\"}}\n", i * 10))
        .collect();
    write(
        &root.join("x/samples.jsonl"),
        &format!("{samples}half a li"),
    );
    let server = dashboard(&root);
    let got = get(&server, "/api/samples?run=x&n=5");
    let texts: Vec<&str> = got["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["text"].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        ["sample 2", "sample 3", "sample 4", "sample 5", "sample 6"]
    );
    assert_eq!(get(&server, "/api/samples?run=y")["samples"], json!([]));
    assert_eq!(get(&server, "/api/config?run=x")["config"]["lr"], 0.001);
    let diff = get(&server, "/api/diff?a=x&b=y");
    assert_eq!(diff["diff"], json!([{"key": "lr", "a": 0.001, "b": 0.003}]));
    let missing = reqwest::blocking::get(server.url("/api/diff?a=x")).unwrap();
    assert_eq!(missing.status(), 400);
    assert!(missing.text().unwrap().contains("\\\"b\\\""));
}

#[test]
fn a_sweep_shows_its_trials_with_pruned_ones_marked() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("runs");
    let spec = "method = \"random\"\nrun_cap = 4\nmetric = {name = \"val_loss\"}\nearly_terminate = {type = \"asha\", min_resource = 10, reduction_factor = 2}\n[parameters]\nlr = {min = 1e-4, max = 1e-2, distribution = \"log_uniform_values\"}\n";
    let events = [
        json!({"event": "sweep", "spec": spec, "data": null, "sets": []}),
        json!({"event": "started", "trial": 0, "params": {"lr": 0.001}}),
        json!({"event": "started", "trial": 1, "params": {"lr": 0.01}}),
        json!({"event": "promoted", "trial": 0, "step": 10, "value": 2.5}),
        json!({"event": "pruned", "trial": 1, "step": 10, "value": 3.1}),
        json!({"event": "finished", "trial": 0, "step": 40, "value": 2.0}),
        json!({"event": "started", "trial": 2, "params": {"lr": 0.0001}}),
        json!({"event": "failed", "trial": 2, "error": "lr below min_lr"}),
        json!({"event": "started", "trial": 3, "params": {"lr": 0.002}}),
    ];
    let journal: String = events.iter().map(|e| format!("{e}\n")).collect();
    write(&root.join("sw/journal.jsonl"), &journal);
    write(
        &root.join("sw/trials/trial-000/metrics.jsonl"),
        &metrics(40, |_| 2.0),
    );
    let server = dashboard(&root);
    let overview = get(&server, "/api/runs");
    assert_eq!(overview["sweeps"], json!(["sw"]));
    assert_eq!(overview["runs"][0]["id"], "sw/trials/trial-000");
    let sweep = get(&server, "/api/sweep?id=sw");
    assert_eq!(sweep["metric"], "val_loss");
    assert_eq!(sweep["goal"], "minimize");
    let trials = sweep["trials"].as_array().unwrap();
    let states: Vec<&str> = trials
        .iter()
        .map(|t| t["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["finished", "pruned", "failed", "running"]);
    assert_eq!(trials[0]["value"], 2.0);
    assert_eq!(trials[0]["run"], "sw/trials/trial-000");
    assert_eq!(trials[1]["step"], 10);
    assert_eq!(trials[1]["rungs"], json!({"10": 3.1}));
    assert_eq!(trials[2]["error"], "lr below min_lr");
    assert_eq!(trials[3]["params"]["lr"], 0.002);
    let unknown = reqwest::blocking::get(server.url("/api/sweep?id=nope")).unwrap();
    assert_eq!(unknown.status(), 404);
}

/// A request written byte for byte (an HTTP client would normalise the path).
fn raw_get(server: &Server, target: &str) -> (u16, String) {
    let addr = server.base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let code = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, response)
}

#[test]
fn nothing_outside_the_runs_directory_is_served() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("runs");
    let outside = tmp.path().join("outside");
    // A complete run outside the root, holding a secret in every file.
    let secret = "SECRET-7c1f";
    write(
        &outside.join("metrics.jsonl"),
        &format!("{{\"step\":1,\"loss\":2.0,\"{secret}\":1}}\n"),
    );
    write(
        &outside.join("run.json"),
        &status("finished", 1, 1, json!({"note": secret})),
    );
    write(
        &outside.join("samples.jsonl"),
        &format!("{{\"step\":1,\"text\":\"{secret}\"}}\n"),
    );
    write(&root.join("ok/metrics.jsonl"), &metrics(5, |_| 2.0));
    let link = |target: &Path, at: &Path| std::os::unix::fs::symlink(target, at).unwrap();
    // A symlinked run directory, and symlinked files inside a real run.
    link(&outside, &root.join("linked"));
    link(
        &outside.join("samples.jsonl"),
        &root.join("ok/samples.jsonl"),
    );
    link(&outside.join("run.json"), &root.join("ok/run.json"));
    std::fs::create_dir_all(root.join("half")).unwrap();
    link(
        &outside.join("metrics.jsonl"),
        &root.join("half/metrics.jsonl"),
    );
    let server = dashboard(&root);
    let runs = runs_by_id(&server);
    assert_eq!(runs.keys().collect::<Vec<_>>(), ["ok"]);
    assert_eq!(runs["ok"]["status"], "unknown");

    let targets = [
        "/../../../../../etc/passwd",
        "/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/..%2f..%2f..%2fetc%2fpasswd",
        "/app.js/../../outside/run.json",
        "/api/curves?run=../outside",
        "/api/curves?run=%2e%2e%2Foutside",
        "/api/curves?run=..%2F..%2F..%2Fetc",
        "/api/curves?run=%2Fetc",
        "/api/curves?run=linked",
        "/api/curves?run=half",
        "/api/samples?run=linked",
        "/api/config?run=ok%2F..%2F..%2Foutside",
        "/api/sweep?id=..",
        "/api/diff?a=ok&b=../outside",
    ];
    for target in targets {
        let (code, body) = raw_get(&server, target);
        assert!(code == 404 || code == 400, "{target}: {code}\n{body}");
        assert!(
            !body.contains(secret) && !body.contains("root:x:0"),
            "{target} leaked:\n{body}"
        );
    }
    // A real run's symlinked files are not followed either.
    for target in [
        "/api/samples?run=ok",
        "/api/config?run=ok",
        "/api/curves?run=ok",
    ] {
        let (code, body) = raw_get(&server, target);
        assert_eq!(code, 200, "{target}");
        assert!(!body.contains(secret), "{target} leaked:\n{body}");
    }
    assert_eq!(get(&server, "/api/samples?run=ok")["samples"], json!([]));
    assert_eq!(get(&server, "/api/config?run=ok")["config"], Value::Null);
    // Read-only, and served from the binary alone.
    let client = reqwest::blocking::Client::new();
    let post = client.post(server.url("/api/runs")).send().unwrap();
    assert_eq!(post.status(), 405);
    let page = reqwest::blocking::get(server.url("/")).unwrap();
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    let html = page.text().unwrap();
    assert!(
        html.contains("/app.js") && !html.contains("http"),
        "no outside assets"
    );
    let script = reqwest::blocking::get(server.url("/app.js"))
        .unwrap()
        .text()
        .unwrap();
    assert!(!script.contains("https://") && !script.contains("//cdn"));
}

#[test]
fn binds_to_loopback_by_default_and_names_a_bad_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let server = Server::spawn(&["dashboard", "--runs", s(tmp.path())]);
    assert_eq!(server.base, "http://127.0.0.1:6006");
    drop(server);
    let file = tmp.path().join("a-file");
    write(&file, "");
    let err = fails(&["dashboard", "--runs", s(&file), "--addr", "127.0.0.1:0"]);
    assert!(
        err.contains(s(&file)) && err.contains("not a directory"),
        "{err}"
    );
}

#[test]
fn a_runs_directory_that_does_not_exist_yet_is_watched_for() {
    // As the README starts it: runs in the background, the dashboard at once.
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("later");
    let server = dashboard(&root);
    assert_eq!(get(&server, "/api/runs")["runs"], json!([]));
    write(&root.join("first/metrics.jsonl"), &metrics(7, |_| 2.0));
    let runs = runs_by_id(&server);
    assert_eq!(runs["first"]["step"], 7);
}
