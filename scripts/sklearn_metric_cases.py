#!/usr/bin/env python3
"""Golden classification metrics from scikit-learn, for lmforge's metric tests.

    python3 scripts/sklearn_metric_cases.py tests/fixtures/classification-metrics/cases.json

Each case is (num_labels, y_true, y_pred); the file stores scikit-learn's accuracy,
per-class and macro precision / recall / F1 (zero_division=0, over labels
0..num_labels-1, so a class with no support still counts), MCC and the confusion
matrix, with the scikit-learn version. Needs `pip install scikit-learn`.
"""
import json
import random
import sys

import sklearn
from sklearn.metrics import (accuracy_score, confusion_matrix, matthews_corrcoef,
                             precision_recall_fscore_support)


def case(name, k, y_true, y_pred):
    labels = list(range(k))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {
        "name": name, "num_labels": k, "y_true": y_true, "y_pred": y_pred,
        "accuracy": accuracy_score(y_true, y_pred),
        "precision": p.tolist(), "recall": r.tolist(), "f1": f.tolist(), "support": [int(x) for x in s],
        "macro_precision": mp, "macro_recall": mr, "macro_f1": mf,
        "mcc": matthews_corrcoef(y_true, y_pred),
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def main():
    rng = random.Random(7)
    noisy = lambda k, n, p: [(y, y if rng.random() < p else rng.randrange(k)) for y in (rng.randrange(k) for _ in range(n))]
    cases = []
    for name, k, n, p in [("binary, 80% right", 2, 200, 0.8), ("three classes, 60% right", 3, 300, 0.6),
                          ("five classes, chance", 5, 500, 0.0)]:
        pairs = noisy(k, n, p)
        cases.append(case(name, k, [a for a, _ in pairs], [b for _, b in pairs]))
    cases += [
        case("perfect", 3, [0, 1, 2, 2, 1, 0], [0, 1, 2, 2, 1, 0]),
        case("all wrong", 2, [0, 0, 1, 1], [1, 1, 0, 0]),
        case("single class in truth", 2, [0, 0, 0, 0, 0], [0, 1, 0, 1, 0]),
        case("single class everywhere", 2, [1, 1, 1], [1, 1, 1]),
        case("a class never predicted", 3, [0, 1, 2, 2, 1], [0, 1, 1, 1, 1]),
        case("a class with no support", 4, [0, 1, 1, 0, 2], [0, 1, 0, 0, 2]),
        case("constant prediction", 3, [0, 1, 2, 0, 1, 2], [1, 1, 1, 1, 1, 1]),
    ]
    out = {"sklearn": sklearn.__version__, "cases": cases}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
