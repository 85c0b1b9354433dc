#!/usr/bin/env bash
# The dashboard's load figure (BENCHMARKS.md "Dashboard"): 50 runs of 100k metrics lines
# each (made once under target/tmp/dashboard-bench), loaded in headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --test dashboard_browser -- --ignored --nocapture load_of_50_runs 2>&1 \
  | grep '^|'
