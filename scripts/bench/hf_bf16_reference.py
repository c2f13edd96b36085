# HF transformers itself in bf16 (and f32) on the GPU against the fixtures' f32 references, scored
# with `moemesh verify`'s plain criterion: cosine of each prompt's flattened logits >= 0.999 and
# greedy tokens equal up to the first reference top-1/top-2 margin < 0.1. Shows what a bf16
# engine that is the reference can reach on these fixtures (routing near-ties, see
# services/tools/src/verify.rs). Run by scripts/gpu-check.sh --check where torch and
# transformers are installed:
#
#   python3 scripts/bench/hf_bf16_reference.py tests/fixtures [--json OUT.json]
import json, os, sys, tempfile

import torch, transformers
from safetensors.torch import load_file, save_file

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def dequantized(weights, block):
    """FP8 blocks times their scale, as the fixture's reference was made (in f32)."""
    out = {}
    for k, v in weights.items():
        if k.endswith("_scale_inv"):
            continue
        s = weights.get(k + "_scale_inv")
        if s is None:
            out[k] = v.float()
            continue
        o, i = v.shape
        full = s.float().repeat_interleave(block[0], 0)[:o].repeat_interleave(block[1], 1)[:, :i]
        out[k] = v.float() * full
    return out


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()))


def check(fixture, dtype):
    cfg = json.load(open(os.path.join(fixture, "config.json")))
    q = cfg.pop("quantization_config", None)
    weights = load_file(os.path.join(fixture, "model.safetensors"))
    weights = dequantized(weights, q["weight_block_size"]) if q else {k: v.float() for k, v in weights.items()}
    ref = load_file(os.path.join(fixture, "reference.safetensors"))
    meta = json.load(open(os.path.join(fixture, "reference.json")))
    with tempfile.TemporaryDirectory() as tmp:
        json.dump(cfg, open(os.path.join(tmp, "config.json"), "w"))
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).cuda().eval()
    flat, worst, equal, compared = 1.0, 1.0, 0, 0
    with torch.no_grad():
        for p, prompt in enumerate(meta["prompts"]):
            x = ref[f"prompt{p}.input_ids"].cuda()[None]
            got = model(x, use_cache=False).logits[0].float().cpu()
            want = ref[f"prompt{p}.logits"].float()
            flat = min(flat, cosine(got, want))
            worst = min(worst, min(cosine(g, w) for g, w in zip(got, want)))
            expected = ref[f"prompt{p}.greedy_tokens"].tolist()
            g = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=len(expected),
                               do_sample=False, pad_token_id=cfg["eos_token_id"], eos_token_id=None)
            new = g[0, x.shape[1]:].tolist()
            margins = prompt["greedy_top1_minus_top2_logit"]
            floor = 0.1 if dtype == torch.bfloat16 else 1e-3
            comparable = next((s for s, m in enumerate(margins) if m < floor), len(expected))
            n = 0
            while n < comparable and n < len(new) and new[n] == expected[n]:
                n += 1
            equal, compared = equal + n, compared + comparable
    return {"fixture": os.path.basename(fixture.rstrip("/")), "dtype": str(dtype).replace("torch.", ""),
            "min_cosine": flat, "worst_position_cosine": worst, "greedy_equal": equal,
            "greedy_compared": compared, "plain_criterion": flat >= 0.999 and equal == compared}


def main():
    root = sys.argv[1]
    out = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    fixtures = sorted(os.path.join(root, d) for d in os.listdir(root)
                      if os.path.isfile(os.path.join(root, d, "reference.safetensors")))
    rows = [check(f, dt) for f in fixtures for dt in (torch.float32, torch.bfloat16)]
    print(f"HF transformers {transformers.__version__} / torch {torch.__version__} on "
          f"{torch.cuda.get_device_name(0)} against the f32 references (plain criterion)")
    print(f"{'fixture':<24}{'dtype':>10}{'cos':>10}{'worst pos':>11}{'greedy equal':>14}{'plain':>7}")
    for r in rows:
        print(f"{r['fixture']:<24}{r['dtype']:>10}{r['min_cosine']:>10.6f}{r['worst_position_cosine']:>11.6f}"
              f"{str(r['greedy_equal']) + '/' + str(r['greedy_compared']):>14}"
              f"{'pass' if r['plain_criterion'] else 'FAIL':>7}")
    if out:
        json.dump(rows, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
