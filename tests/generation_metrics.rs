//! BLEU and chrF against sacreBLEU's stored outputs (`scripts/sacrebleu_cases.py`):
//! several references, empty and short hypotheses, numbers with commas and hyphens,
//! HTML entities, Unicode, every tokenizer, lowercased or not, corpus and sentence.

mod common;
use common::*;
use lmforge::metrics::generation::{corpus_score, sentence_scores, ScoreOptions, Tokenize};
use serde_json::Value;
use std::path::Path;

fn cases() -> Value {
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/generation-metrics/cases.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() <= 0.01, "{what}: lmforge {a}, sacreBLEU {b}");
}

#[test]
fn bleu_and_chrf_equal_sacrebleu_on_stored_cases() {
    let all = cases();
    for case in all["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let hyps = strings(&case["hyps"]);
        let refs: Vec<Vec<String>> = case["refs"]
            .as_array()
            .unwrap()
            .iter()
            .map(strings)
            .collect();
        for (key, want) in case["bleu"].as_object().unwrap() {
            let (tok, lowercase) = match key.strip_suffix("-lc") {
                Some(t) => (t, true),
                None => (key.as_str(), false),
            };
            let opts = ScoreOptions {
                chrf: false,
                tokenize: Tokenize::parse(tok).unwrap(),
                lowercase,
            };
            let got = corpus_score(&hyps, &refs, &opts).unwrap();
            let what = format!("{name} BLEU {key}");
            close(got.score, want["score"].as_f64().unwrap(), &what);
            close(got.bp.unwrap(), want["bp"].as_f64().unwrap(), &what);
            assert_eq!(
                got.sys_len.unwrap(),
                want["sys_len"].as_u64().unwrap(),
                "{what}"
            );
            assert_eq!(
                got.ref_len.unwrap(),
                want["ref_len"].as_u64().unwrap(),
                "{what}"
            );
            for (p, q) in got
                .precisions
                .unwrap()
                .iter()
                .zip(want["precisions"].as_array().unwrap())
            {
                close(*p, q.as_f64().unwrap(), &what);
            }
            let sentences = sentence_scores(&hyps, &refs, &opts).unwrap();
            for (i, (s, w)) in sentences
                .iter()
                .zip(case["sentence_bleu"][key].as_array().unwrap())
                .enumerate()
            {
                close(
                    s.score,
                    w.as_f64().unwrap(),
                    &format!("{what} sentence {i}"),
                );
            }
        }
        for (key, lowercase) in [("mixed", false), ("lc", true)] {
            let opts = ScoreOptions {
                chrf: true,
                tokenize: Tokenize::None,
                lowercase,
            };
            let got = corpus_score(&hyps, &refs, &opts).unwrap();
            close(
                got.score,
                case["chrf"][key].as_f64().unwrap(),
                &format!("{name} chrF {key}"),
            );
        }
        let opts = ScoreOptions {
            chrf: true,
            tokenize: Tokenize::None,
            lowercase: false,
        };
        for (i, (s, w)) in sentence_scores(&hyps, &refs, &opts)
            .unwrap()
            .iter()
            .zip(case["sentence_chrf"].as_array().unwrap())
            .enumerate()
        {
            close(
                s.score,
                w.as_f64().unwrap(),
                &format!("{name} chrF sentence {i}"),
            );
        }
    }
}

#[test]
fn score_command_prints_the_signature_and_refuses_mismatched_files() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let hyp = write("hyp.txt", "The cat sat on the mat.\nIt works\n");
    let r1 = write("r1.txt", "The cat is on the mat.\nIt works well.\n");
    let r2 = write("r2.txt", "A cat sat on the mat.\nIt works fine.\n");
    let score = |metric: &str, refs: &[&Path], extra: &[&str]| {
        let mut a = vec!["score", "--metric", metric, "--hyp", s(&hyp)];
        refs.iter()
            .for_each(|r| a.extend_from_slice(&["--ref", s(r)]));
        a.extend_from_slice(extra);
        run(&a)
    };
    let text = |o: std::process::Output| String::from_utf8(o.stdout).unwrap();
    let out = text(score("bleu", &[&r1, &r2], &[]));
    assert!(
        out.starts_with("BLEU = ") && out.contains("nrefs:2|case:mixed|eff:no|tok:13a|smooth:exp"),
        "{out}"
    );
    let v: Value = serde_json::from_str(&text(score("chrf", &[&r1], &["--json"]))).unwrap();
    assert_eq!(v["metric"], "chrF2");
    assert!(
        v["score"].as_f64().unwrap() > 0.0 && v["signature"].as_str().unwrap().contains("nc:6")
    );
    let lines = text(score("bleu", &[&r1], &["--sentence", "--json"]));
    assert_eq!(lines.lines().count(), 2);
    let short = write("short.txt", "only one line\n");
    let e = one_line_error(&score("bleu", &[&short], &[]));
    assert!(
        e.contains("short.txt") && e.contains("1 lines") && e.contains("2"),
        "{e}"
    );
    let e = one_line_error(&score("rouge", &[&r1], &[]));
    assert!(e.contains("--metric rouge"), "{e}");
}

#[test]
fn eval_scores_a_models_greedy_continuations_as_score_does() {
    let tmp = tempfile::tempdir().unwrap();
    let data = prepare_char(tmp.path(), 30_000);
    let run = tmp.path().join("run");
    train_quick(
        &data,
        &run,
        &["--set", "block_size=64", "--set", "max_steps=40"],
    );
    let prompts = ["ROMEO:\nWhat", "First Citizen:\nWe", "Second"];
    let refs = ["ROMEO:\nWhat light", "the people", "Citizen"];
    let write = |name: &str, lines: &[&str]| {
        let p = tmp.path().join(name);
        std::fs::write(
            &p,
            lines
                .iter()
                .map(|l| format!("{}\n", l.replace('\n', " ")))
                .collect::<String>(),
        )
        .unwrap();
        p
    };
    let prompt_file = write("prompts.txt", &prompts);
    let ref_file = write("refs.txt", &refs);
    let out = ok(&[
        "eval",
        "--model",
        s(&run),
        "--prompts",
        s(&prompt_file),
        "--refs",
        s(&ref_file),
        "--max-new-tokens",
        "12",
        "--json",
    ]);
    let scores: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(scores.len(), 2);
    // The same continuations through generate, scored by `score`.
    let flat: Vec<String> = prompts.iter().map(|p| p.replace('\n', " ")).collect();
    let hyps: Vec<String> = flat
        .iter()
        .map(|p| {
            let g = greedy(&run, p, 12);
            let text = g["samples"][0]["text"].as_str().unwrap();
            text[p.len()..].lines().next().unwrap_or("").to_string()
        })
        .collect();
    let hyp_file = tmp.path().join("hyps.txt");
    std::fs::write(
        &hyp_file,
        hyps.iter().map(|h| format!("{h}\n")).collect::<String>(),
    )
    .unwrap();
    for (i, metric) in ["bleu", "chrf"].iter().enumerate() {
        let want: Value = serde_json::from_str(&ok(&[
            "score",
            "--metric",
            metric,
            "--hyp",
            s(&hyp_file),
            "--ref",
            s(&ref_file),
            "--json",
        ]))
        .unwrap();
        assert_eq!(scores[i]["score"], want["score"], "{metric}");
    }
    let short = write("short.txt", &["one"]);
    let e = fails(&[
        "eval",
        "--model",
        s(&run),
        "--prompts",
        s(&prompt_file),
        "--refs",
        s(&short),
    ]);
    assert!(e.contains("short.txt") && e.contains("prompts.txt"), "{e}");
}
