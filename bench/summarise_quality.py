"""Table and curves of bench/quality.sh: summarise_quality.py RESULTS_DIR [TARGET]."""

import json, sys, pathlib
d, target = pathlib.Path(sys.argv[1]), float(sys.argv[2]) if len(sys.argv) > 2 else 1.87
runs = {"lmforge standard": d / "lmforge-standard/metrics.jsonl",
        "lmforge fast": d / "lmforge-fast/metrics.jsonl",
        "PyTorch standard": d / "pytorch-standard.jsonl"}
print(f"| run | first eval with val loss <= {target} | final val loss | wall time |")
print("|---|---|---|---|")
for name, path in runs.items():
    evals = [r for r in map(json.loads, open(path)) if "val_loss" in r]
    hit = next((r for r in evals if r["val_loss"] <= target), None)
    when = f"{hit['elapsed_s']:.1f} s (step {hit['step']})" if hit else "not reached"
    print(f"| {name} | {when} | {evals[-1]['val_loss']:.4f} | {evals[-1]['elapsed_s']:.1f} s |")
    for r in evals:
        print(f"  curve {name}: step {r['step']:5d}  {r['elapsed_s']:7.1f} s  {r['val_loss']:.4f}", file=sys.stderr)
