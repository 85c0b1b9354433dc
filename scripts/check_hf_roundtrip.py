#!/usr/bin/env python3
"""Prove that an lmforge checkpoint loads unchanged in Hugging Face transformers and
gives the same numbers.

    python3 scripts/check_hf_roundtrip.py [MODEL_DIR] [--data DIR|FILE.bin] [--venv DIR]

MODEL_DIR is a checkpoint or a run directory (default: runs/shakespeare-char, made by
`cargo run --release -- train`). Without torch + transformers in this interpreter, the
script creates a virtual environment (default .venv-hf), installs both from PyPI, and
runs itself again inside it. Checks, each printed with its figure:

1. GPT2LMHeadModel.from_pretrained(dir) and AutoTokenizer.from_pretrained(dir) load.
2. The tokenizer: AutoTokenizer's ids for sample texts equal lmforge's.
3. The loss: transformers' mean next-token loss over the token file, in lmforge's
   non-overlapping windows, equals `lmforge eval --json` (relative error <= 1e-5).
4. Greedy decoding: model.generate(do_sample=False) equals `lmforge generate --greedy`.

A sequence classifier (e.g. runs/sentiment) instead:

1. AutoModelForSequenceClassification.from_pretrained(dir) and AutoTokenizer load;
   config.id2label holds lmforge's labels in its order.
2. For review sentences, transformers' label probabilities (softmax of the logits)
   equal `lmforge predict --json`'s within 1e-5, and the predicted labels agree.

A masked LM (BERT, DistilBERT; e.g. runs/bert-mlm) instead:

1. AutoModelForMaskedLM.from_pretrained(dir) and AutoTokenizer.from_pretrained(dir) load.
2. The tokenizer: AutoTokenizer's ids ([CLS] … [SEP]) equal `lmforge fill-mask`'s.
3. Fill-mask: at each [MASK], transformers' five most likely ids equal lmforge's and
   their probabilities agree within 1e-5.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ensure_environment(venv: Path) -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
        return
    except ImportError:
        pass
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} with torch + transformers from PyPI", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch", "transformers", "numpy"], check=True)
    os.execv(str(python), [str(python), __file__, *sys.argv[1:]])


def lmforge(*args: str) -> dict:
    binary = ROOT / "target" / "release" / "lmforge"
    if not binary.exists():
        subprocess.run(["cargo", "build", "--release"], cwd=ROOT, check=True)
    out = subprocess.run([str(binary), *args], capture_output=True, text=True, env={**os.environ, "RUST_LOG": "warn"})
    if out.returncode != 0:
        sys.exit(f"lmforge {' '.join(args)} failed: {out.stderr.strip()}")
    return json.loads(out.stdout)


def resolve_model_dir(path: Path) -> Path:
    if (path / "config.json").exists():
        return path
    latest = path / "checkpoints" / "latest"
    if latest.exists():
        return path / "checkpoints" / latest.read_text().strip()
    sys.exit(f"{path}: not a model or run directory")


def read_tokens(path: Path):
    import numpy as np

    header = np.fromfile(path, dtype="<i4", count=256)
    magic, count = int(header[0]), int(header[2])
    dtype = {20240520: "<u2", 20240801: "<u4"}[magic]
    return np.fromfile(path, dtype=dtype, offset=1024, count=count).astype("int64")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=str(ROOT / "runs" / "shakespeare-char"))
    parser.add_argument("--data", default=str(ROOT / "data" / "shakespeare-char" / "val.bin"))
    parser.add_argument("--venv", default=str(ROOT / ".venv-hf"))
    parser.add_argument("--max-tokens", type=int, default=100_000, help="evaluate on at most this many tokens")
    args = parser.parse_args()
    ensure_environment(Path(args.venv))

    import torch
    import transformers
    from transformers import AutoTokenizer, GPT2LMHeadModel

    torch.manual_seed(0)
    model_dir = resolve_model_dir(Path(args.model))
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; checkpoint {model_dir}")
    failures = []
    config = json.loads((model_dir / "config.json").read_text())
    model_type = config["model_type"]
    if any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        check_classifier(model_dir, failures)
        finish(failures)
        return
    if model_type in ("bert", "distilbert"):
        check_masked_lm(model_dir, failures)
        finish(failures)
        return

    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"[ok] loaded GPT2LMHeadModel ({sum(p.numel() for p in model.parameters())} parameters) and {type(tokenizer).__name__}")

    for text in ["ROMEO:\nWhat light through yonder window breaks?", "First Citizen:\nBefore we proceed"]:
        ours = lmforge("generate", "--model", str(model_dir), "--prompt", text, "--max-new-tokens", "0", "--json")["samples"][0]["ids"]
        theirs = tokenizer(text)["input_ids"]
        status = "ok" if ours == theirs else "FAIL"
        if ours != theirs:
            failures.append("tokenizer")
        print(f"[{status}] tokenizer ids for {text[:20]!r}: {len(ours)} tokens, identical={ours == theirs}")

    # Save a truncated token file so both sides see exactly the same tokens.
    data = Path(args.data)
    data = data / "val.bin" if data.is_dir() else data
    tokens = read_tokens(data)[: args.max_tokens]
    sub = Path(os.environ.get("TMPDIR", "/tmp")) / "lmforge-roundtrip.bin"
    header = [0] * 256
    header[0], header[1], header[2] = (20240520 if model.config.vocab_size <= 65535 else 20240801), 1, len(tokens)
    import numpy as np

    with open(sub, "wb") as f:
        f.write(np.array(header, dtype="<i4").tobytes())
        f.write(tokens.astype("<u2" if header[0] == 20240520 else "<u4").tobytes())
    ours = lmforge("eval", "--model", str(model_dir), "--data", str(sub), "--json")

    ctx = model.config.n_positions
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(tokens) - 1, ctx):
            window = torch.tensor(tokens[start : min(start + ctx + 1, len(tokens))]).unsqueeze(0)
            logits = model(window[:, :-1]).logits
            total += torch.nn.functional.cross_entropy(logits[0].double(), window[0, 1:], reduction="sum").item()
            count += window.shape[1] - 1
    theirs = total / count
    rel = abs(ours["loss"] - theirs) / theirs
    status = "ok" if rel <= 1e-5 and ours["tokens"] == len(tokens) else "FAIL"
    if status == "FAIL":
        failures.append("loss")
    print(f"[{status}] loss over {count} predicted tokens: lmforge {ours['loss']:.7f}, transformers {theirs:.7f}, relative error {rel:.2e}")

    prompt = tokenizer("ROMEO:")["input_ids"]
    ours = lmforge("generate", "--model", str(model_dir), "--prompt-ids", ",".join(map(str, prompt)),
                   "--greedy", "--max-new-tokens", "40", "--json")["samples"][0]["ids"]
    with torch.no_grad():
        theirs = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=40,
                                pad_token_id=model.config.eos_token_id)[0].tolist()
    status = "ok" if ours == theirs else "FAIL"
    if ours != theirs:
        failures.append("greedy")
    print(f"[{status}] greedy decoding, 40 new tokens: identical={ours == theirs}: {tokenizer.decode(theirs)!r}")

    finish(failures)


def check_masked_lm(model_dir: Path, failures: list) -> None:
    import torch
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    print(f"[ok] loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters())} parameters) and {type(tokenizer).__name__}")
    for text in ["the [MASK] of the king", "ROMEO: what light through yonder [MASK] breaks? [MASK]"]:
        ours = lmforge("fill-mask", "--model", str(model_dir), "--text", text, "--top-k", "5", "--json")
        ids = tokenizer(text)["input_ids"]
        same = ours["ids"] == ids
        if not same:
            failures.append("tokenizer")
        print(f"[{'ok' if same else 'FAIL'}] tokenizer ids for {text!r}: {len(ids)} tokens, identical={same}")
        with torch.no_grad():
            probs = torch.softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        for fill in ours["masks"]:
            top = torch.topk(probs[fill["position"]], 5)
            their_ids = top.indices.tolist()
            our_ids = [c["id"] for c in fill["candidates"]]
            err = max(abs(c["probability"] - probs[fill["position"], c["id"]].item()) for c in fill["candidates"])
            ok = our_ids == their_ids and err <= 1e-5
            if not ok:
                failures.append("fill-mask")
            print(f"[{'ok' if ok else 'FAIL'}] position {fill['position']}: top-5 ids identical={our_ids == their_ids}, "
                  f"largest probability difference {err:.1e}: {tokenizer.convert_ids_to_tokens(their_ids)}")


def check_classifier(model_dir: Path, failures: list) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    print(f"[ok] loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters())} parameters), "
          f"labels {labels}, and {type(tokenizer).__name__}")
    texts = ["Great value, works perfectly.", "It broke after two days and support never answered.",
             "A very, very slow-moving, aimless movie.", "The acting was superb and the plot kept me guessing."]
    inputs = Path(os.environ.get("TMPDIR", "/tmp")) / "lmforge-roundtrip.txt"
    inputs.write_text("".join(t + "\n" for t in texts))
    binary = ROOT / "target" / "release" / "lmforge"
    out = subprocess.run([str(binary), "predict", "--model", str(model_dir), "--input", str(inputs), "--json"],
                         capture_output=True, text=True, env={**os.environ, "RUST_LOG": "warn"}, check=True)
    ours = [json.loads(line) for line in out.stdout.splitlines()]
    context = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
    for text, mine in zip(texts, ours):
        ids = tokenizer(text, truncation=True, max_length=context, return_tensors="pt")
        with torch.no_grad():
            probs = torch.softmax(model(**ids).logits[0].double(), dim=-1).tolist()
        err = max(abs(mine["scores"][label] - p) for label, p in zip(labels, probs))
        theirs = labels[max(range(len(probs)), key=probs.__getitem__)]
        ok = err <= 1e-5 and theirs == mine["label"]
        if not ok:
            failures.append("classify")
        print(f"[{'ok' if ok else 'FAIL'}] {text[:30]!r}: {theirs} / lmforge {mine['label']}, "
              f"largest probability difference {err:.1e}")


def finish(failures: list) -> None:
    if failures:
        sys.exit(f"round trip FAILED: {', '.join(failures)}")
    print("round trip OK: transformers loads the lmforge checkpoint unchanged and computes the same numbers")


if __name__ == "__main__":
    main()
