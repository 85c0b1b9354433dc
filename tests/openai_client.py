"""Talks to `lmforge serve` with the official OpenAI Python client (base URL in argv[1])."""
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused")
models = client.models.list()
assert [m.id for m in models.data] == ["tiny"], models

plain = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, seed=5, temperature=0.8)
text = plain.choices[0].text
assert plain.object == "text_completion" and text and plain.choices[0].finish_reason in ("stop", "length"), plain
assert plain.usage.prompt_tokens == 6 and plain.usage.total_tokens == 6 + plain.usage.completion_tokens, plain.usage

pieces = []
finish = None
for chunk in client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, seed=5, temperature=0.8, stream=True):
    pieces.append(chunk.choices[0].text)
    finish = chunk.choices[0].finish_reason or finish
assert "".join(pieces) == text, (pieces, text)
assert finish in ("stop", "length")

try:
    client.completions.create(model="nope", prompt="x")
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
print("openai client OK:", repr(text))
