#!/usr/bin/env python3
"""Load check for `lmforge serve` (loopback only, bounded in count and time).

    python3 bench/serve_load.py [--model runs/shakespeare-char] [--requests 200] [--clients 32] [--max-tokens 56]

Starts the server on an ephemeral loopback port, sends the same number of completion
requests from one client and then from N concurrent clients, and prints for each:
requests, errors, wall time, requests/s, generated tokens/s, p50 and p99 latency.
Needs only the Python standard library and a release build (cargo build --release).
"""
import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def post(url: str, body: dict, timeout: float) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def run(url: str, model: str, requests: int, clients: int, max_tokens: int, deadline: float) -> dict:
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker():
        while time.time() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            body = {"model": model, "prompt": "ROMEO:", "max_tokens": max_tokens, "seed": i, "temperature": 0.8}
            t0 = time.perf_counter()
            try:
                r = post(url, body, timeout=120)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    tokens.append(r["usage"]["completion_tokens"])
            except Exception as e:  # noqa: BLE001 - every failure counts as an error
                with lock:
                    errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")  # noqa: E731
    return {
        "clients": clients, "requests": len(lat) + len(errors), "errors": len(errors), "wall_s": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 2), "tokens_per_s": round(sum(tokens) / wall, 1),
        "p50_ms": round(1e3 * pick(0.50), 1), "p99_ms": round(1e3 * pick(0.99), 1),
        "mean_tokens": round(statistics.mean(tokens), 1) if tokens else 0, "first_error": errors[0] if errors else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "runs" / "shakespeare-char"))
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=56, help="the main model has a 64-token context")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--time-limit", type=float, default=300, help="seconds, for each phase")
    a = p.parse_args()
    binary = ROOT / "target" / "release" / "lmforge"
    server = subprocess.Popen(
        [str(binary), "serve", "--model", a.model, "--addr", "127.0.0.1:0", "--model-name", "bench",
         "--max-batch", str(a.max_batch), "--max-queue", "1024"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={"RUST_LOG": "warn", **{k: v for k, v in __import__("os").environ.items() if k.endswith("NUM_THREADS")}},
    )
    try:
        base = server.stdout.readline().split()[-1]
        url = f"{base}/v1/completions"
        post(url, {"model": "bench", "prompt": "x", "max_tokens": 4}, timeout=60)  # warm-up
        rows = [run(url, "bench", a.requests, c, a.max_tokens, time.time() + a.time_limit) for c in (1, a.clients)]
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(rows, indent=1))
    one, many = rows
    print(f"\n{'clients':>8} {'requests':>9} {'errors':>7} {'req/s':>7} {'tokens/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r['clients']:>8} {r['requests']:>9} {r['errors']:>7} {r['requests_per_s']:>7} {r['tokens_per_s']:>9} {r['p50_ms']:>8} {r['p99_ms']:>8}")
    print(f"\nthroughput with {a.clients} clients: {many['tokens_per_s'] / one['tokens_per_s']:.2f}x one client's")
    if many["errors"] or one["errors"]:
        sys.exit("errors during the load check")


if __name__ == "__main__":
    main()
