#!/usr/bin/env python3
"""The classical baseline: TF-IDF over word unigrams and bigrams, then logistic
regression (scikit-learn's defaults otherwise), trained on one labelled JSONL file and
scored on another with the same figures `lmforge eval --json` reports.

    python bench/tfidf_baseline.py TRAIN.jsonl TEST.jsonl [--json]
"""
import argparse
import json
from pathlib import Path

from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def read(path):
    rows = [json.loads(l) for l in Path(path).read_text(encoding="utf-8").split("\n") if l.strip()]
    return [r["text"] for r in rows], [r["label"] for r in rows]


ap = argparse.ArgumentParser()
ap.add_argument("train")
ap.add_argument("test")
ap.add_argument("--json", action="store_true")
a = ap.parse_args()
x_train, y_train = read(a.train)
x_test, y_test = read(a.test)
vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
model = LogisticRegression(max_iter=1000).fit(vectorizer.fit_transform(x_train), y_train)
predicted = model.predict(vectorizer.transform(x_test))
figures = {
    "accuracy": accuracy_score(y_test, predicted),
    "macro_f1": f1_score(y_test, predicted, average="macro"),
    "mcc": matthews_corrcoef(y_test, predicted),
    "examples": len(y_test),
}
print(json.dumps(figures) if a.json else " ".join(f"{k} {v:.4f}" for k, v in figures.items()))
