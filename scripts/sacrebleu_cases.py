#!/usr/bin/env python3
"""Golden BLEU and chrF from sacreBLEU, for lmforge's metric tests.

    python3 scripts/sacrebleu_cases.py tests/fixtures/generation-metrics/cases.json

Each case is hypotheses and reference streams (one segment a line); the file stores
sacreBLEU's corpus BLEU (score, brevity penalty, precisions, lengths) for each
tokenizer with and without lowercasing, sentence BLEU with effective order per
segment, and corpus and sentence chrF, with the sacreBLEU version. Needs
`pip install sacrebleu`.
"""
import json
import random
import sys

import sacrebleu
from sacrebleu.metrics import BLEU, CHRF

CASES = [
    ("two references", [
        "The cat sat on the mat.",
        "There is a cat on the mat today.",
        "A quick brown fox jumps over the lazy dog",
    ], [[
        "The cat is on the mat.",
        "There is a cat on the mat.",
        "The quick brown fox jumped over the lazy dog.",
    ], [
        "A cat sat on the mat.",
        "A cat is on the mat today.",
        "A fast brown fox leaps over a lazy dog.",
    ]]),
    ("empty and short hypotheses", [
        "",
        "Yes.",
        "It works",
        "no",
    ], [[
        "Nothing here.",
        "Yes.",
        "It works well.",
        "No, it does not.",
    ]]),
    ("numbers, commas, hyphens and entities", [
        "In 2019-2020 sales rose 1,234.5 units - a 3.5% gain &quot;quietly&quot;.",
        "Call 555-1234, ext. 12; cost: $4,000.",
        "Tom &amp; Jerry &lt;3 &gt; all",
    ], [[
        "In 2019-2020, sales rose by 1,234.5 units - a 3.5% gain \"quietly\".",
        "Call 555-1234, extension 12; the cost is $4,000.",
        "Tom & Jerry <3 > all",
    ]]),
    ("unicode", [
        "Der schnelle braune Fuchs springt über den faulen Hund.",
        "“Quoted” text — with dashes… and ½ ratios ©2024",
        "我们今天去公园散步。",
        "Ça va très bien, merci!",
    ], [[
        "Der schnelle braune Fuchs sprang über den faulen Hund.",
        "\"Quoted\" text - with dashes... and 1/2 ratios (c)2024",
        "我们今天去了公园散步。",
        "Ça va bien, merci !",
    ]]),
]


def random_case(seed):
    rng = random.Random(seed)
    words = "the a cat dog sat on mat , . ran quickly slowly over under big small red 1,000 3.5 - it's".split()
    hyps, refs = [], [[], []]
    for _ in range(12):
        hyps.append(" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))))
        for r in refs:
            r.append(" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))))
    return (f"random {seed}", hyps, refs)


def bleu_fields(s):
    return {"score": s.score, "bp": s.bp, "precisions": list(s.precisions), "sys_len": s.sys_len, "ref_len": s.ref_len}


out = []
for name, hyps, refs in CASES + [random_case(1), random_case(2)]:
    case = {"name": name, "hyps": hyps, "refs": refs, "bleu": {}, "sentence_bleu": {}}
    for tok in ["13a", "intl", "zh", "char", "none"]:
        for lc in [False, True]:
            key = f"{tok}{'-lc' if lc else ''}"
            case["bleu"][key] = bleu_fields(BLEU(tokenize=tok, lowercase=lc).corpus_score(hyps, refs))
            sentence = BLEU(tokenize=tok, lowercase=lc, effective_order=True)
            case["sentence_bleu"][key] = [
                sentence.sentence_score(h, [r[i] for r in refs]).score for i, h in enumerate(hyps)]
    case["chrf"] = {"mixed": CHRF().corpus_score(hyps, refs).score,
                    "lc": CHRF(lowercase=True).corpus_score(hyps, refs).score}
    case["sentence_chrf"] = [CHRF().sentence_score(h, [r[i] for r in refs]).score for i, h in enumerate(hyps)]
    out.append(case)
json.dump({"sacrebleu": sacrebleu.__version__, "cases": out}, open(sys.argv[1], "w"), ensure_ascii=False, indent=1)
print(f"{sys.argv[1]}: {len(out)} cases, sacrebleu {sacrebleu.__version__}")
