#!/usr/bin/env python3
"""Summary of an `ncu --csv --metrics gpu__time_duration.sum` run (scripts/gpu-check.sh --profile):
kernel count and GPU time per kernel name, largest first, and the total. Usage: ncu_summary.py CSV."""
import csv
import json
import sys
from collections import defaultdict

rows = []
with open(sys.argv[1], newline="") as f:
    lines = [l for l in f if l.startswith('"')]  # ncu prints its own log lines before the CSV
for r in csv.DictReader(lines):
    if r.get("Metric Name") == "gpu__time_duration.sum":
        rows.append((r["Kernel Name"], float(r["Metric Value"].replace(",", ""))))
by = defaultdict(lambda: [0, 0.0])
for name, ns in rows:
    short = name.split("(")[0].split("<")[0][:60]
    by[short][0] += 1
    by[short][1] += ns
total = sum(ns for _, ns in rows)
for line in open(sys.argv[1]):
    if line.startswith("{"):
        b = json.loads(line)
        print(f"bench (profiled run, one step slowed by ncu): ms/step p50 {b['itl_ms']['p50']:.2f}")
print(f"kernels: {len(rows)}, GPU time: {total / 1e3:.1f} µs (sum of kernel durations, no gaps)")
print(f"{'kernel':<62}{'count':>7}{'µs':>10}{'share':>8}")
for name, (n, ns) in sorted(by.items(), key=lambda kv: -kv[1][1])[:25]:
    print(f"{name:<62}{n:>7}{ns / 1e3:>10.1f}{ns / total * 100 if total else 0:>7.1f}%")
