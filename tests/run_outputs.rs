//! What a run writes besides checkpoints: samples.jsonl at each evaluation (kept exact
//! across a resume), run.json (its state and resolved config) and, with `tensorboard=true`, TensorBoard event files whose scalars
//! are metrics.jsonl's (read back here by a decoder that follows the TFRecord and
//! `tensorflow.Event` formats, CRCs checked).

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

fn train(data: &Path, run: &Path, extra: &[&str]) {
    let mut args = vec!["train", "--data", s(data), "--out", s(run)];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(&[
        "--set",
        "max_steps=12",
        "--set",
        "eval_every=4",
        "--set",
        "eval_batches=2",
        "--set",
        "sample_tokens=24",
        "--set",
        "dropout=0.1",
        "--set",
        "save_every=4",
    ]);
    args.extend_from_slice(extra);
    ok(&args);
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn samples_at_each_evaluation_survive_a_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 20_000);
    let whole = tmp.path().join("whole");
    train(&data, &whole, &[]);
    let samples = lines(&whole.join("samples.jsonl"));
    let steps: Vec<u64> = samples
        .iter()
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![0, 4, 8, 12]);
    for v in &samples {
        let text = v["text"].as_str().unwrap();
        assert!(!text.is_empty() && text.chars().count() <= 24, "{text:?}");
    }
    assert_ne!(
        samples[0]["text"], samples[3]["text"],
        "the model changed between them"
    );
    let split = tmp.path().join("split");
    train(&data, &split, &["--stop-at-step", "6"]);
    let status = |run: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap()
    };
    let stopped = status(&split);
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["max_steps"], 12);
    assert_eq!(stopped["config"]["eval_every"], 4);
    train(&data, &split, &["--resume"]);
    assert_eq!(lines(&split.join("samples.jsonl")), samples);
    let finished = status(&split);
    assert_eq!(finished["state"], "finished");
    assert_eq!(finished["start_step"], 6);
    assert!(finished["ended_at"].as_f64().unwrap() >= finished["started_at"].as_f64().unwrap());
    let mut config = status(&whole)["config"].clone();
    config["out_dir"] = finished["config"]["out_dir"].clone();
    assert_eq!(
        config, finished["config"],
        "the resolved config, as the uninterrupted run's"
    );
    // Wall time goes on across the resume: the resumed half starts where the first stopped.
    let elapsed: Vec<f64> = lines(&split.join("metrics.jsonl"))
        .iter()
        .filter_map(|v| v["elapsed_s"].as_f64())
        .collect();
    assert!(elapsed.len() > 12);
    assert!(elapsed.windows(2).all(|w| w[0] <= w[1]), "{elapsed:?}");
}

/// (step, tag → value) of every scalar event in a TensorBoard event file.
fn read_events(path: &Path) -> Vec<(u64, Vec<(String, f32)>)> {
    fn crc32c(data: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0x82F6_3B78 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }
    let masked = |d: &[u8]| crc32c(d).rotate_right(15).wrapping_add(0xa282_ead8);
    fn varint(b: &[u8], at: &mut usize) -> u64 {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let byte = b[*at];
            *at += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte < 0x80 {
                return v;
            }
            shift += 7;
        }
    }
    /// (field, wire type, payload) of each field of a message.
    fn fields(b: &[u8]) -> Vec<(u64, u64, &[u8])> {
        let mut at = 0;
        let mut out = Vec::new();
        while at < b.len() {
            let key = varint(b, &mut at);
            let len = match key & 7 {
                0 => {
                    let start = at;
                    varint(b, &mut at);
                    out.push((key >> 3, 0, &b[start..at]));
                    continue;
                }
                1 => 8,
                2 => varint(b, &mut at) as usize,
                5 => 4,
                w => panic!("wire type {w}"),
            };
            out.push((key >> 3, key & 7, &b[at..at + len]));
            at += len;
        }
        out
    }
    let bytes = std::fs::read(path).unwrap();
    let mut at = 0;
    let mut events = Vec::new();
    let mut first = true;
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        assert_eq!(
            u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()),
            masked(len_bytes)
        );
        let payload = &bytes[at + 12..at + 12 + len];
        assert_eq!(
            u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()),
            masked(payload)
        );
        at += 16 + len;
        let f = fields(payload);
        if first {
            assert!(
                f.iter().any(|(n, _, v)| *n == 3 && *v == b"brain.Event:2"),
                "file_version first"
            );
            first = false;
            continue;
        }
        let step = f
            .iter()
            .find(|x| x.0 == 2)
            .map(|x| varint(x.2, &mut 0))
            .unwrap_or(0);
        let summary = f.iter().find(|x| x.0 == 5).expect("a summary").2;
        let values = fields(summary)
            .into_iter()
            .map(|(_, _, value)| {
                let v = fields(value);
                let tag =
                    String::from_utf8(v.iter().find(|x| x.0 == 1).unwrap().2.to_vec()).unwrap();
                let x =
                    f32::from_le_bytes(v.iter().find(|x| x.0 == 2).unwrap().2.try_into().unwrap());
                (tag, x)
            })
            .collect();
        events.push((step, values));
    }
    events
}

#[test]
fn tensorboard_event_files_hold_the_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 20_000);
    let run = tmp.path().join("tb");
    train(
        &data,
        &run,
        &["--set", "tensorboard=true", "--set", "log_every=2"],
    );
    let files: Vec<_> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    assert_eq!(files.len(), 1);
    let events = read_events(&files[0]);
    let records = metrics(&run);
    assert_eq!(events.len(), records.len(), "one event per metrics line");
    for ((step, values), record) in events.iter().zip(&records) {
        assert_eq!(Some(*step), record["step"].as_u64());
        for key in ["loss", "lr", "grad_norm", "val_loss"] {
            let logged = record.get(key).and_then(Value::as_f64);
            let event = values.iter().find(|(t, _)| t == key).map(|v| v.1);
            assert_eq!(event, logged.map(|x| x as f32), "step {step} {key}");
        }
    }
    assert!(events
        .iter()
        .any(|(_, v)| v.iter().any(|(t, _)| t == "val_loss")));
    assert!(events
        .iter()
        .any(|(_, v)| v.iter().any(|(t, _)| t == "loss")));
}
