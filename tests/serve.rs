//! The HTTP API end to end: the real server on an ephemeral loopback port, spoken to
//! over HTTP as any OpenAI client would.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A tiny char-level model trained for a few steps, as a run directory.
fn tiny_model(tmp: &Path) -> std::path::PathBuf {
    let data = prepare_char(tmp, 30_000);
    let run = tmp.join("tiny");
    let mut args = vec!["train", "--data", s(&data), "--out", s(&run)];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(&[
        "--set",
        "block_size=64",
        "--set",
        "batch_size=8",
        "--set",
        "max_steps=60",
        "--set",
        "lr=3e-3",
        "--set",
        "eval_every=0",
        "--set",
        "eval_batches=2",
        "--set",
        "sample_tokens=5",
    ]);
    ok(&args);
    run
}

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(model: &Path, extra: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lmforge"))
            .args([
                "serve",
                "--model",
                s(model),
                "--addr",
                "127.0.0.1:0",
                "--model-name",
                "tiny",
            ])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let base = line.trim().rsplit(' ').next().unwrap().to_string();
        assert!(base.starts_with("http://127.0.0.1:"), "{line}");
        Server { child, base }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn client() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn complete(server: &Server, body: &Value) -> (u16, Value) {
    let r = client()
        .post(server.url("/v1/completions"))
        .json(body)
        .send()
        .unwrap();
    (r.status().as_u16(), r.json().unwrap())
}

fn texts(v: &Value) -> Vec<String> {
    let choices = v["choices"]
        .as_array()
        .unwrap_or_else(|| panic!("not a completion: {v}"));
    choices
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect()
}

/// Reads an SSE stream to the end: (concatenated text per choice, finish reasons, saw [DONE]).
fn read_stream(resp: reqwest::blocking::Response) -> (Vec<String>, Vec<String>, bool) {
    let mut text = vec![String::new(); 8];
    let mut finish = vec![String::new(); 8];
    let mut done = false;
    for line in BufReader::new(resp).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let chunk: Value = serde_json::from_str(data).unwrap();
        assert_eq!(chunk["object"], "text_completion");
        for c in chunk["choices"].as_array().unwrap() {
            let i = c["index"].as_u64().unwrap() as usize;
            text[i] += c["text"].as_str().unwrap();
            if let Some(f) = c["finish_reason"].as_str() {
                finish[i] = f.to_string();
            }
        }
    }
    (text, finish, done)
}

fn metric(server: &Server, name: &str) -> f64 {
    let body = client()
        .get(server.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap()
}

fn assert_error(status: u16, body: &Value, want_status: u16, param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        e["type"].is_string() && e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
    }
}

#[test]
fn openai_completions_api_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let server = Server::start(&model, &["--max-batch", "4", "--max-tokens-limit", "40"]);

    // Plain completion.
    let (status, r) = complete(
        &server,
        &json!({"model": "tiny", "prompt": "ROMEO:", "max_tokens": 20, "seed": 1}),
    );
    assert_eq!(status, 200, "{r}");
    assert_eq!(
        (r["object"].as_str(), r["model"].as_str()),
        (Some("text_completion"), Some("tiny"))
    );
    assert!(r["id"].as_str().unwrap().starts_with("cmpl-") && r["created"].is_u64());
    let c = &r["choices"][0];
    assert_eq!(
        (c["index"].as_u64(), c["logprobs"].is_null()),
        (Some(0), true)
    );
    assert!(matches!(
        c["finish_reason"].as_str(),
        Some("stop") | Some("length")
    ));
    let u = &r["usage"];
    assert_eq!(u["prompt_tokens"], 6);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    if c["finish_reason"] == "length" {
        assert_eq!(u["completion_tokens"], 20);
    }

    // Seeds: the same seeded request gives the same text, alone or among others.
    let seeded = json!({"model": "tiny", "prompt": "MENENIUS:", "max_tokens": 30, "seed": 42, "temperature": 0.9});
    let alone = texts(&complete(&server, &seeded).1);
    assert_eq!(alone, texts(&complete(&server, &seeded).1));
    let crowd: Vec<_> = (0..6)
        .map(|i| {
            let url = server.url("/v1/completions");
            let body = if i == 3 { seeded.clone() } else { json!({"model": "tiny", "prompt": format!("Lord {}:", ["a", "b", "c", "d", "e", "f"][i]), "max_tokens": 30}) };
            std::thread::spawn(move || client().post(url).json(&body).send().unwrap().json::<Value>().unwrap())
        })
        .collect();
    let crowd: Vec<Value> = crowd.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(
        texts(&crowd[3]),
        alone,
        "a seeded request's output changed with the batch around it"
    );

    // n > 1 over two prompts, with echo.
    let (_, r) = complete(
        &server,
        &json!({"model": "tiny", "prompt": ["A:", "B:"], "n": 3, "max_tokens": 5, "echo": true, "seed": 7}),
    );
    let t = texts(&r);
    assert_eq!(t.len(), 6);
    assert!(
        t[..3].iter().all(|x| x.starts_with("A:")) && t[3..].iter().all(|x| x.starts_with("B:")),
        "{t:?}"
    );
    assert_eq!(
        r["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 1, 2, 3, 4, 5]
    );
    assert_ne!(t[0], t[1], "choices of one request must differ");

    // Stop sequences: the text ends before the first stop and says so.
    let (_, r) = complete(
        &server,
        &json!({"model": "tiny", "prompt": "ROMEO:", "max_tokens": 40, "stop": ["e", "a"], "seed": 3}),
    );
    let text = texts(&r).remove(0);
    assert!(!text.contains('e') && !text.contains('a'), "{text:?}");
    let full = texts(
        &complete(
            &server,
            &json!({"model": "tiny", "prompt": "ROMEO:", "max_tokens": 40, "seed": 3}),
        )
        .1,
    )
    .remove(0);
    if full.contains('e') || full.contains('a') {
        assert_eq!(r["choices"][0]["finish_reason"], "stop");
        assert!(full.starts_with(&text));
    }

    // Streaming gives the same text in pieces, a finish reason, then [DONE].
    let stream_body = json!({"model": "tiny", "prompt": "MENENIUS:", "max_tokens": 30, "seed": 42, "temperature": 0.9, "stream": true});
    let resp = client()
        .post(server.url("/v1/completions"))
        .json(&stream_body)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let (streamed, finish, done) = read_stream(resp);
    assert!(done);
    assert_eq!(streamed[0], alone[0]);
    assert!(finish[0] == "stop" || finish[0] == "length");
    let stop_stream = json!({"model": "tiny", "prompt": "ROMEO:", "max_tokens": 40, "stop": ["e", "a"], "seed": 3, "stream": true});
    let (streamed, _, _) = read_stream(
        client()
            .post(server.url("/v1/completions"))
            .json(&stop_stream)
            .send()
            .unwrap(),
    );
    assert_eq!(
        streamed[0], text,
        "streaming must apply stop sequences like the plain response"
    );

    // Every error: status, OpenAI body, the parameter named.
    let raw = |body: &str| {
        let r = client()
            .post(server.url("/v1/completions"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let (st, b) = raw("{not json");
    assert_error(st, &b, 400, None);
    let (st, b) = complete(&server, &json!({"model": "tiny", "prompt": 12}));
    assert_error(st, &b, 400, Some("prompt"));
    let (st, b) = complete(
        &server,
        &json!({"model": "tiny", "prompt": "x", "max_tokens": "many"}),
    );
    assert_error(st, &b, 400, Some("max_tokens"));
    let (st, b) = complete(&server, &json!({"model": "gpt-4", "prompt": "x"}));
    assert_error(st, &b, 404, Some("model"));
    assert_eq!(b["error"]["code"], "model_not_found");
    let (st, b) = complete(
        &server,
        &json!({"model": "tiny", "prompt": "x", "max_tokens": 41}),
    );
    assert_error(st, &b, 400, Some("max_tokens"));
    let (st, b) = complete(
        &server,
        &json!({"model": "tiny", "prompt": "a".repeat(60), "max_tokens": 10}),
    );
    assert_error(st, &b, 400, Some("prompt"));
    assert_eq!(b["error"]["code"], "context_length_exceeded");
    let (st, b) = complete(
        &server,
        &json!({"model": "tiny", "prompt": "\u{263a} unknown char"}),
    );
    assert_error(st, &b, 400, Some("prompt"));
    let (st, b) = raw(&format!(
        "{{\"model\": \"tiny\", \"prompt\": \"{}\"}}",
        "a".repeat(2 << 20)
    ));
    assert_error(st, &b, 413, None);
    let r = client().get(server.url("/v1/nothing")).send().unwrap();
    assert_eq!(r.status(), 404);

    // A client that disconnects mid-stream frees its slot; the server keeps serving.
    let mut resp = client()
        .post(server.url("/v1/completions"))
        .json(
            &json!({"model": "tiny", "prompt": "ROMEO:", "max_tokens": 40, "stream": true, "n": 4}),
        )
        .send()
        .unwrap();
    let mut first = [0u8; 64];
    resp.read_exact(&mut first).unwrap();
    drop(resp);
    let t0 = Instant::now();
    while metric(&server, "lmforge_active_sequences") > 0.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "slots were not freed after the client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        complete(
            &server,
            &json!({"model": "tiny", "prompt": "x", "max_tokens": 3})
        )
        .0,
        200
    );

    // Health, models, metrics.
    assert_eq!(
        client()
            .get(server.url("/health"))
            .send()
            .unwrap()
            .json::<Value>()
            .unwrap()["status"],
        "ok"
    );
    let models: Value = client()
        .get(server.url("/v1/models"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(models["data"][0]["id"], "tiny");
    assert!(metric(&server, "lmforge_tokens_generated_total") >= 100.0);
    assert!(metric(&server, "lmforge_request_latency_seconds_count") >= 15.0);
    assert_eq!(metric(&server, "lmforge_queue_depth"), 0.0);
    let text = client()
        .get(server.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        text.contains("lmforge_requests_total{path=\"/v1/completions\",status=\"404\"} 1"),
        "{text}"
    );
}

#[test]
fn full_queue_answers_429_and_shutdown_finishes_requests_in_flight() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let mut server = Server::start(
        &model,
        &[
            "--max-batch",
            "2",
            "--max-queue",
            "4",
            "--max-tokens-limit",
            "60",
        ],
    );
    // Nine choices cannot fit a queue of four.
    let (st, b) = complete(
        &server,
        &json!({"model": "tiny", "prompt": ["a", "b", "c"], "n": 3, "max_tokens": 2}),
    );
    assert_error(st, &b, 429, None);
    assert_eq!(b["error"]["code"], "rate_limit_exceeded");

    // SIGTERM while a stream is in flight: the stream still completes, then the server exits 0.
    let resp = client()
        .post(server.url("/v1/completions"))
        .json(&json!({"model": "tiny", "prompt": "ROMEO:", "max_tokens": 50, "stream": true, "seed": 1}))
        .send()
        .unwrap();
    assert!(Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap()
        .success());
    let (text, finish, done) = read_stream(resp);
    assert!(done && !text[0].is_empty() && !finish[0].is_empty());
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[test]
fn official_openai_python_client() {
    let Ok(python) = which_python() else {
        println!("skipped: no python3 on this machine");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path());
    let server = Server::start(&model, &[]);
    // The venv lives in the target directory so later runs reuse it.
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("openai-venv");
    if !venv.join("bin/python").exists()
        || !Command::new(venv.join("bin/python"))
            .args(["-c", "import openai"])
            .status()
            .unwrap()
            .success()
    {
        assert!(Command::new(&python)
            .args(["-m", "venv", s(&venv)])
            .status()
            .unwrap()
            .success());
        let pip = Command::new(venv.join("bin/python"))
            .args(["-m", "pip", "install", "-q", "openai"])
            .status()
            .unwrap();
        assert!(pip.success(), "pip install openai failed");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(venv.join("bin/python"))
        .arg(script)
        .arg(format!("{}/v1", server.base))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("openai client OK"), "{stdout}");
}

fn which_python() -> Result<String, ()> {
    Command::new("python3")
        .arg("--version")
        .output()
        .map(|_| "python3".to_string())
        .map_err(|_| ())
}

/// A small BERT sentiment classifier trained for a few steps on the review sentences.
fn tiny_classifier(tmp: &Path) -> std::path::PathBuf {
    let data = prepare_sentiment(tmp, &["amazon"], "wordpiece:400");
    let run = tmp.join("classifier");
    ok(&classify_args(
        &data,
        &run,
        &["--set", "max_steps=40", "--set", "eval_every=0"],
    ));
    run
}

#[test]
fn a_classifier_answers_v1_classify_batched_as_predict_does() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_classifier(tmp.path());
    let server = Server::start(&run, &["--max-batch", "4"]);
    let texts = [
        "Great value, works perfectly.",
        "It broke after two days.",
        "Not what I expected at all.",
        "I love it.",
        "Terrible sound quality.",
    ];
    let classify = |body: &Value| {
        let r = client()
            .post(server.url("/v1/classify"))
            .json(body)
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let (status, all) = classify(&json!({"model": "tiny", "input": texts}));
    assert_eq!(status, 200, "{all}");
    assert_eq!(all["object"], "list");
    assert_eq!(all["model"], "tiny");
    let data = all["data"].as_array().unwrap();
    assert_eq!(data.len(), texts.len());
    // Each equals `lmforge predict` of the same text, alone or in concurrent requests.
    let singles: Vec<Value> = std::thread::scope(|scope| {
        let handles: Vec<_> = texts
            .iter()
            .map(|t| scope.spawn(move || classify(&json!({"model": "tiny", "input": t}))))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().1).collect()
    });
    for (i, t) in texts.iter().enumerate() {
        let predicted: Value =
            serde_json::from_str(&ok(&["predict", "--model", s(&run), "--text", t, "--json"]))
                .unwrap();
        // Padding to a batch's longest input changes float summation order only.
        let same = |got: &Value, index: usize| {
            assert_eq!(
                (&got["label"], &got["index"]),
                (&predicted["label"], &json!(index)),
                "{t}"
            );
            for (label, p) in predicted["scores"].as_object().unwrap() {
                let q = got["scores"][label].as_f64().unwrap();
                assert!(
                    (q - p.as_f64().unwrap()).abs() < 1e-6,
                    "{t}: {got} vs {predicted}"
                );
            }
        };
        same(&data[i], i);
        same(&singles[i]["data"][0], 0);
    }

    // The same error rules as completions.
    let (status, e) = classify(&json!({"model": "other", "input": "x"}));
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (status, e) = classify(&json!({"model": "tiny"}));
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("input")));
    let (status, e) = classify(&json!({"model": "tiny", "input": [1, -2]}));
    assert_eq!((status, e["error"]["param"].as_str()), (400, Some("input")));
    let (status, e) = classify(&json!({"model": "tiny", "input": [[2, 99999, 3]]}));
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("99999"),
        "{e}"
    );
    let (status, e) = complete(&server, &json!({"model": "tiny", "prompt": "a"}));
    assert_eq!(status, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/classify"),
        "{e}"
    );
}

#[test]
fn a_quantised_gguf_serves_what_generate_gives() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_with(tmp.path(), 30_000, "bpe:300");
    let run = tmp.path().join("bpe");
    train_quick(
        &data,
        &run,
        &["--set", "block_size=64", "--set", "max_steps=30"],
    );
    let file = tmp.path().join("bpe.gguf");
    assert!(quantize(&run, "q8_0", &file).status.success());
    let server = Server::start(&file, &[]);
    let (status, v) = complete(
        &server,
        &json!({"model": "tiny", "prompt": "ROMEO:", "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(status, 200, "{v}");
    let generated = greedy(&file, "ROMEO:", 12);
    let text = generated["samples"][0]["text"].as_str().unwrap();
    assert_eq!(format!("ROMEO:{}", texts(&v)[0]), text);
}
