//! Sentence embeddings: `lmforge embed` and `POST /v1/embeddings` against transformers'
//! `AutoModel` hidden states pooled as sentence-transformers pools them
//! (scripts/hf_embeddings.py), batching, base64, and bad requests.

mod common;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/{name}/model"))
}

/// Five token-id inputs of different lengths (ids every fixture's vocabulary has).
fn inputs(dir: &Path) -> PathBuf {
    let path = dir.join("ids.jsonl");
    let mut text = String::new();
    let mut x = 7u32;
    for n in [3, 9, 17, 5, 12] {
        let ids: Vec<u32> = (0..n)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                5 + (x >> 8) % 85
            })
            .collect();
        text += &json!({ "ids": ids }).to_string();
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    path
}

fn ours(model: &Path, input: &Path, extra: &[&str]) -> Vec<Vec<f64>> {
    let mut args = vec!["embed", "--model", s(model), "--input", s(input), "--json"];
    args.extend_from_slice(extra);
    ok(&args)
        .lines()
        .enumerate()
        .map(|(i, l)| {
            let v: Value = serde_json::from_str(l).unwrap();
            assert_eq!(v["index"], i);
            v["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect()
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn embeddings_equal_transformers_pooled_as_sentence_transformers() {
    let Some(python) = hf_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let input = inputs(tmp.path());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hf_embeddings.py");
    for (model, pooling, normalize) in [
        ("bert-tiny", "mean", false),
        ("bert-tiny", "cls", true),
        ("distilbert-tiny", "mean", true),
        ("bert-cls-tiny", "mean", false),
        ("gpt2-tiny", "last", false),
        ("gpt2-tiny", "mean", true),
    ] {
        let dir = fixture(model);
        let mut flags = vec!["--pooling", pooling];
        if normalize {
            flags.push("--normalize");
        }
        let got = ours(&dir, &input, &flags);
        let mut cmd = std::process::Command::new(&python);
        cmd.args([s(&script), s(&dir), s(&input), pooling]);
        if normalize {
            cmd.arg("--normalize");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let want: Vec<Vec<f64>> = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                cosine(g, w) >= 0.9999,
                "{model} {pooling} input {i}: cosine {}",
                cosine(g, w)
            );
            let worst = g
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(worst < 1e-4, "{model} {pooling} input {i}: max |Δ| {worst}");
            if normalize {
                assert!((g.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-5);
            }
        }
    }
}

#[test]
fn batching_does_not_change_a_vector() {
    let e = lmforge::embed::Embedder::load(
        &fixture("bert-tiny"),
        (None, false),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let sequences: Vec<Vec<u32>> = std::fs::read_to_string(inputs(tmp.path()))
        .unwrap()
        .lines()
        .map(|l| {
            let ids: Vec<u32> =
                serde_json::from_value(serde_json::from_str::<Value>(l).unwrap()["ids"].clone())
                    .unwrap();
            e.encode(&lmforge::classify::Input::Ids(ids)).unwrap()
        })
        .collect();
    let together = e.embed(&sequences, 16).unwrap();
    for (i, seq) in sequences.iter().enumerate() {
        let alone = e.embed(std::slice::from_ref(seq), 1).unwrap();
        let worst = alone[0]
            .iter()
            .zip(&together[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(worst < 1e-5, "input {i}: {worst}");
    }
}

#[test]
fn v1_embeddings_serves_floats_and_base64_and_refuses_bad_requests() {
    use base64::Engine as _;
    let tmp = tempfile::tempdir().unwrap();
    let input = inputs(tmp.path());
    let model = fixture("bert-tiny");
    let cli = ours(&model, &input, &[]);
    let server = Server::start(&model, &["--max-batch", "2"]);
    let ids: Vec<Value> = std::fs::read_to_string(&input)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["ids"].clone())
        .collect();
    let client = reqwest::blocking::Client::new();
    let post = |body: Value| {
        let r = client
            .post(server.url("/v1/embeddings"))
            .json(&body)
            .send()
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let (st, v) = post(json!({"model": "tiny", "input": ids}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(
        (v["object"].as_str(), v["model"].as_str()),
        (Some("list"), Some("tiny"))
    );
    // Token ids are the model's input as given (framing included).
    let tokens: u64 = ids.iter().map(|x| x.as_array().unwrap().len() as u64).sum();
    assert_eq!(v["usage"]["prompt_tokens"], tokens);
    for (i, d) in v["data"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            (d["object"].as_str(), d["index"].as_u64()),
            (Some("embedding"), Some(i as u64))
        );
        let served: Vec<f64> = d["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        // Batched differently (by 2 here, by 16 in embed): the same within rounding.
        let worst = served
            .iter()
            .zip(&cli[i])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            worst < 1e-5,
            "input {i}: served and lmforge embed differ by {worst}"
        );
    }
    let (st, v) = post(json!({"model": "tiny", "input": ids[1], "encoding_format": "base64"}));
    assert_eq!(st, 200, "{v}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(v["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let (_, alone) = post(json!({"model": "tiny", "input": ids[1]}));
    let printed: Vec<f32> = floats(&alone["data"][0]["embedding"])
        .iter()
        .map(|&x| x as f32)
        .collect();
    assert_eq!(decoded, printed, "the same f32s as the JSON floats");

    for (body, param) in [
        (json!({"model": "tiny", "input": []}), "input"),
        (json!({"model": "tiny", "input": [[]]}), "input"),
        (
            json!({"model": "tiny", "input": "no tokenizer here"}),
            "input",
        ),
        (json!({"model": "tiny", "input": [[1, 2, 100000]]}), "input"),
        (
            json!({"model": "tiny", "input": [1, 2], "encoding_format": "hex"}),
            "encoding_format",
        ),
        (
            json!({"model": "tiny", "input": [1, 2], "dimensions": 8}),
            "dimensions",
        ),
    ] {
        let (st, v) = post(body.clone());
        assert_eq!(
            (st, v["error"]["param"].as_str()),
            (400, Some(param)),
            "{body}: {v}"
        );
    }
    // A masked LM does not generate: completions answer 400, embeddings go on.
    let r = client
        .post(server.url("/v1/completions"))
        .json(&json!({"model": "tiny", "prompt": "x"}))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let (st, _) = post(json!({"model": "tiny", "input": [5, 6, 7]}));
    assert_eq!(st, 200);
}

#[test]
fn embed_names_the_bad_line_and_refuses_cls_pooling_for_gpt2() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"ids\": [1, 2]}\n{\"ids\": [1, 99999]}\n").unwrap();
    let e = fails(&[
        "embed",
        "--model",
        s(&fixture("bert-tiny")),
        "--input",
        s(&bad),
    ]);
    assert!(e.contains("bad.jsonl:2") && e.contains("99999"), "{e}");
    let e = fails(&[
        "embed",
        "--model",
        s(&fixture("gpt2-tiny")),
        "--input",
        s(&bad),
        "--pooling",
        "cls",
    ]);
    assert!(e.contains("no [CLS]"), "{e}");
}
