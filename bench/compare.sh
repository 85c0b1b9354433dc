#!/usr/bin/env bash
# lmforge against PyTorch on identical shapes, in one run, on this machine.
#
#   bash bench/compare.sh                 # small and medium, 3 alternating rounds each
#   PRESETS=small ROUNDS=5 bash bench/compare.sh
#   PRESETS="bert-small bert-medium" bash bench/compare.sh   # masked-LM BERT against transformers
#
# Creates bench/.venv with torch and transformers from PyPI (or uses $VENV), builds
# the release binary, pins both to $THREADS threads (2), runs `lmforge bench --json`
# and `bench/torch_ref.py --json` alternately, and prints the median of each figure
# with the ratio lmforge / PyTorch (for ms/step and memory, PyTorch / lmforge, so
# above 1 always means lmforge is better). Raw results: bench/results/compare-*.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
PRESETS=${PRESETS:-small medium}
STEPS=${STEPS:-20}

. bench/setup.sh
mkdir -p bench/results
out=bench/results/compare-$(date +%Y%m%d-%H%M%S).jsonl
for preset in $PRESETS; do
    for round in $(seq "$ROUNDS"); do
        echo "round $round/$ROUNDS: $preset" >&2
        ./target/release/lmforge bench --preset "$preset" --steps "$STEPS" --threads "$THREADS" --json |
            sed 's/^{/{"impl":"lmforge",/' >>"$out"
        "$VENV/bin/python" bench/torch_ref.py --preset "$preset" --steps "$STEPS" --threads "$THREADS" --json |
            sed 's/^{/{"impl":"pytorch",/' >>"$out"
    done
done
"$VENV/bin/python" bench/summarise.py "$out"
