#!/usr/bin/env bash
# Sentiment figures (BENCHMARKS.md, "Classification"): fine-tuning from three starting
# points — the BERT of configs/bert-mlm.toml, that BERT pretrained further on the
# training texts, and the same shape from scratch — against TF-IDF + logistic
# regression, on the same splits: in-domain (80/20 of IMDb + Amazon) and cross-domain
# (train on one, test on the other).
#
#   bash bench/classify.sh        # trains runs/bert-mlm first if it is missing
#
# scikit-learn comes from PyPI into bench/.venv (or $VENV). Results: a table on stdout
# and bench/results/classify-*/figures.md; every run directory stays there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(realpath -m "${VENV:-bench/.venv}")
THREADS=${THREADS:-2}
FURTHER_STEPS=${FURTHER_STEPS:-300}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -c "import sklearn" 2>/dev/null || "$VENV/bin/pip" install --quiet scikit-learn
cargo build --release --quiet
export RAYON_NUM_THREADS=$THREADS RUST_LOG=warn
L=./target/release/lmforge
out=bench/results/classify-$(date +%Y%m%d-%H%M%S)
mkdir -p "$out"
[ -e runs/bert-mlm/checkpoints/latest ] || $L train --config configs/bert-mlm.toml
tokenizer=data/shakespeare-wordpiece/tokenizer.json
python3 bench/sentiment_splits.py data/reviews "$out/splits"

# setting: training file, test file, texts for further pretraining
settings="mixed:mixed-train:mixed-val imdb-to-amazon:imdb:amazon amazon-to-imdb:amazon:imdb"
for setting in $settings; do
    IFS=: read -r name train test <<<"$setting"
    s=$out/splits
    $L prepare --task classify --input "$s/$train.jsonl" --val "$s/$test.jsonl" \
        --tokenizer "$tokenizer" --out "$out/data-$name" >/dev/null
    texts=$s/$train-text.txt
    [ "$train" = mixed-train ] && texts=$s/mixed-train-text.txt
    $L prepare --input "$texts" --tokenizer "$tokenizer" --out "$out/lm-$name" >/dev/null
    $L train --config configs/bert-mlm.toml --init-from runs/bert-mlm --data "$out/lm-$name" \
        --out "$out/further-$name" --set max_steps="$FURTHER_STEPS" --set warmup_steps=30 \
        --set lr=3e-4 --set eval_every=0 >/dev/null
    for start in pretrained further scratch; do
        case $start in
            pretrained) init=runs/bert-mlm ;;
            further) init=$out/further-$name ;;
            scratch) init= ;;
        esac
        run=$out/$start-$name
        $L train --config configs/sentiment.toml --data "$out/data-$name" --out "$run" \
            --set init_from="$init" >"$run.log" 2>&1
        # The end-of-training model (not the best on the test split: that would select on it).
        $L eval --model "$run" --data "$out/data-$name" --json |
            sed "s/^{/{\"setting\":\"$name\",\"start\":\"$start\",/" >>"$out/figures.jsonl"
    done
    "$VENV/bin/python" bench/tfidf_baseline.py "$s/$train.jsonl" "$s/$test.jsonl" --json |
        sed "s/^{/{\"setting\":\"$name\",\"start\":\"tfidf-logreg\",/" >>"$out/figures.jsonl"
done
python3 - "$out/figures.jsonl" <<'PY' | tee "$out/figures.md"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
settings = list(dict.fromkeys(r["setting"] for r in rows))
starts = list(dict.fromkeys(r["start"] for r in rows))
print("| start | " + " | ".join(f"{s} accuracy | {s} macro-F1" for s in settings) + " |")
print("|---|" + "---:|---:|" * len(settings))
for start in starts:
    cells = []
    for s in settings:
        r = next(r for r in rows if r["setting"] == s and r["start"] == start)
        cells += [f"{r['accuracy']:.3f}", f"{r['macro_f1']:.3f}"]
    print(f"| {start} | " + " | ".join(cells) + " |")
PY
