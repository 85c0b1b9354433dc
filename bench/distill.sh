#!/usr/bin/env bash
# Distillation efficacy (BENCHMARKS.md, "Distillation"): a 2-layer student distilled
# from a 4-layer teacher against the same 2-layer model trained from scratch with the
# same steps, tokens and schedule — GPT-2 on the main job (teacher: runs/shakespeare-char)
# and BERT → DistilBERT on configs/bert-mlm.toml (teacher: runs/bert-mlm). Trains the
# teachers first if they are missing.
#
#   bash bench/distill.sh        # about 25 minutes on 2 cores
#
# Prints each model's val loss (`lmforge eval`: every token of val.bin; fixed masks
# for the masked LMs), parameters, training tokens/s (from its run) and, for the
# causal LMs, greedy generation tokens/s (`lmforge bench` of the shape).
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
export RUST_LOG=warn RAYON_NUM_THREADS=$THREADS
cargo build --release --quiet
L=./target/release/lmforge
out=bench/results/distill-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
[ -e runs/shakespeare-char/checkpoints/latest ] || $L train --set sample_tokens=0 >"$out/gpt-teacher.log"
[ -e runs/bert-mlm/checkpoints/latest ] || $L train --config configs/bert-mlm.toml >"$out/bert-teacher.log"

$L distill --teacher runs/shakespeare-char --student-layers 2 --out "$out/gpt-distilled" \
    --set sample_tokens=0 >"$out/gpt-distilled.log"
$L train --out "$out/gpt-scratch" --set n_layer=2 --set sample_tokens=0 >"$out/gpt-scratch.log"
$L distill --config configs/bert-mlm.toml --teacher runs/bert-mlm --student-layers 2 \
    --out "$out/bert-distilled" >"$out/bert-distilled.log"
$L train --config configs/bert-mlm.toml --set model_type=distilbert --set n_layer=2 \
    --out "$out/bert-scratch" >"$out/bert-scratch.log"

printf 'n_layer = 2\n' >"$out/two-layers.toml"
gen4=$($L bench --preset small --steps 3 --threads "$THREADS" --json)
gen2=$($L bench --preset "$out/two-layers.toml" --steps 3 --threads "$THREADS" --json)
row() { # name model data log bench-json
    local eval params tok gen
    eval=$($L eval --model "$2" --data "$3" --json)
    params=$(python3 -c "import json,sys; from pathlib import Path; import struct
p=Path(sys.argv[1]); p=p if (p/'config.json').exists() else p/'checkpoints'/(p/'checkpoints'/'latest').read_text().strip()
b=(p/'model.safetensors').read_bytes(); n=struct.unpack('<Q',b[:8])[0]; h=json.loads(b[8:8+n]); h.pop('__metadata__',None)
import math; print(sum(math.prod(v['shape']) for v in h.values()))" "$2")
    tok=$(grep -o '([0-9]* tokens/s)' "$4" | tr -dc '0-9' || true)
    gen=$(echo "$5" | python3 -c "import json,sys; s=sys.stdin.read().strip(); print(round(json.loads(s)['generate_tokens_per_s']) if s else '-')")
    echo "| $1 | $(echo "$eval" | python3 -c 'import json,sys; print("%.4f" % json.load(sys.stdin)["loss"])') | $params | ${tok:--} | $gen |"
}
{
    echo "| model | val loss | parameters | training tokens/s | generation tokens/s |"
    echo "|---|---:|---:|---:|---:|"
    row "GPT-2 teacher, 4 layers" runs/shakespeare-char data/shakespeare-char "$out/gpt-teacher.log" "$gen4"
    row "GPT-2 distilled, 2 layers" "$out/gpt-distilled" data/shakespeare-char "$out/gpt-distilled.log" "$gen2"
    row "GPT-2 scratch, 2 layers" "$out/gpt-scratch" data/shakespeare-char "$out/gpt-scratch.log" "$gen2"
    row "BERT teacher, 4 layers" runs/bert-mlm data/shakespeare-wordpiece "$out/bert-teacher.log" ""
    row "DistilBERT distilled, 2 layers" "$out/bert-distilled" data/shakespeare-wordpiece "$out/bert-distilled.log" ""
    row "DistilBERT scratch, 2 layers" "$out/bert-scratch" data/shakespeare-wordpiece "$out/bert-scratch.log" ""
} | tee "$out/figures.md"
