"""Table of `scripts/gpu-check.sh --ipc`: decode ms/step (ITL p50) of the mesh on CUDA IPC and on
gRPC against in-process at batch 1 and 64, the mesh's cost per MoE layer over in-process, and the
end-to-end rows (128-token prompts, 32 new tokens, concurrency 64, prompts included)."""

import json
import sys

MOE_LAYERS = 26  # DeepSeek-V2-Lite: 27 layers, the first dense.

rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]


def get(mode, c):
    for r in rows:
        if r.get("mode") == mode and r.get("concurrency") == c and r.get("succeeded"):
            return r
    return None


base = {c: get("in-process", c) for c in (1, 64, 256)}
print("| run | batch | ms/step (ITL p50) | tok/s | of in-process | µs per MoE layer over in-process |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    if r["mode"].endswith("e2e") or not r.get("succeeded"):
        continue
    c, ms = r["concurrency"], r["itl_ms"]["p50"]
    rel = over = ""
    b = base.get(c)
    if b and r["mode"] != "in-process":
        b = b["itl_ms"]["p50"]
        rel = f"{b / ms * 100:.0f}%"
        over = f"{(ms - b) / MOE_LAYERS * 1e3:.0f}"
    print(f"| {r['mode']} | {c} | {ms:.2f} | {c / ms * 1e3:.0f} | {rel} | {over} |")
print()
print("| run (128 / 32 unless it names another shape; prompts included) | concurrency | output tok/s | TTFT p50 ms | ITL p50 ms | requests ok |")
print("| --- | ---: | ---: | ---: | ---: | ---: |")
for r in rows:
    if r["mode"].endswith("e2e"):
        itl = (r.get("itl_ms") or {}).get("p50")
        ttft = (r.get("ttft_ms") or {}).get("p50")
        print(
            f"| {r['mode']} | {r.get('concurrency')} | {r.get('output_tokens_per_s', 0):.0f} | {'' if ttft is None else f'{ttft:.1f}'} "
            f"| {'' if itl is None else f'{itl:.2f}'} | {r.get('succeeded')} |"
        )
