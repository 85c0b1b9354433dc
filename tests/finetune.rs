//! Fine-tuning a pretrained Hugging Face GPT-2 directory on a user's text file.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

fn eval_loss(model: &Path, data: &Path) -> f64 {
    let r: Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        s(model),
        "--data",
        s(data),
        "--json",
    ]))
    .unwrap();
    r["loss"].as_f64().unwrap()
}

#[test]
fn fine_tuning_a_pretrained_model_lowers_held_out_loss() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let pretrained = root.join("tests/fixtures/gpt2-tiny/model");
    let tmp = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root.join("data/shakespeare/input.txt")).unwrap();
    let input = tmp.path().join("my.txt");
    std::fs::write(&input, &text[..50_000]).unwrap();
    let data = tmp.path().join("data");
    // The fixture ships no tokenizer; a char tokenizer's 65 ids fit its 512-token vocabulary.
    ok(&[
        "prepare",
        "--input",
        s(&input),
        "--out",
        s(&data),
        "--tokenizer",
        "char",
    ]);
    let before = eval_loss(&pretrained, &data);

    let run = tmp.path().join("run");
    ok(&[
        "train",
        "--init-from",
        s(&pretrained),
        "--data",
        s(&data),
        "--out",
        s(&run),
        "--set",
        "block_size=32",
        "--set",
        "batch_size=8",
        "--set",
        "max_steps=40",
        "--set",
        "warmup_steps=4",
        "--set",
        "lr=3e-3",
        "--set",
        "eval_every=20",
        "--set",
        "eval_batches=4",
        "--set",
        "save_every=10",
        "--set",
        "keep_last=2",
        "--set",
        "sample_tokens=20",
    ]);
    // keep_last = 2: exactly the two newest checkpoints stay.
    let mut names: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, vec!["latest", "step-000030", "step-000040"]);
    for step in ["step-000030", "step-000040"] {
        let dir = run.join("checkpoints").join(step);
        let m = lmforge::model::hf::load_gpt(&dir, &candle_core::Device::Cpu, "test").unwrap();
        // The pretrained model's shape wins over the preset's 4 layers × 128 dims.
        assert_eq!(
            (
                m.config.n_layer,
                m.config.n_embd,
                m.config.vocab_size,
                m.config.n_positions
            ),
            (2, 64, 512, 64)
        );
        assert!(dir.join("tokenizer.json").exists() && dir.join("tokenizer_config.json").exists());
    }
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(run.join("checkpoints/step-000040/trainer_state.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        (
            state["config"]["n_layer"].as_u64(),
            state["config"]["n_embd"].as_u64()
        ),
        (Some(2), Some(64))
    );

    let after = eval_loss(&run, &data);
    assert!(after < before - 1.0, "held-out loss {before} → {after}");

    // HF generate vocabulary: max_length counts the prompt, num_return_sequences samples.
    let g: Value = serde_json::from_str(&ok(&[
        "generate",
        "--model",
        s(&run),
        "--prompt",
        "KING:",
        "--max-length",
        "25",
        "--num-return-sequences",
        "3",
        "--json",
    ]))
    .unwrap();
    let samples = g["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 3);
    for smp in samples {
        assert!(smp["ids"].as_array().unwrap().len() <= 25);
        assert!(!smp["text"].as_str().unwrap().contains("<|endoftext|>"));
    }

    // epochs instead of max_steps: ceil(0.05 × train tokens / (8 × 32)) steps.
    let run2 = tmp.path().join("run2");
    ok(&[
        "train",
        "--init-from",
        s(&pretrained),
        "--data",
        s(&data),
        "--out",
        s(&run2),
        "--set",
        "block_size=32",
        "--set",
        "batch_size=8",
        "--set",
        "epochs=0.05",
        "--set",
        "eval_every=0",
        "--set",
        "eval_batches=2",
        "--set",
        "sample_tokens=5",
    ]);
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("meta.json")).unwrap()).unwrap();
    let want = (0.05 * meta["train_tokens"].as_f64().unwrap() / 256.0).ceil() as usize;
    let steps = std::fs::read_to_string(run2.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"loss\""))
        .count();
    assert_eq!(steps, want);

    // A context longer than the model's is refused up front.
    let out = common::run(&[
        "train",
        "--init-from",
        s(&pretrained),
        "--data",
        s(&data),
        "--out",
        s(&run2),
        "--set",
        "block_size=65",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("block_size 65") && err.contains("64"),
        "{err}"
    );
}
