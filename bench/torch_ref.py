"""PyTorch reference for `lmforge bench`: the same model, optimizer and step.

GPT-2 presets (small, medium):

nanoGPT's architecture (pre-LayerNorm blocks, learned positions, causal attention
through scaled_dot_product_attention, tanh-GELU MLP, head tied to the token
embedding, biases on), AdamW with decay on >=2-D weights only, global-norm clipping
at 1.0. One iteration = forward + backward + clip + step on random tokens, the
measurement `lmforge bench` makes. Generation uses Hugging Face transformers'
`generate` (greedy, KV cache) on a GPT2LMHeadModel of the same shape.

BERT presets (bert-small, bert-medium): transformers' BertForMaskedLM (erf-GELU,
post-LN, tied decoder) with dropout off, on random ids with labels at a random 15 %
of the positions (the rest -100), all positions attended; AdamW betas 0.9/0.999.

GPT-2 124M on a GPU (bench/gpu.sh): --preset gpt2 --device cuda --dtype bf16
--compile runs the step under bf16 autocast in a torch.compile'd model (attention
through scaled_dot_product_attention, fused AdamW), the peer issue 23 names.

    python bench/torch_ref.py --preset small --threads 2 --json
"""

import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# The shapes of `lmforge bench --preset …` (src/bench.rs keeps the same table).
PRESETS = {
    "small": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12),
    "medium": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16),
    "bert-small": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=16),
    "bert-medium": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=16),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=16, vocab=50257),
}
VOCAB = 65
BERT_VOCAB = 2000
MLM_PROBABILITY = 0.15


class Block(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.h = h
        self.ln_1 = nn.LayerNorm(c)
        self.c_attn = nn.Linear(c, 3 * c)
        self.c_proj = nn.Linear(c, c)
        self.ln_2 = nn.LayerNorm(c)
        self.c_fc = nn.Linear(c, 4 * c)
        self.mlp_proj = nn.Linear(4 * c, c)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, block_size, vocab=VOCAB):
        super().__init__()
        self.vocab = vocab
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif "ln" not in name:
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(t, device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()
        return F.cross_entropy(logits.view(-1, self.vocab).float(), targets.view(-1))


def sync():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def ceiling_gflops(n=2048, repeats=5, device="cpu", dtype=torch.float32):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def timed(fn):
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def flops_per_token(n_layer, n_embd, block_size, vocab=VOCAB, **_):
    c = n_embd
    block = 4 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c)
    n = vocab * c + n_layer * block + 2 * c
    return 6 * n + 12 * n_layer * n_embd * block_size


def bert_flops_per_token(n_layer, n_embd, block_size, **_):
    """src/model/bert.rs's count: 6N over the encoder and head (decoder at every
    position) plus 12·L·d·T for attention."""
    c, f, v = n_embd, 4 * n_embd, BERT_VOCAB
    layer = 4 * (c * c + c) + (c * f + f) + (f * c + c) + 4 * c
    n = n_layer * layer + (c * c + c) + 2 * c + v * c + v
    return 6 * n + 12 * n_layer * n_embd * block_size


def bert_model(shape):
    from transformers import BertConfig, BertForMaskedLM

    cfg = BertConfig(
        vocab_size=BERT_VOCAB, hidden_size=shape["n_embd"], num_hidden_layers=shape["n_layer"],
        num_attention_heads=shape["n_head"], intermediate_size=4 * shape["n_embd"],
        max_position_embeddings=shape["block_size"], hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(cfg).train()
    b, t = shape["batch_size"], shape["block_size"]
    mask = torch.ones((b, t), dtype=torch.long)

    def loss(x, gen):
        labels = torch.randint(0, BERT_VOCAB, (b, t), generator=gen)
        keep = torch.rand((b, t), generator=gen) < MLM_PROBABILITY
        labels = torch.where(keep, labels, torch.full_like(labels, -100))
        return model(input_ids=x, attention_mask=mask, labels=labels).loss

    return model, loss


def generate_tokens_per_s(shape, new_tokens, device="cpu", dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=shape.get("vocab", VOCAB), n_positions=max(shape["block_size"], 512),
        n_embd=shape["n_embd"], n_layer=shape["n_layer"], n_head=shape["n_head"],
        activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        bos_token_id=0, eos_token_id=None,
    )
    model = GPT2LMHeadModel(cfg).eval().to(device=device, dtype=dtype)
    prompt = torch.zeros((1, 1), dtype=torch.long, device=device)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  use_cache=True, pad_token_id=0)
    with torch.no_grad():
        model.generate(prompt, **kwargs)
        times = [timed(lambda: model.generate(prompt, **kwargs)) for _ in range(3)]
    return new_tokens / statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--generate-tokens", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--batch-size", type=int, help="override the preset's batch")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    shape = dict(PRESETS[args.preset])
    if args.batch_size:
        shape["batch_size"] = args.batch_size
    b, t = shape["batch_size"], shape["block_size"]
    vocab = shape.get("vocab", VOCAB)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    bert = args.preset.startswith("bert")
    if bert:
        model, bert_loss = bert_model(shape)
    else:
        model = GPT(shape["n_layer"], shape["n_head"], shape["n_embd"], t, vocab).to(args.device)
    forward = torch.compile(model) if args.compile else model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.999 if bert else 0.99), eps=1e-8,
        fused=args.device.startswith("cuda"),
    )
    gen = torch.Generator().manual_seed(0)

    def step():
        x = torch.randint(0, BERT_VOCAB if bert else vocab, (b, t), generator=gen)
        if bert:
            loss = bert_loss(x, gen)
        else:
            y = torch.randint(0, vocab, (b, t), generator=gen)
            with torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=args.dtype != "f32"):
                loss = forward(x.to(args.device), y.to(args.device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    for _ in range(args.warmup):
        step()
    times = sorted(timed(step) for _ in range(args.steps))
    ms = 1e3 * statistics.median(times)
    tokens_per_s = b * t / (ms / 1e3)
    gflops = (bert_flops_per_token if bert else flops_per_token)(**shape) * tokens_per_s / 1e9
    ceiling = ceiling_gflops(device=args.device, dtype=dtype)
    result = {
        "preset": args.preset,
        "tokens_per_s": tokens_per_s,
        "ms_per_step": ms,
        "ms_min": 1e3 * times[0],
        "ms_max": 1e3 * times[-1],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "gflops": gflops,
        "ceiling_gflops": ceiling,
        "mfu": gflops / ceiling,
        "generate_tokens_per_s": generate_tokens_per_s(shape, args.generate_tokens, args.device, dtype)
        if args.generate_tokens > 0 and not bert else None,
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()))


if __name__ == "__main__":
    main()
