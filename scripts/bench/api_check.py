#!/usr/bin/env python3
"""Checks issue 19's request fields against a running `moemesh up --http-listen ADDR` (used by
scripts/gpu-check.sh --api, so that the GPU paths of constrained decoding and prompt logprobs run
on a GPU): a regex-constrained completion matches its regex, a JSON-schema chat answer parses
and has the schema's required key, and prompt logprobs come in vLLM's shape (null first, then
one entry per prompt token, each holding that token). Exit status 1 on any failure.
Usage: api_check.py http://127.0.0.1:PORT"""
import json
import re
import sys
import urllib.request

base = sys.argv[1].rstrip("/")
failures = 0


def post(path, body):
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def check(name, ok, detail):
    global failures
    print(f"{name:<40} {'pass' if ok else 'FAIL'}  {detail}")
    failures += 0 if ok else 1


model = json.load(urllib.request.urlopen(base + "/v1/models", timeout=30))["data"][0]["id"]
pattern = "[0-9]{3}-[a-z]{2,4}"
r = post("/v1/completions", {"model": model, "prompt": "The code is", "max_tokens": 24,
                             "guided_regex": pattern, "seed": 7, "temperature": 0.8})
text = r["choices"][0]["text"]
check("guided_regex", re.fullmatch(pattern, text) is not None, repr(text))

schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}},
          "required": ["name"], "additionalProperties": False}
r = post("/v1/chat/completions", {"model": model, "max_tokens": 48, "temperature": 0,
                                  "messages": [{"role": "user", "content": "Name someone."}],
                                  "response_format": {"type": "json_schema",
                                                      "json_schema": {"name": "p", "schema": schema}}})
content = r["choices"][0]["message"]["content"]
try:
    parsed = json.loads(content)
    ok = isinstance(parsed, dict) and set(parsed) == {"name"} and isinstance(parsed["name"], str)
except ValueError:
    ok = False
check("response_format json_schema", ok, repr(content))

r = post("/v1/completions", {"model": model, "prompt": "one two three four five", "max_tokens": 2,
                             "prompt_logprobs": 2})
pl = r.get("prompt_logprobs") or r["choices"][0].get("prompt_logprobs")
ok = (isinstance(pl, list) and len(pl) >= 2 and pl[0] is None
      and all(isinstance(e, dict) and e for e in pl[1:])
      and all(all(v["logprob"] <= 0 for v in e.values()) for e in pl[1:]))
check("prompt_logprobs", ok, f"{len(pl) if isinstance(pl, list) else pl} entries")
sys.exit(1 if failures else 0)
