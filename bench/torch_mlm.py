"""configs/bert-mlm.toml's recipe in PyTorch + transformers, for comparing masked-LM
pretraining quality per step with lmforge's.

Trains transformers' BertForMaskedLM (4 layers, 4 heads, 128 dims, dropout off) on
lmforge's prepared WordPiece shards: each document of the token stream (documents
are preceded by [SEP] = 3) is cut into blocks of 126 tokens, a sequence is
[CLS] block [SEP] padded to 128 with an attention mask, masked by transformers'
DataCollatorForLanguageModeling (mlm_probability 0.15: 80 % [MASK], 10 % random, 10 %
kept). AdamW lr 1e-3 → 1e-4 cosine after the warm-up, weight decay 0.1 on >=2-D
weights, betas 0.9/0.999, clip 1.0, batch 16. Writes JSONL lines {"step", "val_loss",
"elapsed_s"}: the masked-token loss over 20 fixed validation batches.

    python bench/torch_mlm.py --data data/shakespeare-wordpiece --out bench/results/torch-mlm.jsonl [--save DIR]

With --save, the trained model is written with save_pretrained (plus the data's
tokenizer), so `lmforge eval --model DIR --data …` scores it on exactly the masked
validation sequences lmforge's own models are scored on.
"""

import argparse
import json
import time

import numpy as np
import torch
from torch_train import load_shard, lr_at
from transformers import BertConfig, BertForMaskedLM, DataCollatorForLanguageModeling, PreTrainedTokenizerFast

CLS, SEP, PAD = 2, 3, 0


def blocks(tokens, length):
    """(start, len) of each block of at most `length` tokens of each document."""
    out, start = [], 0
    for end in list(np.flatnonzero(tokens == SEP)) + [len(tokens)]:
        for s in range(start, end, length):
            out.append((s, min(length, end - s)))
        start = end + 1
    return out


def sequences(tokens, spans, t):
    ids = np.full((len(spans), t), PAD, dtype=np.int64)
    mask = np.zeros((len(spans), t), dtype=np.int64)
    for r, (s, n) in enumerate(spans):
        ids[r, : n + 2] = [CLS, *tokens[s : s + n], SEP]
        mask[r, : n + 2] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--save", help="save_pretrained the trained model here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(1337)
    train, val = load_shard(f"{args.data}/train.bin"), load_shard(f"{args.data}/val.bin")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=f"{args.data}/tokenizer.json", unk_token="[UNK]", sep_token="[SEP]",
        pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
    )
    vocab = len(tokenizer)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=0.15)
    b, t, lr_max, lr_min = 16, 128, 1e-3, 1e-4
    cfg = BertConfig(vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=512, max_position_embeddings=t, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=PAD)
    model = BertForMaskedLM(cfg)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr_max, betas=(0.9, 0.999),
    )
    train_spans, val_spans = blocks(train, t - 2), blocks(val, t - 2)
    rng = np.random.default_rng(1337)

    def masked_batch(tokens, spans, pick):
        ids, mask = sequences(tokens, [spans[i] for i in pick], t)
        batch = collator([{"input_ids": row} for row in ids])
        return batch["input_ids"], mask, batch["labels"]

    @torch.no_grad()
    def val_loss():
        torch_state = torch.get_rng_state()
        torch.manual_seed(4)
        eval_rng = np.random.default_rng(1340)
        total, count = 0.0, 0
        model.eval()
        for _ in range(20):
            ids, mask, labels = masked_batch(val, val_spans, eval_rng.integers(0, len(val_spans), b))
            n = int((labels != -100).sum())
            total += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * n
            count += n
        model.train()
        torch.set_rng_state(torch_state)
        return total / count

    start = time.perf_counter()
    with open(args.out, "w") as out:
        def log(step):
            v = val_loss()
            out.write(json.dumps({"step": step, "val_loss": v, "elapsed_s": time.perf_counter() - start}) + "\n")
            out.flush()
            print(f"step {step}: val loss {v:.4f} at {time.perf_counter() - start:.1f} s", flush=True)

        log(0)
        for step in range(args.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.steps, args.warmup, lr_max, lr_min)
            ids, mask, labels = masked_batch(train, train_spans, rng.integers(0, len(train_spans), b))
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
                log(step + 1)
    if args.save:
        model.save_pretrained(args.save)
        tokenizer.save_pretrained(args.save)


if __name__ == "__main__":
    main()
