//! `lmforge prepare --task classify`: labelled JSONL, CSV and TSV into token shards
//! and example indexes; stable label order, a stratified split, and bad input refused
//! in one line naming the file and line.

mod common;
use common::*;
use lmforge::data::labelled::{ClassificationMeta, ExampleIndex};
use lmforge::data::{TextTokenizer, TokenShard};
use std::path::Path;

/// `lmforge prepare --task classify ARGS…`, which must succeed.
fn prepare_classify(args: &[&str]) -> String {
    ok(&[&["prepare", "--task", "classify"], args].concat())
}

fn meta(dir: &Path) -> ClassificationMeta {
    serde_json::from_str(&std::fs::read_to_string(dir.join("meta.json")).unwrap()).unwrap()
}

/// Every example of a split as (token ids, label index).
fn examples(dir: &Path, split: &str, labels: usize) -> Vec<(Vec<u32>, u32)> {
    let shard = TokenShard::open(&dir.join(format!("{split}.bin")), None).unwrap();
    let index = ExampleIndex::open(&dir.join(format!("{split}.examples")), &shard, labels).unwrap();
    (0..index.len())
        .map(|i| {
            let (start, len, label) = index.get(i);
            (shard.slice(start, start + len), label)
        })
        .collect()
}

#[test]
fn jsonl_csv_and_tsv_become_shards_with_stable_labels_and_a_stratified_split() {
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("a.jsonl");
    let mut lines = String::new();
    for i in 0..60 {
        let label = if i % 3 == 0 { "positive" } else { "negative" };
        lines +=
            &format!("{{\"text\": \"review number {i} was {label}\", \"label\": \"{label}\"}}\n");
    }
    std::fs::write(&jsonl, lines).unwrap();
    let out = tmp.path().join("j");
    prepare_classify(&[
        "--input",
        s(&jsonl),
        "--out",
        s(&out),
        "--tokenizer",
        "wordpiece:200",
        "--val-fraction",
        "0.25",
    ]);
    let m = meta(&out);
    assert_eq!(m.labels, vec!["negative", "positive"]);
    assert_eq!((m.train_examples, m.val_examples), (45, 15));
    let val = examples(&out, "val", 2);
    // Stratified: 40 negative and 20 positive give 10 and 5.
    assert_eq!(val.iter().filter(|(_, l)| *l == 1).count(), 5);
    // Tokens read back equal the tokenizer's ids for the text.
    let tok = TextTokenizer::from_file(&out.join("tokenizer.json")).unwrap();
    let train = examples(&out, "train", 2);
    let first = tok.decode(&train[0].0).unwrap();
    assert!(first.starts_with("review number"), "{first}");

    // CSV with quoted separators and newlines, integer labels sorted numerically.
    let csv = tmp.path().join("b.csv");
    std::fs::write(
        &csv,
        "id,review,stars\n1,\"good, really \"\"good\"\"\",10\n2,\"bad\nand long\",2\n3,fine,2\n4,great,10\n5,poor,2\n6,super,10\n",
    )
    .unwrap();
    let out = tmp.path().join("c");
    prepare_classify(&[
        "--input",
        s(&csv),
        "--out",
        s(&out),
        "--text-field",
        "review",
        "--label-field",
        "stars",
        "--tokenizer",
        "char",
        "--val-fraction",
        "0.34",
    ]);
    let m = meta(&out);
    assert_eq!(m.labels, vec!["2", "10"]);
    let tok = TextTokenizer::from_file(&out.join("tokenizer.json")).unwrap();
    let all: Vec<String> = ["train", "val"]
        .iter()
        .flat_map(|split| examples(&out, split, 2))
        .map(|(ids, _)| tok.decode(&ids).unwrap())
        .collect();
    assert!(
        all.contains(&"good, really \"good\"".to_string()),
        "{all:?}"
    );
    assert!(all.contains(&"bad\nand long".to_string()), "{all:?}");

    // TSV, with a validation file of its own.
    let tsv = tmp.path().join("t.tsv");
    std::fs::write(
        &tsv,
        "text\tlabel\nyes indeed\t1\nno way\t0\nsure thing\t1\nnot at all\t0\n",
    )
    .unwrap();
    let val_file = tmp.path().join("v.tsv");
    std::fs::write(&val_file, "text\tlabel\nyes\t1\n").unwrap();
    let out = tmp.path().join("t");
    prepare_classify(&["--input", s(&tsv), "--val", s(&val_file), "--out", s(&out)]);
    let m = meta(&out);
    assert_eq!(
        (m.labels.len(), m.train_examples, m.val_examples),
        (2, 4, 1)
    );
    assert_eq!(examples(&out, "val", 2)[0].1, 1);
}

#[test]
fn bad_labelled_input_gets_one_line_errors_naming_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let prepare = |file: &Path, extra: &[&str]| {
        let mut args = vec![
            "prepare",
            "--task",
            "classify",
            "--input",
            s(file),
            "--out",
            s(&out),
        ];
        args.extend_from_slice(extra);
        fails(&args)
    };
    let write = |name: &str, text: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let val = write("v.jsonl", "{\"text\": \"c\", \"label\": \"z\"}\n");
    let cases: [(&str, &str, &[&str], &[&str]); 5] = [
        (
            "m.jsonl",
            "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"b\", \"label\": 0}\n{\"text\": \"c\"}\n",
            &[],
            &["m.jsonl:3", "missing label"],
        ),
        (
            "e.jsonl",
            "{\"text\": \"a\", \"label\": 1}\n{\"text\": \"  \", \"label\": 0}\n",
            &[],
            &["e.jsonl:2", "empty text"],
        ),
        (
            "q.csv",
            "text,label\n\"fine\",1\n\"broken,0\nmore,1\n",
            &[],
            &["q.csv"],
        ),
        (
            "one.jsonl",
            "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"x\"}\n",
            &[],
            &["one.jsonl", "only one class"],
        ),
        (
            "g.jsonl",
            "{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\", \"label\": \"y\"}\n",
            &["--val", s(&val)],
            &["v.jsonl:1", "\"z\""],
        ),
    ];
    for (name, text, extra, says) in cases {
        let e = prepare(&write(name, text), extra);
        for want in says {
            assert!(e.contains(want), "{name}: {e}");
        }
    }
    let e = prepare(&write("x.txt", "hello\n"), &[]);
    assert!(e.contains("x.txt") && e.contains(".jsonl"), "{e}");
}

#[test]
fn eval_of_a_classifier_reports_scikit_learns_figures_batch_independently() {
    use lmforge::data::labelled::{classification_batch, LabelledSplit};
    use lmforge::metrics::ClassificationReport;
    let tmp = tempfile::tempdir().unwrap();
    let jsonl = tmp.path().join("a.jsonl");
    let text = corpus(20_000);
    let mut lines = String::new();
    for (i, line) in text.lines().filter(|l| l.len() > 3).take(90).enumerate() {
        let line = line.replace('"', "'");
        lines += &format!("{{\"text\": \"{line}\", \"label\": \"class_{}\"}}\n", i % 3);
    }
    std::fs::write(&jsonl, lines).unwrap();
    let data = tmp.path().join("d");
    prepare_classify(&[
        "--input",
        s(&jsonl),
        "--out",
        s(&data),
        "--tokenizer",
        "wordpiece:300",
        "--val-fraction",
        "0.5",
    ]);
    let model_dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bert-cls-tiny/model");
    let out: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--model",
        s(&model_dir),
        "--data",
        s(&data),
        "--json",
    ]))
    .unwrap();
    assert_eq!(out["examples"], 45);
    assert_eq!(
        out["labels"],
        serde_json::json!(["class_0", "class_1", "class_2"])
    );

    // The same predictions one example at a time (no padding), scored independently.
    let model = lmforge::model::hf::load(&model_dir, &candle_core::Device::Cpu).unwrap();
    let tok = TextTokenizer::from_file(&data.join("tokenizer.json")).unwrap();
    let framing = lmforge::eval::framing(&model, Some(&tok)).unwrap();
    let split = LabelledSplit::open(&data, "val", 3).unwrap();
    let (mut truth, mut predicted) = (Vec::new(), Vec::new());
    for i in 0..split.len() {
        let example = split.example(i);
        let b = classification_batch(std::slice::from_ref(&example), &framing);
        let logits: Vec<f32> = model
            .classify_logits(&b, None)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let best = (0..3)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        predicted.push(best);
        truth.push(example.1 as usize);
    }
    let want = ClassificationReport::new(&truth, &predicted, 3).unwrap();
    assert_eq!(out["accuracy"].as_f64().unwrap(), want.accuracy);
    assert_eq!(out["mcc"].as_f64().unwrap(), want.mcc);
    assert_eq!(out["macro_f1"].as_f64().unwrap(), want.macro_f1);
    assert_eq!(out["confusion"], serde_json::json!(want.confusion));

    // A label the model does not know.
    let other = tmp.path().join("o.jsonl");
    std::fs::write(&other, "{\"text\": \"the king\", \"label\": \"class_0\"}\n{\"text\": \"the queen\", \"label\": \"other\"}\n{\"text\": \"a lord\", \"label\": \"other\"}\n").unwrap();
    let data2 = tmp.path().join("d2");
    prepare_classify(&[
        "--input",
        s(&other),
        "--out",
        s(&data2),
        "--tokenizer",
        s(&data.join("vocab.txt")),
    ]);
    let e = fails(&["eval", "--model", s(&model_dir), "--data", s(&data2)]);
    assert!(e.contains("meta.json") && e.contains("\"other\""), "{e}");
}
