//! Classification metrics against scikit-learn's outputs on the same predictions
//! (tests/fixtures/classification-metrics/cases.json, made by
//! scripts/sklearn_metric_cases.py): random, perfect, all-wrong, single-class,
//! never-predicted and no-support cases.

mod common;
use common::floats;
use lmforge::metrics::ClassificationReport;
use serde_json::Value;
use std::path::Path;

fn usizes(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12
}

#[test]
fn every_figure_equals_scikit_learns() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/classification-metrics/cases.json");
    let cases: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let k = c["num_labels"].as_u64().unwrap() as usize;
        let r = ClassificationReport::new(&usizes(&c["y_true"]), &usizes(&c["y_pred"]), k).unwrap();
        for (ours, key) in [
            (r.accuracy, "accuracy"),
            (r.macro_precision, "macro_precision"),
            (r.macro_recall, "macro_recall"),
            (r.macro_f1, "macro_f1"),
            (r.mcc, "mcc"),
        ] {
            let want = c[key].as_f64().unwrap();
            assert!(close(ours, want), "{name}: {key} {ours} vs {want}");
        }
        for (ours, key) in [
            (&r.precision, "precision"),
            (&r.recall, "recall"),
            (&r.f1, "f1"),
        ] {
            let want = floats(&c[key]);
            assert!(
                ours.iter().zip(&want).all(|(a, b)| close(*a, *b)),
                "{name}: {key} {ours:?} vs {want:?}"
            );
        }
        assert_eq!(r.support, usizes(&c["support"]), "{name}: support");
        let confusion: Vec<Vec<usize>> = c["confusion"]
            .as_array()
            .unwrap()
            .iter()
            .map(usizes)
            .collect();
        assert_eq!(r.confusion, confusion, "{name}: confusion matrix");
    }
}

#[test]
fn bad_inputs_are_refused() {
    assert!(ClassificationReport::new(&[0, 1], &[0], 2).is_err());
    assert!(ClassificationReport::new(&[], &[], 2).is_err());
    let e = ClassificationReport::new(&[0, 3], &[0, 1], 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("label 3") && e.contains("2 labels"), "{e}");
}
