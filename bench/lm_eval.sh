#!/usr/bin/env bash
# lm-evaluation-harness through `lmforge serve` against its hf backend on the same
# checkpoint (BENCHMARKS.md, "Evaluation through the server"): a GPT-2 of 4 layers,
# 128 wide, with GPT-2's tokenizer, trained 300 steps on the embedded corpus; the
# multiple-choice task of bench/lm-eval/ (200 questions from the corpus, read offline).
# Prints each backend's accuracy and wall time and the largest log-likelihood gap.
#
#   bash bench/lm_eval.sh        # about 5 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
VENV=${VENV:-$HOME/.cache/lmforge/lm-eval-venv}
[ -x "$VENV/bin/lm_eval" ] || { python3 -m venv "$VENV"; "$VENV/bin/pip" install -q "lm-eval[api,hf]"; }
export RUST_LOG=warn OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
cargo build --release --quiet
L=./target/release/lmforge
out=$(realpath -m bench/results/lm-eval-$(date +%Y%m%d-%H%M%S))
mkdir -p "$out"
$L prepare --input data/shakespeare/input.txt --out "$out/data" --tokenizer tests/fixtures/gpt2-tokenizer/tokenizer.json >/dev/null
RAYON_NUM_THREADS=$THREADS $L train --data "$out/data" --out "$out/run" --set max_steps=300 --set eval_every=0 --set sample_tokens=0 >"$out/train.log"
model=$(realpath "$out/run/checkpoints/$(cat "$out/run/checkpoints/latest")")
python3 bench/lm-eval/make_task.py data/shakespeare/input.txt "$out/task" 200
RAYON_NUM_THREADS=$THREADS $L serve --model "$model" --model-name mine --addr 127.0.0.1:8077 --threads "$THREADS" &
server=$!
trap 'kill $server' EXIT
sleep 2
time_it() { local start end; start=$(date +%s.%N); "$@"; end=$(date +%s.%N); python3 -c "print($end - $start)"; }
common=(--tasks lmforge_mc --include_path "$out/task" --log_samples)
t_api=$(time_it "$VENV/bin/lm_eval" --model local-completions --batch_size 4 "${common[@]}" --output_path "$out/api" \
    --model_args "model=mine,base_url=http://127.0.0.1:8077/v1/completions,tokenizer_backend=huggingface,tokenizer=$model" 2>"$out/api.log" | tail -1)
t_hf=$(time_it "$VENV/bin/lm_eval" --model hf --device cpu "${common[@]}" --output_path "$out/hf" \
    --model_args "pretrained=$model" 2>"$out/hf.log" | tail -1)
python3 - "$out" "$t_api" "$t_hf" <<'PY'
import glob, json, sys
out, t_api, t_hf = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
def load(name):
    res = json.load(open(glob.glob(f"{out}/{name}/*/results_*.json")[0]))["results"]["lmforge_mc"]["acc,none"]
    docs = {}
    for line in open(glob.glob(f"{out}/{name}/*/samples_*.jsonl")[0]):
        d = json.loads(line)
        docs[d["doc_id"]] = [float(r[0][0]) for r in d["resps"]]
    return res, docs
(a_api, api), (a_hf, hf) = load("api"), load("hf")
gap = max(abs(x - y) for k in hf for x, y in zip(api[k], hf[k]))
print(f"through lmforge serve: acc {a_api:.4f}, {t_api:.1f} s; hf backend: acc {a_hf:.4f}, {t_hf:.1f} s; "
      f"{len(hf)} questions, max |Δ log-likelihood| {gap:.2e}")
PY
echo "results: $out"
