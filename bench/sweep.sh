#!/usr/bin/env bash
# Hyperparameter search on the embedded corpus (BENCHMARKS.md, "Hyperparameter search"):
#  1. bench/sweep.toml, 24 random trials of the shakespeare-char shape at 500 steps, then
#     the best config and the default preset rerun over 3 fresh seeds (--confirm 3);
#  2. the same 24 trials (same seed, so the same configs in the same order) under ASHA
#     (min_resource 50, reduction factor 4): its best and the compute it used;
#  3. with METHOD=bayes also the TPE search of the same space.
#
#   bash bench/sweep.sh        # about 25 minutes on 2 cores (2 trials at a time)
set -euo pipefail
cd "$(dirname "$0")/.."
export RUST_LOG=warn RAYON_NUM_THREADS=${THREADS:-2}
cargo build --release --quiet
L=./target/release/lmforge
out=bench/results/sweep-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
$L prepare --input data/shakespeare/input.txt --out "$out/data" >/dev/null
common=(--data "$out/data" --set max_steps=500 --set eval_every=50 --set sample_tokens=0 --parallel 2)

$L sweep --config bench/sweep.toml --out "$out/random" "${common[@]}" --confirm 3 | tee "$out/random.txt"
{ cat bench/sweep.toml; printf '\n[early_terminate]\ntype = "asha"\nmin_resource = 50\nreduction_factor = 4\n'; } >"$out/asha.toml"
$L sweep --config "$out/asha.toml" --out "$out/asha" "${common[@]}" | tee "$out/asha.txt"
if [ "${METHOD:-}" = bayes ]; then
    sed 's/^method = "random"/method = "bayes"/' bench/sweep.toml >"$out/tpe.toml"
    $L sweep --config "$out/tpe.toml" --out "$out/tpe" "${common[@]}" --confirm 3 | tee "$out/tpe.txt"
fi

python3 - "$out" <<'PY'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])
def summary(name):
    text = (out / name / "sweep.md").read_text()
    best = float(re.search(r"val_loss ([0-9.]+) \(best.toml\)", text).group(1))
    tokens = int(re.search(r"compute \d+ steps, (\d+) tokens", text).group(1))
    return best, tokens, text
for name in ["random", "asha", "tpe"]:
    if (out / name / "sweep.md").exists():
        best, tokens, text = summary(name)
        confirm = re.search(r"confirmed over .*", text)
        print(f"{name}: best val_loss {best:.4f}, compute {tokens} tokens" + (f"; {confirm.group(0)}" if confirm else ""))
(rb, rt, _), (ab, at, _) = summary("random"), summary("asha")
print(f"ASHA: best {ab:.4f} vs unpruned {rb:.4f} (gap {ab - rb:+.4f}) for {100 * at / rt:.0f}% of the compute")
PY
echo "results: $out"
