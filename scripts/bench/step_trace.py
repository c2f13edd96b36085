#!/usr/bin/env python3
"""Summarises MOEMESH_STEP_TRACE=1 lines (JSON objects with a "trace" key, on stderr) from one
or more log files: for each file, the largest step trace (most points) and the last worker
trace, each transition's count and GPU / host milliseconds, largest first.
Usage: step_trace.py LOG [LOG ...]"""
import json
import sys

for path in sys.argv[1:]:
    best, worker = None, None
    for line in open(path, errors="replace"):
        line = line.strip()
        if not line.startswith("{") or '"trace"' not in line:
            continue
        try:
            t = json.loads(line)
        except ValueError:
            continue
        if t["trace"] == "step" and (best is None or t["points"] >= best["points"]):
            best = t
        elif t["trace"] == "worker":
            worker = t
    for t in (best, worker):
        if t is None:
            continue
        print(f"== {path}: {t['trace']}, {t['points']} points, GPU {t['gpu_ms']:.2f} ms, host {t['host_ms']:.2f} ms")
        for k, (n, g, h) in sorted(t["steps"].items(), key=lambda kv: -kv[1][1]):
            print(f"  {k:<28} {n:5d}  GPU {g:9.3f} ms  host {h:9.3f} ms")
