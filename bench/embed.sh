#!/usr/bin/env bash
# Embeddings per second (BENCHMARKS.md, "Embeddings"): `lmforge embed` against
# sentence-transformers on the same BERT-small (configs/bert-mlm.toml's shape: 4 layers,
# 128 wide, WordPiece 2,000; trained for 200 steps here), mean pooling, batch 16, the
# 2,000 review sentences of data/reviews, both on $THREADS threads (2 unless set).
# Also checks that the two agree (cosine of every pair).
#
#   bash bench/embed.sh        # about 3 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${THREADS:-2}
VENV=${VENV:-$HOME/.cache/lmforge/lm-eval-venv}
[ -x "$VENV/bin/python" ] || { python3 -m venv "$VENV"; "$VENV/bin/pip" install -q "lm-eval[api,hf]"; }
"$VENV/bin/python" -c "import sentence_transformers" 2>/dev/null || "$VENV/bin/pip" install -q sentence-transformers
export RUST_LOG=warn RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS
cargo build --release --quiet
L=./target/release/lmforge
out=bench/results/embed-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
$L train --config configs/bert-mlm.toml --out "$out/bert" --set max_steps=200 --set eval_every=0 >"$out/train.log"
model=$(realpath "$out/bert/checkpoints/$(cat "$out/bert/checkpoints/latest")")
python3 -c "import glob, json
for f in sorted(glob.glob('data/reviews/*.jsonl')):
    for l in open(f): print(' '.join(json.loads(l)['text'].split()))" >"$out/sentences.txt"
n=$(wc -l <"$out/sentences.txt")
for run in 1 2 3; do
    start=$(date +%s.%N)
    $L embed --model "$model" --input "$out/sentences.txt" --json >"$out/ours.jsonl"
    end=$(date +%s.%N)
    echo "lmforge embed: $n sentences in $(python3 -c "print(round($end - $start, 3))") s"
done | tee "$out/ours.txt"
"$VENV/bin/python" - "$model" "$out" <<'PY'
import json, sys, time
import numpy as np, torch
from sentence_transformers import SentenceTransformer, models
torch.set_num_threads(int(__import__("os").environ["OMP_NUM_THREADS"]))
model_dir, out = sys.argv[1], sys.argv[2]
st = SentenceTransformer(modules=[models.Transformer(model_dir), models.Pooling(128, "mean")], device="cpu")
sentences = open(f"{out}/sentences.txt").read().splitlines()
for _ in range(3):
    t = time.perf_counter()
    theirs = st.encode(sentences, batch_size=16, convert_to_numpy=True)
    print(f"sentence-transformers: {len(sentences)} sentences in {time.perf_counter() - t:.3f} s")
ours = np.array([json.loads(l)["embedding"] for l in open(f"{out}/ours.jsonl")])
cos = (ours * theirs).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(theirs, axis=1)
print(f"agreement: min cosine {cos.min():.7f} over {len(cos)} sentences")
PY
echo "results: $out"
