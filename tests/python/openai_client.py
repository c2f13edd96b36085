"""The official `openai` Python client against moemesh's HTTP API (run by tests/tests/openai_http.rs).

argv: base URL (http://HOST:PORT/v1), a valid API key. Prints one JSON line of what it saw; raises
(exit 1) on anything a client of the OpenAI API would not accept.
"""
import json
import sys

import openai

base, key = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0)
seen = {}

models = client.models.list()
model = models.data[0].id
seen["model"] = model

messages = [{"role": "user", "content": "Name a color."}]
whole = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
seen["chat_text"] = whole.choices[0].message.content
# With --reasoning-parser deepseek-r1, what precedes </think> (here: all of it) is reasoning.
seen["chat_reasoning"] = getattr(whole.choices[0].message, "reasoning_content", None)
seen["chat_finish"] = whole.choices[0].finish_reason
seen["chat_usage"] = whole.usage.completion_tokens
seen["cached_tokens"] = whole.usage.prompt_tokens_details.cached_tokens

parts, thoughts, usage = [], [], None
stream = client.chat.completions.create(
    model=model, messages=messages, max_tokens=6, temperature=0, stream=True,
    stream_options={"include_usage": True},
)
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage.completion_tokens
    for c in chunk.choices:
        if c.delta.content:
            parts.append(c.delta.content)
        r = getattr(c.delta, "reasoning_content", None)
        if r:
            thoughts.append(r)
seen["stream_text"] = "".join(parts)
seen["stream_reasoning"] = "".join(thoughts)
seen["stream_usage"] = usage

texts = [
    client.completions.create(model=model, prompt="Once upon a time", max_tokens=8,
                              temperature=0.9, seed=1234).choices[0].text
    for _ in range(2)
]
seen["seeded_equal"] = texts[0] == texts[1]
# The same seeded request with a stop string taken from its own text (when the text is long
# enough): it must end there, with finish_reason "stop", and the stop string not returned.
seen["stop_used"] = len(texts[0]) > 5
stop = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8,
                                 temperature=0.9, seed=1234, stop=[texts[0][2:5]] if seen["stop_used"] else None)
seen["stop_finish"] = stop.choices[0].finish_reason
seen["stop_text_is_prefix"] = texts[0].startswith(stop.choices[0].text) and len(stop.choices[0].text) <= 2

try:
    client.chat.completions.create(model=model, messages=messages, max_tokens=0)
    seen["bad_request"] = None
except openai.BadRequestError as e:
    seen["bad_request"] = [e.status_code, e.body.get("message") if isinstance(e.body, dict) else str(e.body)]

try:
    openai.OpenAI(base_url=base, api_key="not-a-key", max_retries=0).chat.completions.create(
        model=model, messages=messages, max_tokens=2)
    seen["bad_key"] = None
except openai.AuthenticationError as e:
    seen["bad_key"] = e.status_code

print(json.dumps(seen))
