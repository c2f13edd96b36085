# HF transformers itself in f32 and bf16 on the GPU against the fixtures' f32 references.
#
# For each fixture (a folder with reference.safetensors, or a folder of such folders) it runs every
# prompt's full-sequence forward and greedy continuation, and reports:
# - the plain criterion `moemesh verify` once used: cosine of each prompt's flattened logits
#   >= 0.999 and greedy tokens equal up to the first reference top-1/top-2 margin < 0.1;
# - the reduced-precision figures `moemesh verify` now judges bf16 by: per position,
#   KL(p_ref || p_hf) of the next-token distribution and top-1 agreement, pooled over every
#   position of every prompt into mean / p99 / max KL and the top-1 agreement count. The formulas
#   are those of engine/src/divergence.rs, written once in docs/CORRECTNESS.md ("Reduced
#   precision: KL and top-1 against HF at the same precision"):
#     log p = x - logsumexp(x) in float64 from the float32 logits x;
#     KL = sum_i p_ref_i * (log p_ref_i - log p_test_i) (terms with p_ref_i = 0 add nothing);
#     top-1 = arg-max, the first index on equal values;
#     p99 = nearest rank, the ceil(99 n / 100)-th smallest;
#     flips = positions with KL > FLIP_KL (0.05 nats, divergence::FLIP_KL), rest_mean_kl = the
#     mean KL of the other positions (the figures `divergence::judge` bounds).
#   Each prompt's entry lists its positions' KLs ("kl"), from which moemesh counts the flips again
#   at its own threshold.
#
# With --figures-out DIR, the bf16 figures of each fixture go to DIR/<fixture>/hf_bf16_reference.json
# with their provenance, so DIR can be copied into tests/fixtures/ as it is; `moemesh verify` and
# the engine's reference tests read that file beside the fixture.
#
#   python3 scripts/bench/hf_bf16_reference.py tests/fixtures [--json OUT.json]    # gpu-check.sh
#   python3 scripts/bench/hf_bf16_reference.py --figures-out OUT FIXTURE_OR_ROOT...  # figures
#
# Needs torch, transformers and safetensors; --device cpu runs it without a GPU (for trying the
# script: the figures stored in the repo come from CUDA).
import argparse, datetime, json, os, sys, tempfile

import torch, transformers
from safetensors.torch import load_file, save_file

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

FIGURES_FILE = "hf_bf16_reference.json"
# A position whose KL is above this is a flip (a routing decision or the top token changed at a
# near-tie); divergence::FLIP_KL says why 0.05.
FLIP_KL = 0.05


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


def unpacked_int4(weights):
    """compressed-tensors' pack-quantized INT4 layers (weight_packed, weight_scale, weight_shape,
    weight_zero_point) dequantised as its `decompress` does: (q - zero) * scale in the scale's
    dtype, q and zero the stored nibbles minus 8 (low nibble first along the packed dimension: the
    input dimension for weights, the output dimension for zero points). Without compressed-tensors
    itself, so that the check runs where only torch and transformers are installed."""
    def nibbles(words, n):
        b = words.contiguous().view(torch.uint8)
        return torch.stack((b & 0xF, b >> 4), dim=-1).flatten(-2)[..., :n].to(torch.int32) - 8

    out = {}
    for k, v in weights.items():
        if not k.endswith(".weight_packed"):
            if not any(k.endswith(s) for s in (".weight_scale", ".weight_shape", ".weight_zero_point")):
                out[k] = v.float()
            continue
        stem = k[: -len(".weight_packed")]
        o, i = (int(d) for d in weights[stem + ".weight_shape"])
        scale = weights[stem + ".weight_scale"]
        q = nibbles(v, i)
        zp = weights.get(stem + ".weight_zero_point")
        groups = scale.shape[1]
        if zp is not None:
            z = nibbles(zp.t(), o).t()  # [out, groups]
            q = q - z.repeat_interleave(i // groups, 1)
        out[stem + ".weight"] = (q.to(scale.dtype) * scale.repeat_interleave(i // groups, 1)).float()
    return out


def unpacked_gptq_awq(weights, q):
    """GPTQ (`qweight [in/8, out]` packed along the input dimension, `qzeros [groups, out/8]`, v1
    zero points stored minus one unless `checkpoint_format` is "gptq_v2", `g_idx`) and AWQ GEMM
    (`qweight [in, out/8]` packed along the output dimension in the order 0 2 4 6 1 3 5 7, `qzeros`
    likewise) layers dequantised to `(q - z) * s` in float32 (exact), as the libraries' own
    unpacking gives them (tests/fixtures/make_gptq_awq.py checks that). Torch only."""
    gptq = q["quant_method"] == "gptq"
    minus_one = gptq and q.get("checkpoint_format", "gptq") == "gptq"
    awq_nibble = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])

    def nibbles(words):  # [..., w] int32 -> [..., 8w], nibble j of word c at 8c + j
        shifts = torch.arange(0, 32, 4, dtype=torch.int32)
        return ((words.unsqueeze(-1) >> shifts) & 0xF).flatten(-2)

    out = {}
    for k, v in weights.items():
        if not k.endswith(".qweight"):
            if not any(k.endswith(s) for s in (".qzeros", ".scales", ".g_idx")):
                out[k] = v.float()
            continue
        stem = k[: -len(".qweight")]
        scales = weights[stem + ".scales"].float()  # [groups, out]
        zeros = nibbles(weights[stem + ".qzeros"])  # [groups, out] (AWQ: interleaved)
        if gptq:
            w = nibbles(v.t()).t()  # [in, out]
            zeros = zeros + (1 if minus_one else 0)
            g_idx = weights[stem + ".g_idx"].long()
        else:
            cols = torch.arange(v.shape[1] * 8)
            order = (cols // 8) * 8 + awq_nibble[cols % 8]
            w = nibbles(v)[:, order]
            zeros = zeros[:, order]
            g_idx = torch.arange(w.shape[0]) // (w.shape[0] // scales.shape[0])
        deq = (w - zeros[g_idx]).float() * scales[g_idx]  # [in, out]
        out[stem + ".weight"] = deq.t().contiguous()
    return out


def cosine(a, b):
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()))


def divergence(want, got):
    """Per position of one prompt: (KL(p_want || p_got) in nats, top-1 equal), both [len, vocab]
    float32 logits (docs/CORRECTNESS.md)."""
    lp = want.double() - torch.logsumexp(want.double(), dim=-1, keepdim=True)
    lq = got.double() - torch.logsumexp(got.double(), dim=-1, keepdim=True)
    p = lp.exp()
    kl = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)
    top1 = torch.argmax(want, dim=-1) == torch.argmax(got, dim=-1)
    return [float(k) for k in kl], [bool(t) for t in top1]


def summary(kl, top1):
    n = len(kl)
    ranked = sorted(kl)
    rank = (99 * n + 99) // 100  # ceil(99 n / 100)
    rest = [k for k in kl if not k > FLIP_KL]
    return {"positions": n, "mean_kl": sum(kl) / n if n else 0.0,
            "p99_kl": ranked[rank - 1] if n else 0.0, "max_kl": ranked[-1] if n else 0.0,
            "top1_agree": sum(top1), "flip_kl": FLIP_KL, "flips": n - len(rest),
            "rest_mean_kl": sum(rest) / len(rest) if rest else 0.0}


def check(fixture, dtype, device):
    cfg = json.load(open(os.path.join(fixture, "config.json")))
    q = cfg.pop("quantization_config", None)
    weights = load_file(os.path.join(fixture, "model.safetensors"))
    if q and q.get("quant_method") == "compressed-tensors":
        weights = unpacked_int4(weights)
    elif q and q.get("quant_method") in ("gptq", "awq"):
        weights = unpacked_gptq_awq(weights, q)
    elif q:
        weights = dequantized(weights, q["weight_block_size"])
    else:
        weights = {k: v.float() for k, v in weights.items()}
    ref = load_file(os.path.join(fixture, "reference.safetensors"))
    meta = json.load(open(os.path.join(fixture, "reference.json")))
    with tempfile.TemporaryDirectory() as tmp:
        json.dump(cfg, open(os.path.join(tmp, "config.json"), "w"))
        save_file({k: v.contiguous() for k, v in weights.items()}, os.path.join(tmp, "model.safetensors"),
                  metadata={"format": "pt"})
        model = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).eval()
    flat, worst, equal, compared = 1.0, 1.0, 0, 0
    kl, top1, prompts = [], [], []
    with torch.no_grad():
        for p, prompt in enumerate(meta["prompts"]):
            x = ref[f"prompt{p}.input_ids"].to(device)[None]
            got = model(x, use_cache=False).logits[0].float().cpu()
            want = ref[f"prompt{p}.logits"].float()
            flat = min(flat, cosine(got, want))
            worst = min(worst, min(cosine(g, w) for g, w in zip(got, want)))
            k, t = divergence(want, got)
            kl, top1 = kl + k, top1 + t
            prompts.append({"index": p, **summary(k, t), "kl": k})
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
            "greedy_compared": compared, "plain_criterion": flat >= 0.999 and equal == compared,
            "summary": summary(kl, top1), "prompts": prompts,
            "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def fixture_dirs(paths):
    """Each path is a fixture (has reference.safetensors) or a folder of fixtures."""
    out = []
    for path in paths:
        if os.path.isfile(os.path.join(path, "reference.safetensors")):
            out.append(path)
        else:
            out += sorted(os.path.join(path, d) for d in os.listdir(path)
                          if os.path.isfile(os.path.join(path, d, "reference.safetensors")))
    if not out:
        sys.exit(f"no fixture with reference.safetensors under {paths}")
    return out


def figures(row, device):
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    return {
        "fixture": row["fixture"],
        "dtype": row["dtype"],
        "reference": "reference.safetensors prompt{i}.logits: HF transformers float32 on CPU (tests/fixtures/README.md)",
        "method": "full-sequence forward of every prompt (use_cache=False), logits cast to float32; "
                  "KL(p_ref || p_hf) and top-1 per position, pooled over all prompts; flips: positions "
                  f"with KL > {FLIP_KL}, rest_mean_kl: the mean of the others (docs/CORRECTNESS.md)",
        "provenance": {
            "transformers": transformers.__version__, "torch": torch.__version__, "device": name,
            "cuda": torch.version.cuda, "attn_implementation": row["attn_implementation"], "tf32": False,
            "date": datetime.date.today().isoformat(),
            "command": "python3 " + " ".join(sys.argv),
        },
        "summary": row["summary"],
        "prompts": row["prompts"],
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("paths", nargs="+", help="fixture folders, or folders of fixtures")
    ap.add_argument("--json", help="write every row (f32 and bf16) here")
    ap.add_argument("--figures-out", help="write <fixture>/" + FIGURES_FILE + " under this folder")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    fixtures = fixture_dirs(args.paths)
    rows = [check(f, dt, args.device) for f in fixtures for dt in (torch.float32, torch.bfloat16)]
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"HF transformers {transformers.__version__} / torch {torch.__version__} on {name} "
          f"against the f32 references")
    print(f"{'fixture':<32}{'dtype':>10}{'cos':>10}{'worst pos':>11}{'greedy equal':>14}{'plain':>7}"
          f"{'mean KL':>11}{'p99 KL':>11}{'max KL':>11}{'rest KL':>11}{'flips':>7}{'top-1':>10}")
    for r in rows:
        s = r["summary"]
        print(f"{r['fixture']:<32}{r['dtype']:>10}{r['min_cosine']:>10.6f}{r['worst_position_cosine']:>11.6f}"
              f"{str(r['greedy_equal']) + '/' + str(r['greedy_compared']):>14}"
              f"{'pass' if r['plain_criterion'] else 'FAIL':>7}"
              f"{s['mean_kl']:>11.3e}{s['p99_kl']:>11.3e}{s['max_kl']:>11.3e}"
              f"{s['rest_mean_kl']:>11.3e}{s['flips']:>7}"
              f"{str(s['top1_agree']) + '/' + str(s['positions']):>10}")
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)
    if args.figures_out:
        for r in rows:
            if r["dtype"] != "bfloat16":
                continue
            d = os.path.join(args.figures_out, r["fixture"])
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, FIGURES_FILE), "w") as f:
                json.dump(figures(r, args.device), f, indent=1)
                f.write("\n")
            print("wrote", os.path.join(d, FIGURES_FILE))


if __name__ == "__main__":
    main()
