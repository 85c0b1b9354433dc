#!/usr/bin/env python3
"""What llama.cpp (through llama-cpp-python) computes on a GGUF, for comparison with
lmforge on the same file: the `gguf` package's view of the file, the mean next-token
loss over a token sequence, and greedy decoding from a prompt.

    python scripts/llama_cpp_check.py FILE.gguf --ids 1,2,3,... --prompt-ids 1,2 --new 20

Prints one JSON object: {"tensors": {name: [type, shape]}, "metadata": {...},
"loss": mean NLL of ids[1:] given their prefixes (one pass, context = len(ids)),
"greedy": prompt + new ids, "tokens_per_s": greedy decoding speed, "peak_rss_mb"}.
"""
import argparse
import json
import math
import resource
import time

import numpy as np
from gguf import GGUFReader
from llama_cpp import Llama

ap = argparse.ArgumentParser()
ap.add_argument("gguf")
ap.add_argument("--ids", required=True)
ap.add_argument("--prompt-ids", required=True)
ap.add_argument("--new", type=int, default=20)
ap.add_argument("--threads", type=int, default=2)
a = ap.parse_args()
ids = [int(x) for x in a.ids.split(",")]
prompt = [int(x) for x in a.prompt_ids.split(",")]

reader = GGUFReader(a.gguf)
tensors = {t.name: [t.tensor_type.name, [int(d) for d in t.shape]] for t in reader.tensors}
metadata = {}
for name, field in reader.fields.items():
    if name.startswith("gpt2.") or name in ("general.architecture", "tokenizer.ggml.model"):
        value = field.parts[field.data[0]]
        metadata[name] = bytes(value).decode() if field.types[0].name == "STRING" else value.tolist()[0]

llm = Llama(model_path=a.gguf, n_ctx=max(len(ids), len(prompt) + a.new), logits_all=True,
            n_threads=a.threads, verbose=False)
llm.reset()
llm.eval(ids)
logits = np.array(llm.scores[: len(ids)], dtype=np.float64)
total = 0.0
for i in range(len(ids) - 1):
    row = logits[i]
    m = row.max()
    total += m + math.log(np.exp(row - m).sum()) - row[ids[i + 1]]
loss = total / (len(ids) - 1)

llm.reset()
out = list(prompt)
t0 = time.perf_counter()
for tok in llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0, reset=True):
    out.append(int(tok))
    if len(out) == len(prompt) + a.new:
        break
elapsed = time.perf_counter() - t0
print(json.dumps({"tensors": tensors, "metadata": metadata, "loss": loss, "greedy": out,
                  "tokens_per_s": a.new / elapsed,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
