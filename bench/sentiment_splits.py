#!/usr/bin/env python3
"""The sentiment splits BENCHMARKS.md reports on, written as JSONL files that both
lmforge (`prepare --task classify --input TRAIN --val VAL`) and the scikit-learn
baseline read, so every model sees the same examples.

    python3 bench/sentiment_splits.py data/reviews OUT_DIR

Writes, from imdb.jsonl and amazon.jsonl (1,000 sentences each):
  mixed-train.jsonl / mixed-val.jsonl  80/20 of both, stratified by domain and label (seed 0)
  imdb.jsonl, amazon.jsonl             the domains whole, for cross-domain runs
  {domain}-text.txt                    a domain's texts, one a line (for further pretraining)
  mixed-train-text.txt                 the mixed training texts
"""
import json
import random
import sys
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
rng = random.Random(0)
train, val = [], []
for domain in ["imdb", "amazon"]:
    rows = [json.loads(l) for l in (src / f"{domain}.jsonl").read_text(encoding="utf-8").split("\n") if l.strip()]
    (out / f"{domain}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / f"{domain}-text.txt").write_text("".join(r["text"].strip() + "\n" for r in rows))
    for label in sorted({r["label"] for r in rows}):
        group = [r for r in rows if r["label"] == label]
        rng.shuffle(group)
        cut = round(0.2 * len(group))
        val += group[:cut]
        train += group[cut:]
for name, rows in [("mixed-train", train), ("mixed-val", val)]:
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
(out / "mixed-train-text.txt").write_text("".join(r["text"].strip() + "\n" for r in train))
print(f"{out}: {len(train)} training and {len(val)} validation sentences")
