#!/usr/bin/env bash
# Issue 23's device run, as one script: the GPU checks, then GPT-2 124M (sequence 1024,
# bf16) training and greedy generation next to PyTorch on the same device. Every part
# is bounded in time and writes what it measured under --out ($OUT on the device):
#   checks.txt            each check: PASS/FAIL/SKIP and why
#   lmforge.json          `lmforge bench` (tokens/s, ms/step, GFLOP/s, generation)
#   torch.json            bench/torch_ref.py (torch.compile, SDPA, bf16 autocast)
#   summary.json          both, the ratio, and MFU against the device's bf16 peak
#   logs.tar.gz           each command's output (NAME.log): the device tool brings
#                         back at most 8 files
# On the device (no Rust there): build here with `bash bench/gpu_pack.sh` (the cuda
# binary and the parity tests, xz-compressed into gpu-carry/, ~30 MB), then with the
# device tool: run "bash bench/gpu.sh --carried gpu-carry --out $OUT", carry ["gpu-carry"].
# Its logic on a CPU, small and quick (the test tests/gpu_script.rs does this):
#   bash bench/gpu.sh --device cpu --quick --out /tmp/gpu-check
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda
out="${OUT:-target/gpu}"
lmforge=target/release/lmforge
quick=0
carried=""
peak_tflops=989 # H200 dense bf16 (NVIDIA's datasheet); MFU is against this
python="${PYTHON:-python3}"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --lmforge) lmforge="$2"; shift 2 ;;
    --carried) carried="$2"; shift 2 ;;
    --quick) quick=1; shift ;;
    --peak-tflops) peak_tflops="$2"; shift 2 ;;
    *) echo "bench/gpu.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$out"
: > "$out/checks.txt"

# CUDA's libraries come from the wheels PyTorch installed (the runtime a cuda build
# links; cuBLAS, NVRTC, NCCL it opens at run time).
if [ "$device" != cpu ] || [ -n "$carried" ]; then
  libs="$("$python" - <<'EOF' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
print(":".join(sorted({os.path.dirname(p) for r in roots for p in glob.glob(os.path.join(r, "**", "lib*.so*"), recursive=True)})))
EOF
)"
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  [ "$device" = cpu ] || nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/device.txt" 2>&1
fi

if [ "$quick" = 1 ]; then
  preset=small; torch_preset=small; steps=3; warmup=1; gen=16; limit=300; train_steps=8
else
  preset=gpt2; torch_preset=gpt2; steps=20; warmup=5; gen=256; limit=240; train_steps=20
fi

check() { # name, seconds, command…: runs it bounded, records PASS/FAIL with its log
  local name="$1" seconds="$2"; shift 2
  if timeout "$seconds" "$@" > "$out/$name.log" 2>&1; then
    echo "PASS $name" >> "$out/checks.txt"
  else
    echo "FAIL $name (exit $?; see $name.log)" >> "$out/checks.txt"
  fi
}

# 1. The checks, on the device. The test binaries come prebuilt (bench/gpu_pack.sh) and
#    read the fixtures from this checkout (LMFORGE_REPO).
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
tests_dir=target/release/deps
if [ -n "$carried" ]; then
  mkdir -p "$tmp/bin"
  for f in "$carried"/*.xz; do
    "$python" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
      "$f" "$tmp/bin/$(basename "$f" .xz)" && chmod +x "$tmp/bin/$(basename "$f" .xz)"
  done
  lmforge="$tmp/bin/lmforge"
  tests_dir="$tmp/bin"
fi
export LMFORGE_REPO="$PWD"
# `--set data=` keeps the preset's corpus (the embedded one): the first run prepares it.
small=(--set data="$tmp/data" --set n_layer=2 --set n_head=2 --set n_embd=64 --set block_size=64 --set batch_size=8
  --set eval_every=1000 --set sample_tokens=16 --set log_every=1 --set lr=1e-3)
# Ten bf16 steps next to ten f32 steps: within 1e-2 relative at every step.
check train_f32 "$limit" "$lmforge" train --out "$tmp/f32" --device "$device" \
  "${small[@]}" --set max_steps=10 --set dtype=f32
check train_bf16 "$limit" "$lmforge" train --out "$tmp/bf16" --device "$device" \
  "${small[@]}" --set max_steps=10 --set dtype=bf16
check bf16_tracks_f32 30 "$python" - "$tmp/f32/metrics.jsonl" "$tmp/bf16/metrics.jsonl" <<'EOF'
import json, sys
def losses(path):
    return [r["loss"] for r in map(json.loads, open(path)) if "loss" in r and "step" in r]
a, b = losses(sys.argv[1]), losses(sys.argv[2])
assert len(a) == len(b) == 10, (len(a), len(b))
worst = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print(f"worst relative difference {worst:.2e} over {len(a)} steps")
assert worst < 1e-2
EOF
# A checkpoint written on the device resumes on the CPU, and continues as an
# uninterrupted run on the device does (to float tolerance: different kernels).
check save_on_device "$limit" "$lmforge" train --out "$tmp/moved" --device "$device" \
  "${small[@]}" --set max_steps="$train_steps" --set save_every=4 --stop-at-step 4
check resume_on_cpu "$limit" "$lmforge" train --out "$tmp/moved" --resume --device cpu
check whole_on_device "$limit" "$lmforge" train --out "$tmp/whole" --device "$device" \
  "${small[@]}" --set max_steps="$train_steps" --set save_every=4
check resumed_matches 30 "$python" - "$tmp/whole/metrics.jsonl" "$tmp/moved/metrics.jsonl" <<'EOF'
import json, sys
def losses(path):
    return {r["step"]: r["loss"] for r in map(json.loads, open(path)) if "loss" in r and "step" in r}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
assert a.keys() == b.keys(), (sorted(a), sorted(b))
worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
print(f"worst relative difference {worst:.2e} over {len(a)} steps")
assert worst < 1e-3
EOF
# The parity fixtures (GPT-2, BERT, both heads) on the device, f32, when carried.
for name in hf_parity bert_parity; do
  t="$(ls -t "$tests_dir/$name"* 2>/dev/null | grep -v '\.d$' | head -n 1)"
  [ -n "$t" ] && [ -x "$t" ] || continue
  LMFORGE_TEST_DEVICE="$device" check "test_$(basename "$t" | cut -d- -f1)" "$limit" "$t" --test-threads 1 logits_and_loss every_gradient greedy_ids
done
grep -Eq "^(PASS|FAIL) test_" "$out/checks.txt" || echo "SKIP parity tests (no prebuilt test binaries carried)" >> "$out/checks.txt"

# 2. The benchmark: lmforge, then PyTorch (torch.compile + SDPA, bf16 autocast).
check lmforge_bench "$limit" "$lmforge" bench --preset "$preset" --device "$device" \
  --steps "$steps" --warmup "$warmup" --generate-tokens "$gen" --json
tail -n 1 "$out/lmforge_bench.log" > "$out/lmforge.json"
if "$python" -c "import torch" > /dev/null 2>&1; then
  compile=(--compile)
  [ "$device" = cpu ] && compile=()
  check torch_bench "$limit" "$python" bench/torch_ref.py --preset "$torch_preset" --device "$device" \
    --dtype "$([ "$quick" = 1 ] && echo f32 || echo bf16)" "${compile[@]}" --threads "$(nproc)" \
    --steps "$steps" --warmup "$warmup" --generate-tokens "$gen" --json
  tail -n 1 "$out/torch_bench.log" > "$out/torch.json"
else
  echo "SKIP torch_bench (no torch for $python)" >> "$out/checks.txt"
fi

"$python" - "$out" "$peak_tflops" <<'EOF'
import json, os, sys
out, peak = sys.argv[1], float(sys.argv[2])
def read(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except (OSError, ValueError):
        return None
ours, torch = read("lmforge.json"), read("torch.json")
summary = {"lmforge": ours, "torch": torch, "peak_tflops": peak,
           "checks": open(os.path.join(out, "checks.txt")).read().splitlines()}
if ours:
    summary["lmforge_mfu_vs_peak"] = ours["gflops"] / (peak * 1e3)
if ours and torch:
    summary["train_ratio"] = ours["tokens_per_s"] / torch["tokens_per_s"]
    if ours.get("generate_tokens_per_s") and torch.get("generate_tokens_per_s"):
        summary["generate_ratio"] = ours["generate_tokens_per_s"] / torch["generate_tokens_per_s"]
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps({k: v for k, v in summary.items() if k != "checks"}))
EOF
(cd "$out" && tar czf logs.tar.gz ./*.log && rm -f ./*.log)
cat "$out/checks.txt"
! grep -q "^FAIL" "$out/checks.txt"
