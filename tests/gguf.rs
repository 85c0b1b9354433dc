//! GGUF quantisation: write then read back, quantisation error per type, quantised
//! products against f32, commands on a `.gguf`, bad files — and llama.cpp itself
//! (llama-cpp-python from PyPI) loading our file and agreeing with us.

mod common;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use common::*;
use lmforge::data::TextTokenizer;
use lmforge::model::gguf::{self, QuantType};
use lmforge::model::hf;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A small GPT-2 with a byte-level BPE of 512 tokens, trained briefly.
fn bpe_model(tmp: &Path) -> (PathBuf, PathBuf) {
    let data = prepare_with(tmp, 60_000, "bpe:512");
    let run = tmp.join("run");
    train_quick(
        &data,
        &run,
        &[
            "--set",
            "n_embd=64",
            "--set",
            "block_size=64",
            "--set",
            "max_steps=120",
            "--set",
            "lr=3e-3",
        ],
    );
    (run, data)
}

fn rel_rms(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().mean_all().unwrap();
    let n = b.sqr().unwrap().mean_all().unwrap();
    (d.to_scalar::<f32>().unwrap() as f64 / n.to_scalar::<f32>().unwrap() as f64).sqrt()
}

#[test]
fn quantisation_error_per_type_and_quantised_products_against_f32() {
    // Seeded normal draws (weights of GPT-2's init scale, unit activations).
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(5);
    let mut normal = |n: usize, std: f32| -> Vec<f32> {
        let d = rand_distr::Normal::new(0f32, std).unwrap();
        (0..n).map(|_| rand::Rng::sample(&mut rng, d)).collect()
    };
    let w = Tensor::from_vec(normal(96 * 256, 0.02), (96, 256), &Device::Cpu).unwrap();
    let x = Tensor::from_vec(normal(7 * 256, 1.0), (7, 256), &Device::Cpu).unwrap();
    let exact = x.matmul(&w.t().unwrap()).unwrap();
    // Relative RMS error of the weights after a round trip, and of the product
    // (measured: q8_0 0.54 % / 0.87 %, q4_0 8.6 % / 8.5 %, q4_k 7.5 % / 7.1 %).
    for (qtype, weights_bound, product_bound) in [
        (QuantType::Q8_0, 0.007, 0.012),
        (QuantType::Q4_0, 0.1, 0.1),
        (QuantType::Q4K, 0.09, 0.09),
    ] {
        let back = gguf::round_trip(&w, qtype).unwrap();
        let e = rel_rms(&back, &w);
        assert!(e < weights_bound && e > 0.0, "{qtype:?}: weights {e}");
        let dtype = match qtype {
            QuantType::Q8_0 => GgmlDType::Q8_0,
            QuantType::Q4_0 => GgmlDType::Q4_0,
            QuantType::Q4K => GgmlDType::Q4K,
        };
        let q = QMatMul::from_qtensor(QTensor::quantize(&w, dtype).unwrap()).unwrap();
        let y = q.forward(&x).unwrap();
        let e = rel_rms(&y, &exact);
        assert!(e < product_bound, "{qtype:?}: product {e}");
        // Against the dequantised weights the product differs only by the
        // activations' own 8-bit blocks.
        let e = rel_rms(&y, &x.matmul(&back.t().unwrap()).unwrap());
        assert!(
            e < 0.01,
            "{qtype:?}: product against dequantised weights {e}"
        );
    }
}

#[test]
fn a_gguf_reads_back_as_written_and_runs_within_one_percent_of_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let (run, data) = bpe_model(tmp.path());
    let dir = lmforge::train::checkpoint::resolve_model_dir(&run).unwrap();
    let file = tmp.path().join("m.gguf");
    let out = String::from_utf8(quantize(&run, "q8_0", &file).stdout).unwrap();
    assert!(out.contains("9 matrices quantised"), "{out}");

    // Every weight reads back as the quantise → dequantise round trip of the original
    // (f32 where it was kept), and the tokenizer encodes as the original.
    let original = hf::load_gpt(&dir, &Device::Cpu, "test").unwrap();
    let (back, tokenizer) = gguf::read(&file, &Device::Cpu).unwrap();
    assert!(back.is_quantized());
    assert_eq!(back.config.n_layer, 2);
    let names: Vec<(String, Tensor)> = original
        .params()
        .iter()
        .map(|p| (p.name.clone(), p.tensor().clone()))
        .collect();
    for (p, (name, t)) in back.params().iter().zip(&names) {
        assert_eq!(&p.name, name);
        let matrix = t.rank() == 2 && !name.contains("wpe");
        let want = match matrix {
            true if name.contains("wte") => gguf::round_trip(t, QuantType::Q8_0).unwrap(),
            true => gguf::round_trip(&t.t().unwrap().contiguous().unwrap(), QuantType::Q8_0)
                .unwrap()
                .t()
                .unwrap(),
            false => t.clone(),
        };
        assert_eq!(to_vec(p.tensor()), to_vec(&want), "{name}");
    }
    let original_tok = TextTokenizer::from_model_dir(&dir).unwrap().unwrap();
    let tokenizer = tokenizer.expect("the GGUF carries its tokenizer");
    for text in [
        "ROMEO:\nWhat light through yonder window breaks?",
        "  odd   spacing\t",
    ] {
        assert_eq!(
            tokenizer.encode(text).unwrap(),
            original_tok.encode(text).unwrap()
        );
    }

    // eval of the q8_0 file within 1 % of f32; q4_0 reported, within 10 %.
    let loss = |model: &Path| -> f64 {
        let r: Value = serde_json::from_str(&ok(&[
            "eval",
            "--model",
            s(model),
            "--data",
            s(&data),
            "--json",
        ]))
        .unwrap();
        r["loss"].as_f64().unwrap()
    };
    let (f32_loss, q8) = (loss(&run), loss(&file));
    assert!(
        (q8 - f32_loss).abs() / f32_loss < 0.01,
        "{q8} vs {f32_loss}"
    );
    let q4 = tmp.path().join("m4.gguf");
    assert!(quantize(&run, "q4_0", &q4).status.success());
    assert!((loss(&q4) - f32_loss).abs() / f32_loss < 0.1);
    // generate and bench take the file.
    let g = greedy(&file, "ROMEO:", 8);
    assert_eq!(
        g["samples"][0]["ids"].as_array().unwrap().len(),
        tokenizer.encode("ROMEO:").unwrap().len() + 8
    );
    let b: Value = serde_json::from_str(&ok(&[
        "bench",
        "--preset",
        s(&file),
        "--generate-tokens",
        "16",
        "--json",
    ]))
    .unwrap();
    assert!(b["generate_tokens_per_s"].as_f64().unwrap() > 0.0, "{b}");

    // Bad files and types: one line, naming the file.
    let bytes = std::fs::read(&file).unwrap();
    let cut = tmp.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["eval", "--model", s(&cut), "--data", s(&data)]);
    assert!(e.contains("cut.gguf") && e.contains("truncated"), "{e}");
    let foreign = tmp.path().join("foreign.gguf");
    std::fs::write(&foreign, "not a gguf at all").unwrap();
    let e = fails(&["generate", "--model", s(&foreign), "--prompt-ids", "1"]);
    assert!(e.contains("foreign.gguf") && e.contains("GGUF"), "{e}");
    // q4_k's blocks of 256 fit only the MLP's down projection (rows of 4 × 64).
    let k = quantize(&run, "q4_k", &tmp.path().join("k.gguf"));
    let k = String::from_utf8(k.stdout).unwrap();
    assert!(
        k.contains("2 matrices quantised") && k.contains("kept in f16: token_embd.weight"),
        "{k}"
    );
    let e = one_line_error(&quantize(&run, "q2", &tmp.path().join("k.gguf")));
    assert!(e.contains("--type q2"), "{e}");
    let chars = prepare_char(&tmp.path().join("c"), 5_000);
    let char_run = tmp.path().join("char-run");
    train_quick(&chars, &char_run, &["--set", "max_steps=1"]);
    let e = one_line_error(&quantize(&char_run, "q8_0", &tmp.path().join("c.gguf")));
    assert!(e.contains("byte-level BPE"), "{e}");
    // Width 32: no matrix has rows of a multiple of 256.
    let e = one_line_error(&quantize(&char_run, "q4_k", &tmp.path().join("c.gguf")));
    assert!(e.contains("256") && e.contains("q8_0"), "{e}");

    llama_cpp_agrees(&file, &data, &tokenizer);
}

fn llama_cpp_agrees(file: &Path, data: &Path, tokenizer: &TextTokenizer) {
    let Some(python) = peer_venv(
        "gguf-venv",
        &["llama-cpp-python", "gguf", "numpy"],
        "llama_cpp, gguf, numpy",
    ) else {
        return;
    };
    // 64 validation tokens (one context), and a prompt.
    let shard = lmforge::data::TokenShard::open(&data.join("val.bin"), None).unwrap();
    let ids: Vec<u32> = shard.slice(0, 64);
    let prompt = tokenizer.encode("ROMEO:").unwrap();
    let join = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/llama_cpp_check.py");
    let out = Command::new(&python)
        .args([
            s(&script),
            s(file),
            "--ids",
            &join(&ids),
            "--prompt-ids",
            &join(&prompt),
            "--new",
            "20",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Value = serde_json::from_slice(&out.stdout).unwrap();
    // The gguf package reads our layout: names, types, shapes (ggml order), metadata.
    assert_eq!(theirs["metadata"]["general.architecture"], "gpt2");
    assert_eq!(theirs["metadata"]["gpt2.block_count"], 2);
    assert_eq!(
        theirs["tensors"]["blk.0.attn_qkv.weight"],
        serde_json::json!(["Q8_0", [64, 192]])
    );
    assert_eq!(theirs["tensors"]["output_norm.bias"][0], "F32");
    // Mean loss over the same 64 tokens within 1 %, and the same greedy tokens.
    let tokens = lmforge::data::ShardWriter::create(&file.with_extension("bin"), 512).unwrap();
    let mut tokens = tokens;
    tokens.write(&ids).unwrap();
    tokens.finish().unwrap();
    let ours: Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        s(file),
        "--data",
        s(&file.with_extension("bin")),
        "--json",
    ]))
    .unwrap();
    let (a, b) = (
        ours["loss"].as_f64().unwrap(),
        theirs["loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() / b < 0.01, "loss: lmforge {a}, llama.cpp {b}");
    let g: Value = serde_json::from_str(&ok(&[
        "generate",
        "--model",
        s(file),
        "--prompt-ids",
        &join(&prompt),
        "--greedy",
        "--max-new-tokens",
        "20",
        "--json",
    ]))
    .unwrap();
    assert_eq!(g["samples"][0]["ids"], theirs["greedy"], "greedy tokens");
}
