#!/usr/bin/env python3
"""Where time to first token goes, from a mesh log with `moemesh_frontend::step_time=debug`.

    MOEMESH_LOG=warn,moemesh_frontend::step_time=debug loadtest/run.sh --up --out DIR SCENARIO
    python3 scripts/bench/step_times.py DIR/mesh-logs/up.err

Prints, per kind of step (decode only; carrying prefills, by how many and by computed rows),
the count and wall time (p50 / p90 / mean ms), and for the sequences' first tokens how long
they waited for their step to be sent against how long that step took."""
import re
import statistics
import sys

ANSI = re.compile(r"\x1b\[[0-9;]*m")
FIELD = re.compile(r"(\w+)=(\[[^\]]*\]|\S+)")


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p / 100 * len(xs)))] if xs else float("nan")


def row(name, xs):
    if not xs:
        return
    ms = [x / 1e3 for x in xs]
    print(f"| {name} | {len(ms)} | {pct(ms, 50):.1f} | {pct(ms, 90):.1f} | {statistics.mean(ms):.1f} |")


steps = []
for line in open(sys.argv[1], errors="replace"):
    if "step time" not in line:
        continue
    f = dict(FIELD.findall(ANSI.sub("", line)))
    try:
        s = {k: int(f[k]) for k in ("us", "decode", "prefills", "prefill_tokens", "cached_tokens")}
    except (KeyError, ValueError):
        continue
    s["first"] = [int(v) for v in f.get("first_waits_us", "[]").strip("[]").split(",") if v.strip()]
    steps.append(s)
# The first and last tenth are warm-up and drain.
cut = len(steps) // 10
steady = steps[cut : len(steps) - cut] or steps
print(f"{len(steps)} steps logged, {len(steady)} in the steady middle")
print("| steps | count | p50 ms | p90 ms | mean ms |")
print("| --- | ---: | ---: | ---: | ---: |")
row("decode only", [s["us"] for s in steady if s["prefills"] == 0])
row("with prefills", [s["us"] for s in steady if s["prefills"] > 0])
for k in (1, 2, 3, 4):
    row(f"{k} prefill{'s' if k > 1 else ''}" if k < 4 else "4+ prefills",
        [s["us"] for s in steady if (s["prefills"] == k if k < 4 else s["prefills"] >= 4)])
for lo, hi in ((1, 64), (64, 256), (256, 1024), (1024, 1 << 30)):
    row(f"computed prefill rows {lo}..{hi if hi < 1 << 30 else ''}",
        [s["us"] for s in steady if s["prefills"] and lo <= s["prefill_tokens"] - s["cached_tokens"] < hi])
waits = [w for s in steady for w in s["first"]]
own = [s["us"] for s in steady for _ in s["first"]]
if waits:
    print()
    print("| first tokens | count | p50 ms | p90 ms | mean ms |")
    print("| --- | ---: | ---: | ---: | ---: |")
    row("waited before their step was sent", waits)
    row("their step's wall time", own)
    row("sum (≈ TTFT at the frontend)", [a + b for a, b in zip(waits, own)])
    print()
    print(f"share of steps with prefills: {sum(1 for s in steady if s['prefills']) / len(steady):.0%}; "
          f"mean decodes per step {statistics.mean(s['decode'] for s in steady):.1f}; "
          f"mean prefills per prefill step {statistics.mean([s['prefills'] for s in steady if s['prefills']] or [0]):.2f}")
