"""Prints the table of bench/compare.sh from its JSONL results (medians over rounds)."""

import json
import statistics
import sys
from collections import defaultdict

# (key, label, True when higher is better)
FIGURES = [
    ("tokens_per_s", "train tokens/s", True),
    ("ms_per_step", "ms/step", False),
    # The fastest step of each run: the figure a noisy shared machine moves least.
    ("ms_min", "fastest step ms", False),
    ("gflops", "GFLOP/s", True),
    ("mfu", "of own matmul ceiling", True),
    ("ceiling_gflops", "matmul ceiling GFLOP/s", True),
    ("peak_rss_mb", "peak RSS MB", False),
    ("generate_tokens_per_s", "generate tokens/s (greedy, KV cache)", True),
]

rows = defaultdict(lambda: defaultdict(list))
for line in open(sys.argv[1]):
    r = json.loads(line)
    for key, _, _ in FIGURES:
        if r.get(key) is not None:
            rows[r["preset"]][(r["impl"], key)].append(r[key])

for preset, values in rows.items():
    rounds = len(values[("lmforge", "ms_per_step")])
    print(f"\n{preset} ({rounds} alternating rounds, medians)")
    print(f"| {'figure':38} | {'lmforge':>10} | {'PyTorch':>10} | {'ratio':>6} |")
    print(f"|{'-' * 40}|{'-' * 12}|{'-' * 12}|{'-' * 8}|")
    for key, label, higher in FIGURES:
        ours, theirs = values.get(("lmforge", key)), values.get(("pytorch", key))
        if not ours or not theirs:
            continue
        a, b = statistics.median(ours), statistics.median(theirs)
        ratio = a / b if higher else b / a
        fmt = (lambda v: f"{100 * v:.1f}%") if key == "mfu" else (lambda v: f"{v:,.1f}")
        print(f"| {label:38} | {fmt(a):>10} | {fmt(b):>10} | {ratio:5.2f}× |")
