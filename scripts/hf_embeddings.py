"""Sentence embeddings of token-id inputs as transformers computes them, pooled as
sentence-transformers pools: the reference tests/embeddings.rs compares
`lmforge embed` and /v1/embeddings against.

    python scripts/hf_embeddings.py MODEL_DIR INPUTS.jsonl mean|cls|last [--normalize]

INPUTS.jsonl holds one {"ids": [...]} a line; prints one JSON array of vectors.
"""
import json
import sys

import torch
from transformers import AutoModel

model_dir, inputs, pooling = sys.argv[1:4]
normalize = "--normalize" in sys.argv[4:]
rows = [json.loads(l)["ids"] for l in open(inputs) if l.strip()]
model = AutoModel.from_pretrained(model_dir).eval()
pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
width = max(len(r) for r in rows)
ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
with torch.no_grad():
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
if pooling == "mean":
    m = mask.unsqueeze(-1).to(hidden.dtype)
    vectors = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
elif pooling == "cls":
    vectors = hidden[:, 0]
else:
    vectors = hidden[torch.arange(len(rows)), mask.sum(1) - 1]
if normalize:
    vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
print(json.dumps(vectors.tolist()))
