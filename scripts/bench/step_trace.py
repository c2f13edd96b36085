#!/usr/bin/env python3
"""Summarises MOEMESH_STEP_TRACE=1 lines (JSON objects with a "trace" key, on stderr) from one
or more log files: for each file, the longest step trace and the longest worker trace (by GPU
time, i.e. the largest prefill; the first of each kind, a warm-up that loads the kernels, left
out), each transition's count and GPU / host milliseconds, largest first.
Usage: step_trace.py LOG [LOG ...]"""
import json
import sys

for path in sys.argv[1:]:
    best, worker = None, None
    seen = set()
    for line in open(path, errors="replace"):
        line = line.strip()
        if not line.startswith("{") or '"trace"' not in line:
            continue
        try:
            t = json.loads(line)
        except ValueError:
            continue
        if t["trace"] not in seen:
            seen.add(t["trace"])
            continue
        g = t.get("gpu_ms") or 0.0
        if t["trace"] == "step" and (best is None or g >= (best.get("gpu_ms") or 0.0)):
            best = t
        elif t["trace"] == "worker" and (worker is None or g >= (worker.get("gpu_ms") or 0.0)):
            worker = t
    for t in (best, worker):
        if t is None:
            continue
        print(f"== {path}: {t['trace']}, {t['points']} points, GPU {t.get('gpu_ms') or float('nan'):.2f} ms, host {t['host_ms']:.2f} ms")
        for k, (n, g, h) in sorted(t["steps"].items(), key=lambda kv: -kv[1][1]):
            print(f"  {k:<28} {n:5d}  GPU {g:9.3f} ms  host {h:9.3f} ms")
