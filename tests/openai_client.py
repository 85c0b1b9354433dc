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

# Log-probabilities and echo, as lm-evaluation-harness asks for them.
scored = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=0, echo=True, logprobs=1)
lp = scored.choices[0].logprobs
assert scored.choices[0].text == "ROMEO:" and len(lp.tokens) == 6, scored
assert lp.token_logprobs[0] is None and all(x < 0 for x in lp.token_logprobs[1:]), lp

# Embeddings: the client asks for base64 by default and decodes it; float on request.
default = client.embeddings.create(model="tiny", input=["ROMEO:", "JULIET: O Romeo"])
floats = client.embeddings.create(model="tiny", input=["ROMEO:", "JULIET: O Romeo"], encoding_format="float")
assert [d.index for d in default.data] == [0, 1] and default.object == "list", default
for a, b in zip(default.data, floats.data):
    assert len(a.embedding) == len(b.embedding) > 0
    assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding)) == 0.0
assert default.usage.prompt_tokens == 6 + 15, default.usage

try:
    client.completions.create(model="nope", prompt="x")
    raise AssertionError("unknown model accepted")
except openai.NotFoundError as e:
    assert e.body["code"] == "model_not_found", e.body
print("openai client OK:", repr(text))
