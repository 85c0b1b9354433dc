//! End to end through the binary: prepare → train → eval → generate, determinism,
//! and one-line errors (no panic) for bad input.

use serde_json::Value;
mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Asserts two long texts are equal, reporting only where they first differ.
fn assert_same_text(got: &str, want: &str) {
    if got != want {
        let at = got
            .chars()
            .zip(want.chars())
            .take_while(|(a, b)| a == b)
            .count();
        let near = |t: &str| {
            t.chars()
                .skip(at.saturating_sub(20))
                .take(40)
                .collect::<String>()
        };
        panic!(
            "texts differ at char {at} (lengths {} vs {}): {:?} vs {:?}",
            got.len(),
            want.len(),
            near(got),
            near(want)
        );
    }
}

const TINY: &[&str] = &[
    "--set",
    "block_size=32",
    "--set",
    "batch_size=8",
    "--set",
    "max_steps=50",
    "--set",
    "eval_every=25",
    "--set",
    "eval_batches=4",
    "--set",
    "save_every=20",
    "--set",
    "keep_last=2",
    "--set",
    "warmup_steps=5",
    "--set",
    "lr=3e-3",
    "--set",
    "sample_tokens=40",
];

fn train(data: &Path, run: &Path) -> String {
    let mut args = vec!["train", "--data", s(data), "--out", s(run)];
    args.extend_from_slice(TINY_MODEL);
    args.extend_from_slice(TINY);
    ok(&args)
}

#[test]
fn prepare_train_eval_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let docs = tmp.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    let text = corpus(40_000);
    std::fs::write(docs.join("a.txt"), &text[..30_000]).unwrap();
    std::fs::write(docs.join("b.txt"), text[30_000..].replace('\n', "\r\n")).unwrap();
    std::fs::write(docs.join("ignored.md"), "not a .txt file").unwrap();
    let data = tmp.path().join("data");
    ok(&[
        "prepare",
        "--input",
        s(&docs),
        "--out",
        s(&data),
        "--tokenizer",
        "char",
    ]);

    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["documents"], 2);
    assert_eq!(meta["sources"].as_array().unwrap().len(), 2);
    let (train_tokens, val_tokens) = (
        meta["train_tokens"].as_u64().unwrap(),
        meta["val_tokens"].as_u64().unwrap(),
    );
    // Two end-of-text markers plus one token per character; CRLF became LF.
    assert_eq!(train_tokens + val_tokens, text.chars().count() as u64 + 2);
    let val_share = val_tokens as f64 / (train_tokens + val_tokens) as f64;
    assert!((0.09..0.11).contains(&val_share), "val share {val_share}");

    // The shards decode back to the cleaned text, documents separated by end-of-text.
    let tok = lmforge::data::TextTokenizer::from_file(&data.join("tokenizer.json")).unwrap();
    let read =
        |f: &str| lmforge::data::TokenShard::open(&data.join(f), Some(tok.vocab_size())).unwrap();
    let (train_shard, val_shard) = (read("train.bin"), read("val.bin"));
    let mut all = train_shard.slice(0, train_shard.len());
    all.extend(val_shard.slice(0, val_shard.len()));
    let eot_positions: Vec<usize> = all
        .iter()
        .enumerate()
        .filter(|(_, &t)| t == tok.eot_id())
        .map(|(i, _)| i)
        .collect();
    assert_eq!(eot_positions, vec![0, 1 + text[..30_000].chars().count()]);
    assert_same_text(&tok.decode(&all).unwrap(), &text);

    let run = tmp.path().join("run");
    let out = train(&data, &run);
    assert!(out.contains("--- sample ---"), "{out}");
    let lines = metrics(&run);
    let train_lines: Vec<&Value> = lines.iter().filter(|l| l.get("loss").is_some()).collect();
    let evals: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("val_loss").is_some())
        .collect();
    assert_eq!(train_lines.len(), 50);
    for key in ["step", "loss", "lr", "tokens_per_s", "mfu"] {
        assert!(
            train_lines.iter().all(|l| l.get(key).is_some()),
            "missing {key}"
        );
    }
    assert_eq!(
        evals
            .iter()
            .map(|l| l["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 25, 50]
    );
    let (first, last) = (
        evals[0]["val_loss"].as_f64().unwrap(),
        evals[2]["val_loss"].as_f64().unwrap(),
    );
    assert!(
        (first - (tok.vocab_size() as f64).ln()).abs() < 0.3,
        "initial val loss {first}"
    );
    assert!(
        last < first - 0.7,
        "val loss did not fall: {first} → {last}"
    );
    assert_eq!(
        &std::fs::read(run.join("loss.png")).unwrap()[..4],
        b"\x89PNG"
    );
    // keep_last = 2 with saves at 20, 40 and the final 50.
    let mut ckpts: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    ckpts.sort();
    assert_eq!(ckpts, vec!["latest", "step-000040", "step-000050"]);
    assert_eq!(
        std::fs::read_to_string(run.join("checkpoints/latest")).unwrap(),
        "step-000050"
    );

    // eval: every token after the first is predicted once.
    let r: Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        s(&run),
        "--data",
        s(&data),
        "--json",
    ]))
    .unwrap();
    assert_eq!(r["tokens"].as_u64().unwrap(), val_tokens);
    let loss = r["loss"].as_f64().unwrap();
    assert!((r["perplexity"].as_f64().unwrap() - loss.exp()).abs() < 1e-9);
    assert!(loss < first && loss > 1.0, "eval loss {loss}");

    // generate: seeded, prompt kept, JSON shape as documented.
    let gen = |seed: &str| -> Value {
        serde_json::from_str(&ok(&[
            "generate",
            "--model",
            s(&run.join("checkpoints/step-000050")),
            "--prompt",
            "ROMEO:",
            "--max-new-tokens",
            "30",
            "--seed",
            seed,
            "--top-k",
            "10",
            "--num-samples",
            "2",
            "--json",
        ]))
        .unwrap()
    };
    let (a, b, c) = (gen("1"), gen("1"), gen("2"));
    assert_eq!(a, b);
    assert_ne!(a, c);
    let samples = a["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2);
    for smp in samples {
        let ids: Vec<u32> = smp["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(&ids[..6], &tok.encode("ROMEO:").unwrap()[..]);
        assert!(ids.len() <= 36);
        assert!(smp["text"].as_str().unwrap().starts_with("ROMEO:"));
    }
    let ids_only: Value = serde_json::from_str(&ok(&[
        "generate",
        "--model",
        s(&run),
        "--prompt-ids",
        "1,2,3",
        "--greedy",
        "--max-new-tokens",
        "5",
        "--json",
    ]))
    .unwrap();
    assert_eq!(ids_only["samples"][0]["ids"].as_array().unwrap().len(), 8);

    // Determinism: the same seed gives the very same losses.
    let run2 = tmp.path().join("run2");
    train(&data, &run2);
    let losses = |run: &Path| -> Vec<Value> {
        metrics(run)
            .into_iter()
            .map(|l| l.get("loss").or(l.get("val_loss")).cloned().unwrap())
            .collect()
    };
    assert_eq!(losses(&run), losses(&run2));
}

#[test]
fn byte_level_bpe_prepare_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("c.txt");
    let text = format!("{}\nnaïve café — 東京 🙂\n", corpus(40_000));
    std::fs::write(&input, &text).unwrap();
    let data = tmp.path().join("data");
    ok(&[
        "prepare",
        "--input",
        s(&input),
        "--out",
        s(&data),
        "--tokenizer",
        "bpe:400",
        "--val-fraction",
        "0.2",
    ]);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("meta.json")).unwrap()).unwrap();
    assert_eq!(meta["vocab_size"], 400);
    let tok = lmforge::data::TextTokenizer::from_file(&data.join("tokenizer.json")).unwrap();
    let read = |f: &str| lmforge::data::TokenShard::open(&data.join(f), Some(400)).unwrap();
    let (a, b) = (read("train.bin"), read("val.bin"));
    let mut all = a.slice(0, a.len());
    all.extend(b.slice(0, b.len()));
    assert!(
        all.len() * 4 < text.len() * 3,
        "BPE should compress: {} tokens for {} bytes",
        all.len(),
        text.len()
    );
    assert_eq!(all[0], tok.eot_id());
    assert_same_text(&tok.decode(&all).unwrap(), &text);
    // Reusing the trained tokenizer.json gives the same ids.
    let again = tmp.path().join("again");
    ok(&[
        "prepare",
        "--input",
        s(&input),
        "--out",
        s(&again),
        "--tokenizer",
        s(&data.join("tokenizer.json")),
        "--val-fraction",
        "0.2",
    ]);
    assert_eq!(
        std::fs::read(again.join("train.bin")).unwrap(),
        std::fs::read(data.join("train.bin")).unwrap()
    );
}

#[test]
fn bad_input_gives_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = |name: &str| -> PathBuf { tmp.path().join(name) };
    let out = p("out");

    let e = fails(&["prepare", "--input", s(&p("missing.txt")), "--out", s(&out)]);
    assert!(
        e.contains("missing.txt") && e.contains("no such file"),
        "{e}"
    );

    std::fs::write(p("bad.txt"), b"hello\n\xff\xfeworld").unwrap();
    let e = fails(&["prepare", "--input", s(&p("bad.txt")), "--out", s(&out)]);
    assert!(
        e.contains("bad.txt") && e.contains("invalid UTF-8 at byte offset 6"),
        "{e}"
    );

    std::fs::write(p("empty.txt"), "\u{7}\u{1}").unwrap();
    let e = fails(&["prepare", "--input", s(&p("empty.txt")), "--out", s(&out)]);
    assert!(e.contains("empty"), "{e}");

    let e = fails(&[
        "prepare",
        "--input",
        s(&p("bad.txt")),
        "--out",
        s(&out),
        "--tokenizer",
        "wordpiece",
    ]);
    assert!(e.contains("wordpiece"), "{e}");

    let e = fails(&["train", "--out", s(&p("run")), "--set", "learning_rate=1"]);
    assert!(
        e.contains("unknown key") && e.contains("learning_rate") && e.contains("n_layer"),
        "{e}"
    );
    let e = fails(&["train", "--out", s(&p("run")), "--set", "max_steps=ten"]);
    assert!(e.contains("max_steps"), "{e}");
    std::fs::write(p("preset.toml"), "n_layers = 3\n").unwrap();
    let e = fails(&["train", "--config", s(&p("preset.toml"))]);
    assert!(e.contains("preset.toml") && e.contains("n_layers"), "{e}");

    // Token files: truncated, wrong magic, ids beyond the model's vocabulary.
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gpt2-tiny/model");
    let mut shard = vec![0u8; 1024];
    shard[..4].copy_from_slice(&20240520i32.to_le_bytes());
    shard[4..8].copy_from_slice(&1i32.to_le_bytes());
    shard[8..12].copy_from_slice(&100i32.to_le_bytes());
    shard.extend(std::iter::repeat_n(0u8, 150));
    std::fs::write(p("short.bin"), &shard).unwrap();
    let e = fails(&["eval", "--model", s(&model), "--data", s(&p("short.bin"))]);
    assert!(e.contains("short.bin") && e.contains("truncated"), "{e}");
    shard.truncate(1024);
    shard[8..12].copy_from_slice(&2i32.to_le_bytes());
    shard.extend([1, 0, 0x10, 0x27]); // tokens 1 and 10000
    std::fs::write(p("big.bin"), &shard).unwrap();
    let e = fails(&["eval", "--model", s(&model), "--data", s(&p("big.bin"))]);
    assert!(e.contains("big.bin") && e.contains("token 10000"), "{e}");
    shard[0] = 0;
    std::fs::write(p("magic.bin"), &shard).unwrap();
    let e = fails(&["eval", "--model", s(&model), "--data", s(&p("magic.bin"))]);
    assert!(e.contains("magic.bin") && e.contains("bad magic"), "{e}");

    let e = fails(&[
        "eval",
        "--model",
        s(&p("nowhere")),
        "--data",
        s(&p("magic.bin")),
    ]);
    assert!(
        e.contains("nowhere") && e.contains("not a model directory"),
        "{e}"
    );
    let e = fails(&["generate", "--model", s(&model), "--prompt", "hi"]);
    assert!(e.contains("tokenizer.json"), "{e}");
    let e = fails(&["generate", "--model", s(&model), "--prompt-ids", "1,99999"]);
    assert!(e.contains("vocabulary"), "{e}");
    // Nothing was half-written along the way.
    assert!(
        !out.exists()
            || std::fs::read_dir(&out).unwrap().all(|e| !e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains("tmp"))
    );
}

#[test]
fn resume_from_a_checkpoint_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("c.txt");
    std::fs::write(&input, corpus(40_000)).unwrap();
    let data = tmp.path().join("data");
    ok(&["prepare", "--input", s(&input), "--out", s(&data)]);
    let run = |dir: &Path, extra: &[&str]| {
        let mut args = vec!["train", "--data", s(&data), "--out", s(dir)];
        args.extend_from_slice(TINY_MODEL);
        args.extend_from_slice(TINY);
        args.extend_from_slice(&["--set", "keep_last=0", "--set", "dropout=0.1"]);
        args.extend_from_slice(extra);
        ok(&args)
    };
    let straight = tmp.path().join("straight");
    run(&straight, &[]);

    // Rewind a copy of the run to its step-20 checkpoint, as if it had stopped there.
    let resumed = tmp.path().join("resumed");
    std::fs::create_dir_all(resumed.join("checkpoints")).unwrap();
    let copy = |from: &Path, to: &Path| {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    };
    copy(
        &straight.join("checkpoints/step-000020"),
        &resumed.join("checkpoints/step-000020"),
    );
    std::fs::write(resumed.join("checkpoints/latest"), "step-000020").unwrap();
    std::fs::copy(
        straight.join("metrics.jsonl"),
        resumed.join("metrics.jsonl"),
    )
    .unwrap();
    ok(&["train", "--out", s(&resumed), "--resume"]);

    let weights =
        |dir: &Path| std::fs::read(dir.join("checkpoints/step-000050/model.safetensors")).unwrap();
    assert!(
        weights(&straight) == weights(&resumed),
        "resumed weights differ from the uninterrupted run"
    );
    let numbers = |dir: &Path| metric_values(dir, &["step", "loss", "lr", "grad_norm", "val_loss"]);
    assert_eq!(numbers(&straight), numbers(&resumed));
    let e = fails(&["train", "--out", s(&tmp.path().join("fresh")), "--resume"]);
    assert!(e.contains("nothing to resume"), "{e}");
}

#[test]
fn bench_reports_consistent_figures() {
    let out = ok(&[
        "bench",
        "--preset",
        "small",
        "--steps",
        "3",
        "--warmup",
        "1",
        "--generate-tokens",
        "8",
        "--threads",
        "1",
        "--json",
    ]);
    let r: Value = serde_json::from_str(out.trim()).expect("one JSON object");
    let f = |k: &str| {
        r[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing in {r}"))
    };
    assert_eq!(r["preset"], "small");
    // 12 rows × 64 tokens per step.
    assert!((f("tokens_per_s") * f("ms_per_step") / 1e3 - 768.0).abs() < 1e-6);
    assert!(f("ms_min") <= f("ms_per_step") && f("ms_per_step") <= f("ms_max"));
    assert!((f("mfu") - f("gflops") / f("ceiling_gflops")).abs() < 1e-12);
    assert!(f("ceiling_gflops") > 1.0 && f("peak_rss_mb") > 1.0);
    assert!(f("generate_tokens_per_s") > 0.0);
    let err = fails(&["bench", "--preset", "huge"]);
    assert!(err.contains("unknown preset \"huge\""), "{err}");
}
