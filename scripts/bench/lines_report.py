#!/usr/bin/env python3
"""Table of `scripts/gpu-check.sh --lines`: each open decode line of issues 18 and 20 beside its
measurement (ms a step = ITL p50 of `bench --sweep`, 128-token prompts, 32 new tokens). The
lines are set for an H100; on another GPU the table says what that GPU does, not whether the
issue is met.
Usage: lines_report.py LINES.jsonl"""
import json
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]


def step(mode, batch):
    """ms a step of `mode` at `batch` where every request of the run succeeded, or None."""
    for r in rows:
        if (r.get("mode") == mode and r.get("concurrency") == batch
                and r.get("requests") and r.get("succeeded") == r.get("requests")):
            return r["itl_ms"]["p50"]
    return None


def memory(wd):
    for r in rows:
        if r.get("mode") == f"memory {wd}":
            return r.get("gib")
    return None


def fmt(v, unit=""):
    return "—" if v is None else f"{v:.2f}{unit}"


table = []


def line(name, target, value, holds, shown):
    table.append((name, target, shown, "—" if value is None else ("yes" if holds(value) else "no")))


for where in ("in-process", "mesh"):
    for b, limit in ((1, 3.2), (64, 14.7)):
        v = step(f"{where} bf16 greedy", b)
        line(f"18: {where} batch {b}, ms a step", f"≤ {limit}", v, lambda x, l=limit: x <= l, fmt(v))
v = step("in-process bf16 greedy", 256)
table.append(("18: in-process batch 256, ms a step", "recorded", fmt(v), "—"))
for where, batches in (("in-process", (1, 64, 256)), ("mesh", (1, 64))):
    for b in batches:
        g, s = step(f"{where} bf16 greedy", b), step(f"{where} bf16 sampled", b)
        v = None if g is None or s is None else (s / g - 1) * 100
        line(f"18: {where} batch {b}, sampled over greedy", "≤ +5%", v, lambda x: x <= 5.0,
             "—" if v is None else f"{v:+.1f}% ({fmt(s)} / {fmt(g)} ms)")
for wd, b, target in (("fp8", 1, 1.6), ("fp8", 64, 1.6), ("int4", 1, 2.5)):
    base, q = step("in-process bf16 greedy", b), step(f"in-process {wd} greedy", b)
    v = None if base is None or q is None else base / q
    line(f"20: {wd.upper()} against bf16, batch {b}, decode tok/s", f"≥ {target}×", v,
         lambda x, t=target: x >= t, "—" if v is None else f"{v:.2f}× ({fmt(q)} / {fmt(base)} ms)")
mb, mf = memory("bf16"), memory("fp8")
v = None if not mb or mf is None else mf / mb * 100
line("20: FP8 device memory against bf16", "≤ 55%", v, lambda x: x <= 55.0,
     "—" if v is None else f"{v:.1f}% ({mf:.2f} / {mb:.2f} GiB)")

print("| line (issue) | target | measured | holds here |")
print("| --- | --- | --- | --- |")
for name, target, shown, holds in table:
    print(f"| {name} | {target} | {shown} | {holds} |")
