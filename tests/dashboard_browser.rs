//! The dashboard in a real browser: headless Chromium (Debian's `chromium`, installed
//! here when missing and allowed) loads the page while a run trains, waits for the
//! curves to be drawn, checks the run names and a step that grows without a reload,
//! and saves a screenshot. Chromium is driven over the DevTools protocol on a pipe
//! (`--remote-debugging-pipe`: NUL-separated JSON on file descriptors 3 and 4).

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// Chromium's path: found, or installed from Debian when this runs as root (CI), or
/// `None` with the reason printed.
fn chromium() -> Option<PathBuf> {
    let found = || {
        ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(p) = found() {
        return Some(p);
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        println!("installing Debian's chromium (apt-get)");
        let _ = Command::new("apt-get").arg("update").status();
        let _ = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status();
    }
    let p = found();
    if p.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the browser test: chromium could not be installed"
        );
        println!("skipped: no chromium here and it cannot be installed (not root)");
    }
    p
}

/// One browser and one page, spoken to over the DevTools protocol.
struct Browser {
    child: Child,
    to_browser: std::fs::File,
    replies: Receiver<Value>,
    session: String,
    next_id: u64,
}

impl Browser {
    fn launch(exe: &Path, profile: &Path) -> Browser {
        let (from_us, to_browser) = std::io::pipe().unwrap();
        let (from_browser, to_us) = std::io::pipe().unwrap();
        let (read_fd, write_fd): (OwnedFd, OwnedFd) = (from_us.into(), to_us.into());
        let (r, w) = (read_fd.as_raw_fd(), write_fd.as_raw_fd());
        let mut cmd = Command::new(exe);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-pipe",
            "--window-size=1500,1400",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only fcntl and dup2 between fork and exec: Chromium reads fd 3 and
        // writes fd 4 (both ends are first moved above them, in case either is 3 or 4).
        unsafe {
            cmd.pre_exec(move || {
                let (r, w) = (
                    libc::fcntl(r, libc::F_DUPFD, 10),
                    libc::fcntl(w, libc::F_DUPFD, 10),
                );
                if r < 0 || w < 0 || libc::dup2(r, 3) < 0 || libc::dup2(w, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop((read_fd, write_fd));
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from_browser);
            let mut buf = Vec::new();
            while reader.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                buf.pop();
                if let Ok(v) = serde_json::from_slice::<Value>(&buf) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
                buf.clear();
            }
        });
        let mut browser = Browser {
            child,
            to_browser: std::fs::File::from(OwnedFd::from(to_browser)),
            replies,
            session: String::new(),
            next_id: 0,
        };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}), false);
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
            false,
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_string();
        browser
    }

    /// Sends one command (to the page's session, or to the browser) and waits for its
    /// answer, skipping the events in between.
    fn call(&mut self, method: &str, params: Value, on_page: bool) -> Value {
        self.next_id += 1;
        let mut msg = json!({"id": self.next_id, "method": method, "params": params});
        if on_page {
            msg["sessionId"] = json!(self.session);
        }
        self.to_browser
            .write_all(format!("{msg}\0").as_bytes())
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let reply = self
                .replies
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("{method}: no answer from chromium"));
            if reply["id"] == json!(self.next_id) {
                assert!(reply["error"].is_null(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
            true,
        );
        r["result"]["value"].clone()
    }

    /// Polls `expression` until it is true.
    fn wait_for(&mut self, expression: &str, what: &str, limit: Duration) {
        let start = Instant::now();
        while self.eval(expression) != json!(true) {
            assert!(start.elapsed() < limit, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The step the runs table shows for `run` (the number before " / ").
fn shown_step(browser: &mut Browser, run: &str) -> u64 {
    let v = browser.eval(&format!(
        "(document.querySelector('#runs tr[data-run=\"{run}\"] td.step') || {{}}).textContent || ''"
    ));
    v.as_str()
        .unwrap()
        .split(" / ")
        .next()
        .unwrap()
        .parse()
        .unwrap_or(0)
}

#[test]
fn the_page_follows_a_training_run_in_chromium() {
    let Some(exe) = chromium() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 60_000);
    let runs = tmp.path().join("runs");
    // A finished run beside the one that trains.
    let done = runs.join("baseline");
    let mut args = vec!["train", "--data", s(&data), "--out", s(&done)];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(&["--set", "max_steps=40", "--set", "eval_every=10"]);
    ok(&args);
    // Long enough to outlast the test; stopped when it ends.
    let live = runs.join("live-run");
    let mut args = vec!["train", "--data", s(&data), "--out", s(&live)];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(&[
        "--set",
        "max_steps=100000",
        "--set",
        "eval_every=25",
        "--set",
        "eval_batches=2",
        "--set",
        "save_every=0",
    ]);
    let mut training = bin().args(&args).stderr(Stdio::null()).spawn().unwrap();
    let server = Server::spawn(&["dashboard", "--runs", s(&runs), "--addr", "127.0.0.1:0"]);

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut browser = Browser::launch(&exe, &tmp.path().join("profile"));
        browser.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": 1500, "height": 1400, "deviceScaleFactor": 1, "mobile": false}),
            true,
        );
        browser.call("Page.navigate", json!({"url": server.url("/")}), true);
        browser.wait_for(
            "document.querySelectorAll('svg[data-chart=loss] path.curve[data-run=\"live-run\"]').length > 0 \
             && document.querySelectorAll('svg[data-chart=loss] path.curve[data-run=\"baseline\"]').length > 0",
            "both runs' loss curves",
            Duration::from_secs(90),
        );
        let names = browser.eval(
            "[...document.querySelectorAll('#runs tbody tr')].map(r => r.dataset.run).join(',')",
        );
        assert_eq!(names, "live-run,baseline", "running runs first");
        let statuses = browser.eval(
            "[...document.querySelectorAll('#runs .status')].map(s => s.textContent).join(',')",
        );
        assert_eq!(statuses, "running,finished");
        assert_eq!(shown_step(&mut browser, "baseline"), 40);
        let first = shown_step(&mut browser, "live-run");
        let curve_length = "document.querySelector('svg[data-chart=loss] path.curve[data-run=\"live-run\"]').getAttribute('d').length";
        let first_curve = browser.eval(curve_length).as_u64().unwrap();
        // The page updates itself (no reload): the step grows and the curve with it.
        browser.wait_for(
            &format!(
                "Number((document.querySelector('#runs tr[data-run=\"live-run\"] td.step') || {{}}).textContent?.split(' / ')[0]) > {first} + 20"
            ),
            "a later step",
            Duration::from_secs(90),
        );
        let later = shown_step(&mut browser, "live-run");
        assert!(later > first + 20, "{first} → {later}");
        browser.wait_for(
            &format!("{curve_length} > {first_curve}"),
            "the curve to grow",
            Duration::from_secs(30),
        );
        // Every chart drew something, and the samples of the focused run are there.
        let charts = browser.eval(
            "[...document.querySelectorAll('#charts .chart')].filter(c => c.querySelector('path.curve, path.val')).map(c => c.dataset.chart).join(',')",
        );
        assert_eq!(charts, "loss,lr,grad_norm,tokens_per_s,mfu");
        browser.wait_for(
            "document.querySelectorAll('#tab-samples .sample').length > 0",
            "samples",
            Duration::from_secs(30),
        );
        // Wall time on the x axis, no smoothing, and the config diff of the two runs.
        browser.eval(
            "const x = document.getElementById('x-axis'); x.value = 'time'; x.dispatchEvent(new Event('change'));\
             const m = document.getElementById('smoothing'); m.value = '0'; m.dispatchEvent(new Event('input'));",
        );
        let labels = browser.eval(
            "[...document.querySelectorAll('svg[data-chart=loss] .axis text')].map(t => t.textContent).join(' ')",
        );
        let labels = labels.as_str().unwrap();
        assert!(
            labels.contains("wall time") && labels.contains('s'),
            "{labels}"
        );
        assert_eq!(
            browser.eval("document.querySelectorAll('#charts path.raw').length"),
            0
        );
        assert!(
            browser
                .eval("document.querySelectorAll('#charts path.curve').length")
                .as_u64()
                > Some(0)
        );
        browser.eval(
            "document.querySelector('.tabs button[data-tab=config]').click();\
             const c = document.getElementById('compare'); c.value = 'baseline'; c.dispatchEvent(new Event('change'));",
        );
        browser.wait_for(
            "[...document.querySelectorAll('#config tr.changed td:first-child')].some(t => t.textContent === 'max_steps')",
            "the config diff",
            Duration::from_secs(30),
        );
        let changed = browser.eval(
            "[...document.querySelectorAll('#config tr.changed')].map(r => [...r.children].map(c => c.textContent).join('|')).join(';')",
        );
        let changed = changed.as_str().unwrap();
        assert!(changed.contains("max_steps|100000|40"), "{changed}");
        assert!(!changed.contains("n_layer"), "same in both: {changed}");
        browser.eval(
            "const x = document.getElementById('x-axis'); x.value = 'step'; x.dispatchEvent(new Event('change'));\
             document.querySelector('.tabs button[data-tab=samples]').click();",
        );
        let shot = browser.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
            true,
        );
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        assert!(
            png.starts_with(b"\x89PNG") && png.len() > 20_000,
            "{} bytes",
            png.len()
        );
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
        std::fs::write(&out, &png).unwrap();
        println!("screenshot: {}", out.display());
    }));
    let _ = training.kill();
    let _ = training.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// `n` metrics lines as `train` writes them (a validation line every 250 steps).
fn synthetic_run(path: &Path, n: u64, seed: u64) {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    for step in 1..=n {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let noise = (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
        let loss = 1.5 + 2.5 / (1.0 + step as f64 / 500.0) + 0.1 * noise;
        writeln!(
            out,
            "{{\"step\":{step},\"loss\":{loss},\"lr\":{},\"grad_norm\":{},\"skipped\":false,\"skipped_total\":0,\"tokens_per_s\":{},\"ms_per_step\":{},\"mfu\":{},\"tokens\":{},\"elapsed_s\":{}}}",
            1e-3 * (1.0 - step as f64 / n as f64),
            0.8 + 0.3 * noise,
            120_000.0 + 9_000.0 * noise,
            34.1 + 2.0 * noise,
            0.31 + 0.02 * noise,
            step * 4096,
            step as f64 * 0.0341
        )
        .unwrap();
        if step % 250 == 0 {
            writeln!(
                out,
                "{{\"step\":{step},\"elapsed_s\":{},\"val_loss\":{}}}",
                step as f64 * 0.0341,
                loss + 0.05
            )
            .unwrap();
        }
    }
}

/// The load figure of BENCHMARKS.md (`bash bench/dashboard.sh`): 50 runs of 100k
/// metrics lines each; page load to curves drawn, bytes the page fetched, the server's
/// memory. Prints figures; asserts only that the page got there.
#[test]
#[ignore = "a benchmark: bash bench/dashboard.sh"]
fn load_of_50_runs_of_100k_lines() {
    let Some(exe) = chromium() else {
        return;
    };
    let (runs_n, lines_n) = (50u64, 100_000u64);
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-bench");
    for i in 0..runs_n {
        let dir = root.join(format!("sweep-{}/run-{i:02}", i / 10));
        let path = dir.join("metrics.jsonl");
        if !path.exists() {
            std::fs::create_dir_all(&dir).unwrap();
            synthetic_run(&path, lines_n, i);
        }
    }
    let bytes_on_disk: u64 = (0..runs_n)
        .map(|i| {
            std::fs::metadata(root.join(format!("sweep-{}/run-{i:02}/metrics.jsonl", i / 10)))
                .unwrap()
                .len()
        })
        .sum();
    let server = Server::spawn(&["dashboard", "--runs", s(&root), "--addr", "127.0.0.1:0"]);
    let tmp = tempfile::tempdir().unwrap();
    let mut browser = Browser::launch(&exe, &tmp.path().join("profile"));
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1500, "height": 1400, "deviceScaleFactor": 1, "mobile": false}),
        true,
    );
    let fetched = "performance.getEntriesByType('resource').concat(performance.getEntriesByType('navigation')).reduce((a, e) => a + e.encodedBodySize, 0)";
    let curves_drawn = |n: u64| {
        format!("document.querySelectorAll('svg[data-chart=loss] path.curve').length === {n}")
    };
    let timed = |browser: &mut Browser, action: &dyn Fn(&mut Browser), until: &str| {
        let start = Instant::now();
        action(browser);
        browser.wait_for(until, until, Duration::from_secs(300));
        start.elapsed().as_secs_f64()
    };
    let url = server.url("/");
    let cold = timed(
        &mut browser,
        &|b| {
            b.call("Page.navigate", json!({"url": url}), true);
        },
        &curves_drawn(8),
    );
    let cold_bytes = browser.eval(fetched).as_u64().unwrap();
    let warm = timed(
        &mut browser,
        &|b| {
            b.call("Page.reload", json!({}), true);
        },
        &curves_drawn(8),
    );
    let warm_bytes = browser.eval(fetched).as_u64().unwrap();
    let all = timed(
        &mut browser,
        &|b| {
            b.eval("document.getElementById('show-all').click()");
        },
        &curves_drawn(runs_n),
    );
    let all_bytes = browser.eval(fetched).as_u64().unwrap() - warm_bytes;
    let poll_start = Instant::now();
    let overview = reqwest::blocking::get(server.url("/api/runs"))
        .unwrap()
        .bytes()
        .unwrap();
    let poll_ms = poll_start.elapsed().as_secs_f64() * 1e3;
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{}/status", server.child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    println!(
        "| {runs_n} runs × {lines_n} lines ({:.2} GB of metrics.jsonl) | |",
        bytes_on_disk as f64 / 1e9
    );
    println!(
        "| first load, 8 runs drawn (server reads every file) | {cold:.2} s, {:.0} kB fetched |",
        cold_bytes as f64 / 1e3
    );
    println!(
        "| reload, 8 runs drawn | {warm:.2} s, {:.0} kB fetched |",
        warm_bytes as f64 / 1e3
    );
    println!(
        "| overlay all 50 runs | {all:.2} s, {:.0} kB more |",
        all_bytes as f64 / 1e3
    );
    println!(
        "| one poll of /api/runs, nothing appended | {poll_ms:.1} ms, {:.0} kB |",
        overview.len() as f64 / 1e3
    );
    println!("| dashboard memory (RSS) | {:.0} MB |", rss_kb as f64 / 1e3);
}
