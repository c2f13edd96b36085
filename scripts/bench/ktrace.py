#!/usr/bin/env python3
"""Read scripts/bench/ktrace.c's files (one per CUDA process of a run) and show one decode step.

    python3 scripts/bench/ktrace.py DIR [--kernels-min 100] [--timeline N] [--step K]

The process with the most graph launches of at least --kernels-min kernels is the stepping one
(the in-process bench, or the mesh's gate); each such launch is one step. Prints the steps'
spans (first kernel start to last kernel end) and the gaps between them, then for the step
with the median span (or --step K): every process's kernels inside it, summed by name
(count, total µs, mean µs, and the µs that no other kernel of the same process overlapped),
and with --timeline N the first N kernels of all processes in start order, with the time from
the step's start, the duration and the idle time before each on its own process (--driver adds
the driver API calls, e.g. when a worker's host launched each kernel).
"""
import argparse
import collections
import glob
import os
import statistics


def load(path):
    exe, rows = "?", []
    with open(path) as f:
        for line in f:
            if line.startswith("# exe "):
                exe = line[6:].strip()
                continue
            p = line.rstrip("\n").split("\t")
            if len(p) < 10:
                continue
            rows.append(
                dict(kind=p[0], start=int(p[1]), end=int(p[2]), stream=int(p[3]), corr=int(p[4]),
                     graph=int(p[5]), node=int(p[6]), grid=p[7], block=p[8], name=p[9]))
    return exe, rows


def steps_of(rows, kernels_min):
    groups = collections.defaultdict(list)
    for r in rows:
        if r["kind"] == "K" and r["graph"]:
            groups[r["corr"]].append(r)
    out = [sorted(g, key=lambda r: r["start"]) for g in groups.values() if len(g) >= kernels_min]
    return sorted(out, key=lambda g: g[0]["start"])


def short(name, width=44):
    return name if len(name) <= width else name[: width - 1] + "…"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--kernels-min", type=int, default=100)
    ap.add_argument("--timeline", type=int, default=0)
    ap.add_argument("--step", type=int, default=-1)
    ap.add_argument("--driver", action="store_true",
                    help="put the processes' driver API calls in the timeline (proc name + 'h')")
    a = ap.parse_args()

    procs = {}
    for path in sorted(glob.glob(os.path.join(a.dir, "ktrace.*.tsv"))):
        pid = path.rsplit(".", 2)[-2]
        exe, rows = load(path)
        if rows:
            procs[pid] = rows
    if not procs:
        raise SystemExit(f"no ktrace files with records in {a.dir}")
    stepping = max(procs, key=lambda p: len(steps_of(procs[p], a.kernels_min)))
    steps = steps_of(procs[stepping], a.kernels_min)
    if not steps:
        raise SystemExit(f"no graph launch of ≥ {a.kernels_min} kernels in any process")
    spans = [(g[-1]["end"] - g[0]["start"]) / 1e3 for g in steps]
    gaps = [(steps[i + 1][0]["start"] - steps[i][-1]["end"]) / 1e3 for i in range(len(steps) - 1)]
    print(f"stepping process {stepping}: {len(steps)} graph steps of ≥ {a.kernels_min} kernels; "
          f"kernels a step {statistics.median(len(g) for g in steps)}")
    print(f"  span µs: median {statistics.median(spans):.1f}, min {min(spans):.1f}, max {max(spans):.1f}")
    if gaps:
        print(f"  gap to the next step µs: median {statistics.median(gaps):.1f}, "
              f"min {min(gaps):.1f}, max {max(gaps):.1f}")
    if a.step >= 0:
        k = min(a.step, len(steps) - 1)
    else:
        order = sorted(range(len(steps)), key=lambda i: spans[i])
        k = order[len(order) // 2]
    step = steps[k]
    t0, t1 = step[0]["start"], step[-1]["end"]
    print(f"step {k}: span {(t1 - t0) / 1e3:.1f} µs")

    names = {stepping: "S"}
    for i, pid in enumerate(p for p in sorted(procs) if p != stepping):
        names[pid] = f"P{i + 1}"
    window = []
    for pid, rows in procs.items():
        ks = [r for r in rows if r["kind"] in "KMS" and r["end"] > t0 and r["start"] < t1]
        if pid == stepping:
            ks = [r for r in ks if r["corr"] == step[0]["corr"]] + [
                r for r in ks if r["corr"] != step[0]["corr"]]
        if not ks:
            continue
        ks.sort(key=lambda r: r["start"])
        busy = 0
        cursor = t0
        for r in ks:
            s, e = max(r["start"], cursor), min(r["end"], t1)
            if e > s:
                busy += e - s
                cursor = e
        print(f"\n{names[pid]} (pid {pid}): {len(ks)} records in the step, busy {busy / 1e3:.1f} µs "
              f"of {(t1 - t0) / 1e3:.1f}")
        by = collections.defaultdict(list)
        for r in ks:
            by[r["name"]].append((min(r["end"], t1) - max(r["start"], t0)) / 1e3)
        print(f"  {'kernel':44} {'n':>4} {'total µs':>9} {'mean':>7}")
        for name, ds in sorted(by.items(), key=lambda kv: -sum(kv[1])):
            print(f"  {short(name):44} {len(ds):4} {sum(ds):9.1f} {sum(ds) / len(ds):7.2f}")
        prev_end = None
        for r in ks:
            r["proc"] = names[pid]
            r["idle"] = (r["start"] - prev_end) / 1e3 if prev_end is not None else 0.0
            prev_end = max(prev_end or 0, r["end"])
            window.append(r)
        drv = [r for r in rows if r["kind"] == "D" and r["end"] > t0 and r["start"] < t1]
        if drv:
            calls = collections.Counter(r["name"] for r in drv)
            top = ", ".join(f"{n} {c}" for n, c in calls.most_common(6))
            print(f"  driver calls in the step: {len(drv)} ({top})")
            if a.driver:
                for r in drv:
                    window.append(dict(r, proc=names[pid] + "h", idle=0.0))

    if a.timeline:
        window.sort(key=lambda r: r["start"])
        print(f"\n{'t µs':>8} {'dur':>7} {'idle':>6} proc kernel (grid)")
        for r in window[: a.timeline]:
            print(f"{(r['start'] - t0) / 1e3:8.1f} {(r['end'] - r['start']) / 1e3:7.2f} "
                  f"{r['idle']:6.1f} {r['proc']:>4} {short(r['name'], 52)} ({r['grid']})")


if __name__ == "__main__":
    main()
