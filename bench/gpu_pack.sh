#!/usr/bin/env bash
# Builds what bench/gpu.sh needs on the GPU machine, which has no Rust: the `cuda`
# binary and the parity-test binaries, stripped and xz-compressed into gpu-carry/
# (about 30 MB: the device tool carries at most 64 MiB). Then, with the device tool:
#   run  command: bash bench/gpu.sh --carried gpu-carry --out $OUT   carry: ["gpu-carry"]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cuda_env.sh
cargo build --release --features cuda
tests="$(cargo test --release --features cuda --no-run --test hf_parity --test bert_parity \
  --message-format json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("hf_parity", "bert_parity"):
        print(m["target"]["name"], m["executable"])
')"
rm -rf gpu-carry && mkdir -p gpu-carry
pack() { strip -o "gpu-carry/$1" "$2" && xz -T0 -6 "gpu-carry/$1"; }
pack lmforge "${CARGO_TARGET_DIR:-target}/release/lmforge"
while read -r name exe; do pack "$name" "$exe"; done <<< "$tests"
ls -la gpu-carry
