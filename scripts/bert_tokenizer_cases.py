#!/usr/bin/env python3
"""Golden ids for lmforge's BERT tokenizer tests, from Hugging Face transformers.

    python3 scripts/bert_tokenizer_cases.py tests/fixtures/bert-tokenizer/vocab.txt

Reads a BERT vocab.txt, encodes each case string with transformers' fast BertTokenizer
(the `tokenizers`-backed class; `BertTokenizerFast` in transformers 4) and the slow,
pure-Python one (`BertTokenizerLegacy` in transformers 5, `BertTokenizer` in 4), both
uncased and without special tokens, and writes cases.json beside the vocabulary: the
strings, both id lists, and the transformers version. Needs `pip install transformers`
(no torch).
"""
import json
import sys
from pathlib import Path

import transformers

try:  # transformers 5: one tokenizers-backed class, the pure-Python one renamed
    from transformers import BertTokenizer as Fast
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy as Slow

    def make_fast(vocab):
        return Fast(vocab=str(vocab), do_lower_case=True)
except ImportError:  # transformers 4
    from transformers import BertTokenizer as Slow
    from transformers import BertTokenizerFast as Fast

    def make_fast(vocab):
        return Fast(vocab_file=str(vocab), do_lower_case=True)

CASES = [
    "the king is dead, long live the king!",
    "ROMEO: But, soft! what light through yonder window breaks?",
    "Élan vital: ÀÉÎÕÜ çà et là, naïve café, Ångström",
    "日本語の文章と中文句子 mixed with English",
    "punctuation... (brackets) [square] {curly} \"quotes\" 'single' — dashes – and ¿¡",
    "a" * 101 + " short",
    "tabs\tand\nnewlines\r\n and   runs   of spaces",
    "numbers 3.14159 and 1,000,000 and 42nd",
    "emoji 🙂 and symbols ©®™ and math ∑∫√",
    "the [MASK] is [MASK] here",
    "İstanbul ǅemal Straße ΣΊΣΥΦΟΣ",
    "",
]


def main() -> None:
    vocab = Path(sys.argv[1])
    fast = make_fast(vocab)
    slow = Slow(vocab_file=str(vocab), do_lower_case=True)
    cases = []
    for text in CASES:
        cases.append({
            "text": text,
            "fast": fast(text, add_special_tokens=False)["input_ids"],
            "slow": slow(text, add_special_tokens=False)["input_ids"],
            "with_special": fast(text)["input_ids"],
        })
    out = {"transformers": transformers.__version__, "cases": cases}
    (vocab.parent / "cases.json").write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main()
