"""Writes an lm-evaluation-harness multiple-choice task read from a local JSONL file:
each question a line of the corpus without its last word; the choices that word and
the last words of the next three lines.

    python3 bench/lm-eval/make_task.py CORPUS.txt OUT_DIR N
"""
import json
import pathlib
import sys

corpus, out, n = sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3])
lines = [l.strip() for l in open(corpus, encoding="utf-8") if len(l.split()) >= 6]
out.mkdir(parents=True, exist_ok=True)
with open(out / "mc.jsonl", "w") as f:
    for i in range(n):
        words = lines[i * 7].split()
        choices = [" " + lines[i * 7 + k].split()[-1] for k in range(4)]
        shift = i % 4
        choices = choices[shift:] + choices[:shift]
        f.write(json.dumps({"question": " ".join(words[:-1]), "choices": choices, "answer": (4 - shift) % 4}) + "\n")
(out / "lmforge_mc.yaml").write_text(
    f"""task: lmforge_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {(out / 'mc.jsonl').resolve()}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
"""
)
print(f"{out}: {n} questions")
