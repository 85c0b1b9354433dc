"""The shakespeare-char recipe in PyTorch, for the quality-per-second comparison.

Trains bench/torch_ref.py's GPT on lmforge's prepared shards (llm.c .bin files) with
the same recipe as configs/shakespeare-char.toml (nanoGPT's CPU settings: 4 layers,
4 heads, 128 dims, block 64, batch 12, AdamW lr 1e-3 → 1e-4 cosine after 100 warm-up
steps, weight decay 0.1 on >=2-D weights, betas 0.9/0.99, clip 1.0, 2000 steps) and
writes JSONL lines {"step", "val_loss", "elapsed_s"} every `--eval-every` steps, the
same fixed-seed val estimate lmforge logs (20 batches).

    python bench/torch_train.py --data data/shakespeare-char --out bench/results/torch.jsonl
"""

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from torch_ref import GPT, VOCAB


def load_shard(path):
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert header[0] == 20240520, f"{path}: not an llm.c u16 shard"
    return np.fromfile(path, dtype=np.uint16, offset=256 * 4)[: header[2]].astype(np.int64)


def lr_at(step, steps, warmup, lr_max, lr_min):
    """lmforge's schedule (src/train/schedule.rs): linear warm-up, cosine to lr_min."""
    if step < warmup:
        return lr_max * (step + 1) / (warmup + 1)
    ratio = (step - warmup) / max(1, steps - warmup)
    return lr_min + 0.5 * (1 + math.cos(math.pi * min(ratio, 1.0))) * (lr_max - lr_min)


def batch(data, rng, b, t):
    ix = rng.integers(0, len(data) - t - 1, size=b)
    x = np.stack([data[i : i + t] for i in ix])
    y = np.stack([data[i + 1 : i + 1 + t] for i in ix])
    return torch.from_numpy(x), torch.from_numpy(y)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--eval-every", type=int, default=250)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    train, val = load_shard(f"{args.data}/train.bin"), load_shard(f"{args.data}/val.bin")
    assert VOCAB >= int(train.max()) + 1
    b, t, lr_max, lr_min, warmup = 12, 64, 1e-3, 1e-4, 100
    model = GPT(4, 4, 128, t)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr_max, betas=(0.9, 0.99),
    )
    rng = np.random.default_rng(1337)

    @torch.no_grad()
    def val_loss():
        eval_rng = np.random.default_rng(1340)
        model.eval()
        losses = [model(*batch(val, eval_rng, b, t)).item() for _ in range(20)]
        model.train()
        return sum(losses) / len(losses)

    start = time.perf_counter()
    with open(args.out, "w") as out:
        def log(step):
            v = val_loss()
            out.write(json.dumps({"step": step, "val_loss": v,
                                  "elapsed_s": time.perf_counter() - start}) + "\n")
            out.flush()
            print(f"step {step}: val loss {v:.4f} at {time.perf_counter() - start:.1f} s")

        log(0)
        for step in range(args.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.steps, warmup, lr_max, lr_min)
            loss = model(*batch(train, rng, b, t))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                log(step + 1)


if __name__ == "__main__":
    main()
