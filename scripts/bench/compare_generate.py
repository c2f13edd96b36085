#!/usr/bin/env python3
"""Compares two `moemesh generate --json` outputs of the same request (two kernels, or graphs
and eager): how many leading tokens are equal, and the largest difference between their chosen
tokens' logprobs over those. Usage: compare_generate.py A.jsonl B.jsonl LABEL."""
import json
import sys


def load(path):
    last = None
    for line in open(path):
        if line.strip():
            d = json.loads(line)
            if "token_ids" in d:
                last = d
    return last


a, b = load(sys.argv[1]), load(sys.argv[2])
ta, tb = a["token_ids"], b["token_ids"]
same = 0
for x, y in zip(ta, tb):
    if x != y:
        break
    same += 1
pairs = list(zip(a["logprobs"][:same], b["logprobs"][:same]))
dl = max((abs(x - y) for x, y in pairs), default=float("nan"))
print(f"{sys.argv[3]}: {same}/{len(ta)} leading tokens equal, max |dlogprob| over them {dl:.2e}")
sys.exit(0 if same == len(ta) == len(tb) else 1)
