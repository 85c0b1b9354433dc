#!/usr/bin/env bash
# Quality per second: val loss against wall time for lmforge's standard recipe, its
# fast preset and PyTorch's standard recipe, one after another on this machine.
#
#   bash bench/quality.sh        # about 8 minutes on 2 cores
#
# Uses bench/.venv (or $VENV) like compare.sh; both sides train on the same prepared
# shards (data/shakespeare-char) with $THREADS threads. Prints, for each run, the
# wall time at which val loss first reached $TARGET and the final val loss; the
# curves are in bench/results/quality-*/.
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=${TARGET:-1.87}
. bench/setup.sh
dir=bench/results/quality-$(date +%Y%m%d-%H%M%S)
mkdir -p "$dir"
# The first run prepares data/shakespeare-char (the preset's `data`) if it is missing.
./target/release/lmforge train --out "$dir/lmforge-standard" --set sample_tokens=0
./target/release/lmforge train --config configs/shakespeare-char-fast.toml --out "$dir/lmforge-fast" --set sample_tokens=0
(cd bench && "$VENV/bin/python" torch_train.py --data ../data/shakespeare-char --out "../$dir/pytorch-standard.jsonl" --threads "$THREADS")
"$VENV/bin/python" bench/summarise_quality.py "$dir" "$TARGET"
