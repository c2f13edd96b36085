#!/usr/bin/env python3
"""Writes scenarios/multi-turn-chat-tokens.json: the multi-turn-chat scenario with token-id
prompts (GenerateRequest.tokens), for models without a tokenizer (synthetic:v2-lite on a GPU)
as well as any other: a shared 1,500-token "system prompt", then for each of 4 conversations 3
turns whose history grows (a 24-token user message, a 32-token reply per earlier turn). Ids
are drawn from a fixed seed in [1000, 30000), inside every vocabulary moemesh serves.

    python3 loadtest/make-token-chat.py    # deterministic: rerunning writes the same file

A heavier variant for a GPU (not committed: 32 conversations make a ~1 MB file), one
conversation per client:

    python3 loadtest/make-token-chat.py --conversations 32 --concurrency 32 --out /tmp/chat-32.json
"""
import argparse
import json
import pathlib
import random

here = pathlib.Path(__file__).parent
ap = argparse.ArgumentParser(description="the multi-turn-chat scenario with token-id prompts")
ap.add_argument("--conversations", type=int, default=4)
ap.add_argument("--concurrency", type=int, help="clients (default: the text scenario's, 4)")
ap.add_argument("--out", type=pathlib.Path, default=here / "scenarios/multi-turn-chat-tokens.json")
args = ap.parse_args()
if args.conversations < 1 or (args.concurrency is not None and args.concurrency < 1):
    ap.error("--conversations and --concurrency must be at least 1")

SYSTEM, USER, REPLY, CONVERSATIONS, TURNS, NEW = 1500, 24, 32, args.conversations, 3, 32

rng = random.Random(21)


def ids(n):
    return [rng.randrange(1000, 30000) for _ in range(n)]


system = ids(SYSTEM)
data = []
for _ in range(CONVERSATIONS):
    history = list(system)
    for _ in range(TURNS):
        history += ids(USER)
        data.append(
            {
                "tokens": {"ids": list(history)},
                "stopping": {"max_new_tokens": NEW, "ignore_eos": True},
            }
        )
        history += ids(REPLY)
# The text scenario's order: the turns of the conversations interleaved, as clients would.
data = [data[c * TURNS + t] for t in range(TURNS) for c in range(CONVERSATIONS)]
base = json.loads((here / "scenarios/multi-turn-chat.json").read_text())
base.update({"name": "multi-turn chat (token ids)", "data": data})
if args.concurrency:
    base.update({"name": f"multi-turn chat (token ids, {CONVERSATIONS} conversations)",
                 "concurrency": args.concurrency})
# One request per line: the ids are not for reading.
lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in base.items() if k != "data"]
items = ",\n".join(f"  {json.dumps(d, separators=(',', ':'))}" for d in data)
lines.append(f' "data": [\n{items}\n ]')
text = "{\n" + ",\n".join(lines) + "\n}\n"
args.out.write_text(text)
