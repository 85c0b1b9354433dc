#!/usr/bin/env bash
# GGUF quantisation (BENCHMARKS.md, "Quantisation"): file size and perplexity of a
# trained model (the main job's recipe with a 1,024-token BPE) in f32, Q8_0 and Q4_0,
# and greedy generation speed of a GPT-2 124M-shaped model (random init: speed does
# not depend on the weights) in f32, Q8_0, Q4_0 and Q4_K — ours and llama.cpp's on
# the same file and threads, in one run.
#
#   bash bench/quantize.sh        # about 15 minutes on 2 cores (llama-cpp-python: +5 the first time)
#
# llama.cpp comes from PyPI (llama-cpp-python, compiled on install) in
# ~/.cache/lmforge/gguf-venv (or $GGUF_VENV), the venv the tests use.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
NEW=${NEW:-128}
VENV=${GGUF_VENV:-$HOME/.cache/lmforge/gguf-venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import llama_cpp, gguf, numpy" 2>/dev/null ||
    "$VENV/bin/pip" install --quiet llama-cpp-python gguf numpy
cargo build --release --quiet
export RUST_LOG=warn RAYON_NUM_THREADS=$THREADS
L=./target/release/lmforge
out=bench/results/quantize-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"

# Quality: a trained model.
[ -e runs/shakespeare-bpe/checkpoints/latest ] ||
    $L train --set tokenizer=bpe:1024 --set data=data/shakespeare-bpe \
        --out runs/shakespeare-bpe --set sample_tokens=0 >"$out/trained.log"
size() { stat -c %s "$1"; }
echo "| trained model | file | MB | val loss | perplexity |" | tee "$out/quality.md"
echo "|---|---|---:|---:|---:|" | tee -a "$out/quality.md"
ckpt=runs/shakespeare-bpe/checkpoints/$(cat runs/shakespeare-bpe/checkpoints/latest)
for t in f32 q8_0 q4_0; do
    model=$ckpt
    file=$ckpt/model.safetensors
    if [ "$t" != f32 ]; then
        model=$out/trained-$t.gguf
        file=$model
        $L quantize --model runs/shakespeare-bpe --type "$t" --out "$model" >/dev/null
    fi
    $L eval --model "$model" --data data/shakespeare-bpe --json |
        python3 -c "import json,sys; r=json.load(sys.stdin); print('| $t | $(basename "$file") | %.2f | %.4f | %.3f |' % ($(size "$file")/1e6, r['loss'], r['perplexity']))" |
        tee -a "$out/quality.md"
done

# Speed: GPT-2 124M shape, GPT-2's tokenizer, one training step for the weights.
$L prepare --input data/shakespeare/input.txt --tokenizer tests/fixtures/gpt2-tokenizer/tokenizer.json \
    --out "$out/gpt2-data" >/dev/null
$L train --data "$out/gpt2-data" --out "$out/gpt2-124m" --set n_layer=12 --set n_head=12 \
    --set n_embd=768 --set block_size=1024 --set batch_size=1 --set max_steps=1 --set eval_every=0 \
    --set sample_tokens=0 --set warmup_steps=0 >/dev/null
printf 'n_layer = 12\nn_head = 12\nn_embd = 768\nblock_size = 64\nbatch_size = 1\ntokenizer = "bpe:50257"\n' >"$out/gpt2-124m.toml"
prompt=$(python3 -c "print(','.join(str(i) for i in range(1, 9)))")
echo "| GPT-2 124M shape | MB | lmforge tokens/s | lmforge peak RSS MB | llama.cpp tokens/s | llama.cpp peak RSS MB |" | tee "$out/speed.md"
echo "|---|---:|---:|---:|---:|---:|" | tee -a "$out/speed.md"
$L bench --preset "$out/gpt2-124m.toml" --steps 1 --warmup 0 --generate-tokens "$NEW" --threads "$THREADS" --json |
    python3 -c "import json,sys; r=json.load(sys.stdin); print('| f32 | %.0f | %.1f | %.0f | - | - |' % (124.4e6*4/1e6, r['generate_tokens_per_s'], r['peak_rss_mb']))" |
    tee -a "$out/speed.md"
for t in q8_0 q4_0 q4_k; do
    file=$out/gpt2-124m-$t.gguf
    $L quantize --model "$out/gpt2-124m" --type "$t" --out "$file" >/dev/null
    ours=$($L bench --preset "$file" --generate-tokens "$NEW" --threads "$THREADS" --json)
    theirs=$("$VENV/bin/python" scripts/llama_cpp_check.py "$file" --ids "$prompt" --prompt-ids 1 --new "$NEW" --threads "$THREADS")
    python3 - "$t" "$(size "$file")" "$ours" "$theirs" <<'PY' | tee -a "$out/speed.md"
import json, sys
t, size, ours, theirs = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
print(f"| {t} | {size/1e6:.0f} | {ours['generate_tokens_per_s']:.1f} | {ours['peak_rss_mb']:.0f} | {theirs['tokens_per_s']:.1f} | {theirs['peak_rss_mb']:.0f} |")
PY
done
