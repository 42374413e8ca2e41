#!/usr/bin/env python
"""Launch-config sweep for the lead's GPU sessions (not part of the test suite).

    python benchmarks/sweep_configs.py --time [--shape 16384,4096,151936] [--logits tma]   # CUDA: ms per config
    python benchmarks/sweep_configs.py --compile                            # no GPU: regs/spills

--time runs the forward launcher and the hidden-only backward (dlogits kernel + one cuBLAS
GEMM, the GEMM being the same for every config) with each candidate config as an override, for
the logits source named by --logits (fused or tma; kernels/_config.py), and checks that each
config computes what the table config does ("fwd_rel": lse and sum p*z, "bwd_rel": grad_hidden,
max relative differences; "same_result" false marks a config that computes something else).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

HALF = [
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=8),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4, GROUP_N=8),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=5, GROUP_N=8),  # tma: no spill
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=8, PIPELINE_TILES=True),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=4, GROUP_N=8, PIPELINE_TILES=True),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=16),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=4),
    dict(BLOCK_N=128, BLOCK_V=128, BLOCK_D=128, num_warps=8, num_stages=2, GROUP_N=8),
    dict(BLOCK_N=128, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=8),
    dict(BLOCK_N=256, BLOCK_V=128, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=8),
    dict(BLOCK_N=64, BLOCK_V=256, BLOCK_D=64, num_warps=8, num_stages=3, GROUP_N=8),
    dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64, num_warps=4, num_stages=4, GROUP_N=8),
    dict(BLOCK_N=128, BLOCK_V=64, BLOCK_D=64, num_warps=8, num_stages=4, GROUP_N=8),  # sm_100's forward
]
UNALIGNED = [
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=32, num_warps=8, num_stages=1),
    dict(BLOCK_N=32, BLOCK_V=64, BLOCK_D=32, num_warps=4, num_stages=1),
    dict(BLOCK_N=64, BLOCK_V=64, BLOCK_D=16, num_warps=8, num_stages=1),
    dict(BLOCK_N=32, BLOCK_V=32, BLOCK_D=32, num_warps=4, num_stages=1),
]


def do_time(shape, rep, logits):
    import torch
    import triton

    from rlplus_kernels.kernels import linear_logprobs_backward, linear_logprobs_forward

    n, d, v = shape
    torch.manual_seed(0)
    h = (torch.randn(n, d, device="cuda") / d**0.25).bfloat16()
    w = (torch.randn(v, d, device="cuda") / d**0.25).bfloat16()
    t = torch.randint(0, v, (n,), device="cuda")
    gl, ge = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    lse, _, ent = linear_logprobs_forward(h, w, None, t, temperature=1.0, ignore_index=-100, with_entropy=True,
                                          logits=logits)

    def grad_hidden(cfg=None):
        return linear_logprobs_backward(h, w, None, t, lse, ent, gl, ge, temperature=1.0, ignore_index=-100,
                                        needs_grad=(True, False, False), config=cfg, logits=logits)[0]

    def rel(got, ref):
        return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()

    gh = grad_hidden()
    gemm = triton.testing.do_bench(lambda: h @ w.T, rep=rep)
    print(f"gemm logits {gemm:.2f} ms ({2 * n * v * d / gemm / 1e9:.0f} TFLOP/s)", flush=True)
    try:
        f32 = triton.testing.do_bench(lambda: torch.mm(h, w[:16384].T, out_dtype=torch.float32), rep=rep)
        b16 = triton.testing.do_bench(lambda: torch.mm(h, w[:16384].T), rep=rep)
        print(f"mm out_dtype=float32 [{n}x16384] {f32:.2f} ms vs bf16 out {b16:.2f} ms", flush=True)
    except Exception as exc:  # noqa: BLE001
        print("mm out_dtype unavailable:", exc)
    rows = []
    for cfg in HALF:
        row = dict(cfg=cfg)
        try:
            lse_c, _, ent_c = linear_logprobs_forward(h, w, None, t, temperature=1.0, ignore_index=-100,
                                                      with_entropy=True, config=cfg, logits=logits)
            row["fwd_rel"] = max(rel(lse_c, lse), rel(ent_c, ent))
            row["bwd_rel"] = rel(grad_hidden(cfg), gh)
            # fp32 sums in another order differ by ~1e-6; bf16 grad_hidden elements by up to one ulp (2^-7)
            row["same_result"] = row["fwd_rel"] < 1e-4 and row["bwd_rel"] < 1e-2
            row["fwd"] = triton.testing.do_bench(lambda: linear_logprobs_forward(
                h, w, None, t, temperature=1.0, ignore_index=-100, with_entropy=True, config=cfg,
                logits=logits), rep=rep)
            row["bwd_h"] = triton.testing.do_bench(lambda: grad_hidden(cfg), rep=rep)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def do_compile():
    from concurrent.futures import ProcessPoolExecutor

    import check_kernels as ck

    cases = []
    for cfg in UNALIGNED:
        for kernel in ("fwd", "bwd"):
            for target in (80, 90):
                for dtype in ("bf16", "fp32"):
                    for prec in (["ieee", "tf32"] if dtype == "fp32" else ["ieee"]):
                        flags = dict(HAS_BIAS=True, EVEN_D=False, ALIGNED=False, DOT_PRECISION=prec)
                        flags.update(dict(WITH_ENTROPY=True) if kernel == "fwd" else dict(HAS_GRAD_LOGP=True, HAS_GRAD_ENT=True))
                        cases.append((cfg, (kernel, target, dtype, flags)))
    with ProcessPoolExecutor(os.cpu_count()) as pool:
        for cfg, r in zip((c[0] for c in cases), pool.map(_compile, cases)):
            print(cfg, r["kernel"], r["target"], r["dtype"], r["flags"], "regs", r.get("regs"),
                  "stl", r.get("spill_st"), "ldl", r.get("spill_ld"), r["error"] or "", flush=True)


def _compile(case):
    import check_kernels as ck

    os.environ["CHECK_CFG"] = json.dumps(case[0])
    return ck.compile_one(case[1])


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--time", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--shape", default="16384,4096,151936")
    ap.add_argument("--rep", type=int, default=400)
    ap.add_argument("--logits", default="fused", choices=["fused", "tma"])
    a = ap.parse_args()
    if a.compile:
        do_compile()
    if a.time:
        do_time(tuple(int(x) for x in a.shape.split(",")), a.rep, a.logits)
