//! Classification metrics equal to scikit-learn's on the same predictions:
//! `accuracy_score`, `precision_recall_fscore_support` (per class and macro, over
//! every label `0..num_labels` so a class with no support still counts, and
//! `zero_division=0`: a ratio with an empty denominator is 0), `matthews_corrcoef`
//! (its multiclass form, 0 when either marginal is constant) and `confusion_matrix`
//! (rows: true label, columns: predicted). `tests/classification_metrics.rs` holds them
//! to scikit-learn's stored outputs.

use anyhow::{ensure, Result};
use serde::Serialize;

/// Every figure of one evaluation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassificationReport {
    pub accuracy: f64,
    pub precision: Vec<f64>,
    pub recall: Vec<f64>,
    pub f1: Vec<f64>,
    /// How many examples of each class the truth holds.
    pub support: Vec<usize>,
    pub macro_precision: f64,
    pub macro_recall: f64,
    pub macro_f1: f64,
    pub mcc: f64,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
}

/// `num / den`, or 0 when `den` is 0 (scikit-learn's `zero_division=0`).
fn ratio(num: f64, den: f64) -> f64 {
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

impl ClassificationReport {
    /// The report for predictions `predicted` of labels `truth` among `num_labels`.
    pub fn new(truth: &[usize], predicted: &[usize], num_labels: usize) -> Result<Self> {
        ensure!(
            truth.len() == predicted.len(),
            "{} labels but {} predictions",
            truth.len(),
            predicted.len()
        );
        ensure!(!truth.is_empty(), "no examples to score");
        ensure!(num_labels > 0, "no labels");
        if let Some(bad) = truth.iter().chain(predicted).find(|&&l| l >= num_labels) {
            anyhow::bail!("label {bad} is outside the {num_labels} labels");
        }
        let k = num_labels;
        let mut confusion = vec![vec![0usize; k]; k];
        for (&t, &p) in truth.iter().zip(predicted) {
            confusion[t][p] += 1;
        }
        let true_counts: Vec<f64> = (0..k)
            .map(|c| confusion[c].iter().sum::<usize>() as f64)
            .collect();
        let predicted_counts: Vec<f64> = (0..k)
            .map(|c| confusion.iter().map(|row| row[c]).sum::<usize>() as f64)
            .collect();
        let hits: Vec<f64> = (0..k).map(|c| confusion[c][c] as f64).collect();
        let precision: Vec<f64> = (0..k)
            .map(|c| ratio(hits[c], predicted_counts[c]))
            .collect();
        let recall: Vec<f64> = (0..k).map(|c| ratio(hits[c], true_counts[c])).collect();
        // F1 from the counts, as scikit-learn computes it: 2tp / (2tp + fp + fn).
        let f1: Vec<f64> = (0..k)
            .map(|c| ratio(2.0 * hits[c], true_counts[c] + predicted_counts[c]))
            .collect();
        let n = truth.len() as f64;
        let correct: f64 = hits.iter().sum();
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let cov_true_pred = correct * n - dot(&true_counts, &predicted_counts);
        let cov_pred = n * n - dot(&predicted_counts, &predicted_counts);
        let cov_true = n * n - dot(&true_counts, &true_counts);
        let mcc = if cov_pred * cov_true == 0.0 {
            0.0
        } else {
            cov_true_pred / (cov_true * cov_pred).sqrt()
        };
        Ok(ClassificationReport {
            accuracy: correct / n,
            macro_precision: mean(&precision),
            macro_recall: mean(&recall),
            macro_f1: mean(&f1),
            precision,
            recall,
            f1,
            support: true_counts.iter().map(|&c| c as usize).collect(),
            mcc,
            confusion,
        })
    }
}
