"""Queries one of our servers with the official `openai` Python client and prints what it got
as JSON, for the serve test suite to compare with in-process generation.

    python scripts/openai_client_check.py BASE_URL MODEL TOKEN PROMPT

Asks, through `client.chat.completions.create`: a greedy answer; the same with logprobs and
top_logprobs=3; the same streamed; and `client.models.list()`. A wrong token must raise
`openai.AuthenticationError`, an unknown model `openai.NotFoundError`, max_tokens over the
limit `openai.BadRequestError`.
"""
import json
import sys

import openai

base_url, model, token, prompt = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=120)
messages = [{"role": "user", "content": prompt}]
out = {"models": [m.id for m in client.models.list().data]}

greedy = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24)
out["greedy"] = greedy.choices[0].message.content
out["finish_reason"] = greedy.choices[0].finish_reason
out["usage"] = [greedy.usage.prompt_tokens, greedy.usage.completion_tokens]

scored = client.chat.completions.create(
    model=model, messages=messages, temperature=0, max_tokens=24, logprobs=True, top_logprobs=3
)
content = scored.choices[0].logprobs.content
out["logprob_tokens"] = [t.token for t in content]
out["logprob_bytes"] = [t.bytes for t in content]
out["logprobs"] = [t.logprob for t in content]
out["top_logprobs"] = [[[c.token, c.logprob] for c in t.top_logprobs] for t in content]

pieces = []
finish = None
for chunk in client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=24, stream=True):
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
        if choice.finish_reason:
            finish = choice.finish_reason
out["streamed"] = "".join(pieces)
out["streamed_finish_reason"] = finish

errors = {}
try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).chat.completions.create(
        model=model, messages=messages, max_tokens=4
    )
except openai.AuthenticationError as e:
    errors["wrong_token"] = e.status_code
try:
    client.chat.completions.create(model="no-such-model", messages=messages, max_tokens=4)
except openai.NotFoundError as e:
    errors["unknown_model"] = e.status_code
try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=10**6)
except openai.BadRequestError as e:
    errors["max_tokens"] = e.status_code
out["errors"] = errors
print(json.dumps(out))
