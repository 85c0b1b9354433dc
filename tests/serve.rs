//! The HTTP API end to end: the real server on an ephemeral loopback port, spoken to
//! over HTTP as any OpenAI client would.

mod common;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::Command;
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
    // A quantised GGUF has no f32 encoder to pool: embeddings are refused by name.
    let r = client()
        .post(server.url("/v1/embeddings"))
        .json(&json!({"model": "tiny", "input": "ROMEO:"}))
        .send()
        .unwrap();
    let (st, b) = (r.status().as_u16(), r.json::<Value>().unwrap());
    assert_error(st, &b, 400, Some("model"));
}

/// The model's own log-softmax of each token given its prefix (one forward pass over
/// the whole sequence, no cache), in f64: the reference for the served logprobs.
fn reference_logprobs(run: &Path, ids: &[u32]) -> Vec<f64> {
    use candle_core::{Device, Tensor};
    let dir = lmforge::train::checkpoint::resolve_model_dir(run).unwrap();
    let gpt = lmforge::model::hf::load_gpt(&dir, &Device::Cpu, "test").unwrap();
    let input = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let logits: Vec<Vec<f32>> = gpt
        .forward(&input, None, None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    (1..ids.len())
        .map(|i| {
            let row = &logits[i - 1];
            let max = row.iter().copied().fold(f32::MIN, f32::max) as f64;
            let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
            row[ids[i] as usize] as f64 - max - z.ln()
        })
        .collect()
}

#[test]
fn logprobs_echo_and_token_prompts_as_lm_evaluation_harness_sends_them() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tiny_model(tmp.path());
    let shard = lmforge::data::TokenShard::open(&tmp.path().join("data/val.bin"), None).unwrap();
    let val: Vec<u32> = shard.slice(0, 200);
    let prompts: Vec<Vec<u32>> = (0..6)
        .map(|i| val[i * 30..i * 30 + 20 + i].to_vec())
        .collect();
    let server = Server::start(&run, &["--max-batch", "4"]);

    // lm-eval's log-likelihood request: token prompts, echo, one token, logprobs 1.
    let score = |prompt: &[Vec<u32>]| {
        let (st, v) = complete(
            &server,
            &json!({"model": "tiny", "prompt": prompt, "echo": true, "max_tokens": 1, "logprobs": 1, "temperature": 0, "seed": 1234}),
        );
        assert_eq!(st, 200, "{v}");
        v
    };
    let together = score(&prompts);
    for (i, ids) in prompts.iter().enumerate() {
        let lp = &together["choices"][i]["logprobs"];
        let tokens = lp["tokens"].as_array().unwrap();
        assert_eq!(
            tokens.len(),
            ids.len() + 1,
            "prompt tokens and the one generated"
        );
        assert!(lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null());
        let scored = floats(&Value::Array(
            lp["token_logprobs"].as_array().unwrap()[1..ids.len()].to_vec(),
        ));
        let want = reference_logprobs(&run, ids);
        for (got, want) in scored.iter().zip(&want) {
            assert!((got - want).abs() < 1e-4, "prompt {i}: {got} vs {want}");
        }
        // Each top_logprobs entry holds the best token, never below the token's own.
        for (k, top) in lp["top_logprobs"].as_array().unwrap()[1..]
            .iter()
            .enumerate()
        {
            let best = top
                .as_object()
                .unwrap()
                .values()
                .next()
                .unwrap()
                .as_f64()
                .unwrap();
            assert!(best >= lp["token_logprobs"][k + 1].as_f64().unwrap() - 1e-12);
        }
        // Greedy: the generated token is the top one, with the same log-probability.
        let last = ids.len();
        let top = lp["top_logprobs"][last].as_object().unwrap();
        assert_eq!(top.keys().next().unwrap(), tokens[last].as_str().unwrap());
        assert_eq!(top.values().next().unwrap(), &lp["token_logprobs"][last]);
        // text_offset counts characters of the echoed text.
        let offsets = floats(&lp["text_offset"]);
        assert_eq!(offsets[0], 0.0);
        let text = together["choices"][i]["text"].as_str().unwrap();
        let pieces: String = tokens.iter().map(|t| t.as_str().unwrap()).collect();
        assert_eq!(text, pieces);
        assert_eq!(
            offsets[last] as usize,
            text.chars().count() - tokens[last].as_str().unwrap().chars().count()
        );
    }
    // Batching does not change the numbers: each prompt alone gives the same scores.
    for (i, ids) in prompts.iter().enumerate() {
        let alone = score(std::slice::from_ref(ids));
        assert_eq!(
            alone["choices"][0]["logprobs"]["token_logprobs"],
            together["choices"][i]["logprobs"]["token_logprobs"]
        );
    }
    // max_tokens 0 with echo: the prompt's scores only; a text prompt is scored the same.
    let (st, v) = complete(
        &server,
        &json!({"model": "tiny", "prompt": [prompts[0].clone()], "echo": true, "max_tokens": 0, "logprobs": 0}),
    );
    assert_eq!(st, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["tokens"].as_array().unwrap().len(), prompts[0].len());
    assert_eq!(
        lp["token_logprobs"],
        json!(
            together["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .unwrap()[..prompts[0].len()]
        )
    );
    assert!(lp["top_logprobs"][1].as_object().unwrap().is_empty());
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    let (_, by_text) = complete(
        &server,
        &json!({"model": "tiny", "prompt": text, "echo": true, "max_tokens": 0, "logprobs": 0}),
    );
    assert_eq!(
        by_text["choices"][0]["logprobs"]["token_logprobs"],
        lp["token_logprobs"]
    );

    // Sampled tokens carry the model's log-probabilities before temperature and top-p.
    let (st, v) = complete(
        &server,
        &json!({"model": "tiny", "prompt": [prompts[1].clone()], "max_tokens": 12, "logprobs": 5, "temperature": 1.7, "top_p": 0.9, "seed": 3}),
    );
    assert_eq!(st, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    let tok =
        lmforge::data::TextTokenizer::from_file(&tmp.path().join("data/tokenizer.json")).unwrap();
    let generated = tok
        .encode(v["choices"][0]["text"].as_str().unwrap())
        .unwrap();
    assert_eq!(generated.len(), lp["tokens"].as_array().unwrap().len());
    let mut full = prompts[1].clone();
    full.extend(&generated);
    let want = reference_logprobs(&run, &full);
    for (k, got) in floats(&lp["token_logprobs"]).iter().enumerate() {
        assert!(
            (got - want[prompts[1].len() - 1 + k]).abs() < 1e-4,
            "token {k}"
        );
        assert_eq!(lp["top_logprobs"][k].as_object().unwrap().len(), 5);
    }
    // Without echo the offsets continue from the end of the prompt's text.
    let prompt_chars = tok.decode(&prompts[1]).unwrap().chars().count();
    assert_eq!(floats(&lp["text_offset"])[0] as usize, prompt_chars);

    // Refusals name the parameter; the server keeps serving.
    for (body, param) in [
        (
            json!({"model": "tiny", "prompt": "x", "logprobs": 6}),
            "logprobs",
        ),
        (
            json!({"model": "tiny", "prompt": "x", "logprobs": 1, "stream": true}),
            "logprobs",
        ),
        (
            json!({"model": "tiny", "prompt": [[1, 2, 99999]]}),
            "prompt",
        ),
        (
            json!({"model": "tiny", "prompt": "x", "logit_bias": {"1": 5}}),
            "logit_bias",
        ),
        (json!({"model": "tiny", "prompt": "x", "top_k": 5}), "top_k"),
        (
            json!({"model": "tiny", "prompt": "x", "max_tokens": 0}),
            "max_tokens",
        ),
    ] {
        let (st, b) = complete(&server, &body);
        assert_error(st, &b, 400, Some(param));
    }
    let (st, _) = complete(
        &server,
        &json!({"model": "tiny", "prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(st, 200);
}
