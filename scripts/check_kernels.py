#!/usr/bin/env python
"""Static check of every Triton kernel, no GPU needed.

Compiles each kernel ahead of time for sm_80, sm_90 and sm_100 at every configuration its launcher can
pick (the fixed table of rlplus_kernels/kernels/_config.py, every dtype, every constexpr flag
combination that can launch), then reads the cubin with the cuobjdump shipped in the triton
wheel: registers and stack (-res-usage), spill stores/loads (STL/LDL in -sass), the matrix instruction
(HGMMA: Hopper's wgmma; UTCHMMA: Blackwell's tcgen05; HMMA: mma.sync), and for the RLPLUS_LOGITS=tma
variants the TMA loads (UTMALDG).
Shared memory is Triton's dynamic allocation (metadata.shared).

Exit status: 1 on any compile error or any spill (or a half-precision tl.dot kernel without HGMMA on
sm_90 or without tcgen05 on sm_100, or a TMA variant without UTMALDG). sm_100 needs triton >= 3.3: on
an older one the default targets leave it out, saying so, and --targets with 100 is an error.

    python scripts/check_kernels.py [--targets 80,90,100] [--dtypes bf16,fp16,fp32] [--quick] [-j N] [--json out.json]

--quick keeps, instead of the full cross product, the flag combinations that bound register
pressure: every flag on (the heaviest), and for the forward also every flag off (the bias-free
LM head without entropy: another specialisation), with each alignment/source/tiling variant.
The RLPLUS_AUTOTUNE=1 candidates and the PIPELINE_TILES option are compiled where the launcher can
take them (sm_80/sm_90; autotune: fp16/bf16, aligned rows, D % 64 == 0).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.pop("TRITON_INTERPRET", None)  # compiling, not interpreting

TORCH_TO_TT = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}


def _cuobjdump():
    import triton

    import shutil

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else (shutil.which("cuobjdump") or path)


HEAD_FLAGS = ("HAS_ENTROPY", "HAS_OLD", "HAS_EXTERNAL", "HAS_BEHAVIOR", "HAS_KL")


def _cases(targets, dtypes, quick):
    """Yield (kernel, target, dtype, flags dict) for every launchable configuration."""
    from rlplus_kernels.kernels._config import (AUTOTUNE_CANDIDATES, FAMILIES, TARGET_FAMILIES, pipelining_supported,
                                                tensor_descriptor_class)

    # the per-token RL head runs in float32 whatever the input dtype; each flag also says whether
    # its optional pointer is passed
    head = [dict(zip(HEAD_FLAGS, bits)) for bits in itertools.product([True, False], repeat=len(HEAD_FLAGS))]
    if quick:
        head = [f for f in head if len(set(f.values())) == 1]
    for target, flags in itertools.product(targets, head):
        yield ("head", target, "fp32", flags)
    for target, dtype in itertools.product(targets, dtypes):
        tunable = TARGET_FAMILIES[target] in FAMILIES  # autotune candidates, PIPELINE_TILES sweeps
        precisions = ["ieee", "tf32"] if dtype == "fp32" else ["ieee"]
        for prec in precisions:
            # aligned rows (D % 16 == 0): the launcher takes BLOCK_D = 16 when the table's does
            # not divide D, so EVEN_D always holds (BD_DIV = 4: 64 -> 16); rows that are not
            # 16-element aligned take the table's unaligned config, EVEN_D either way
            dims = [dict(EVEN_D=True, ALIGNED=True, BD_DIV=k) for k in ([1] if dtype == "fp32" else [1, 4])]
            dims += [dict(EVEN_D=True, ALIGNED=False), dict(EVEN_D=False, ALIGNED=False)]
            # RLPLUS_LOGITS=tma: TMA descriptors on aligned rows (a D tail reads as 0), where this triton has them
            if target == 90 and tensor_descriptor_class() is not None:
                dims.append(dict(EVEN_D=True, ALIGNED=True, USE_TMA=True))
            # the PIPELINE_TILES launch option (a sweep candidate) on the table's tile, from triton 3.3
            if dtype != "fp32" and tunable and pipelining_supported():
                dims += [dict(d, PIPELINE_TILES=True) for d in dims if d["ALIGNED"] and d.get("BD_DIV", 1) == 1]
            fwd = [dict(HAS_BIAS=b, WITH_ENTROPY=e, **dd) for b, e, dd in itertools.product([True, False], [True, False], dims)]
            bwd = [
                dict(HAS_BIAS=b, HAS_GRAD_LOGP=gl, HAS_GRAD_ENT=ge, **dd)
                for b, gl, ge, dd in itertools.product([True, False], [True, False], [True, False], dims)
                if gl or ge  # no upstream gradient: the launcher returns zeros without a launch
            ]
            if quick:
                fwd = [f for f in fwd if f["HAS_BIAS"] == f["WITH_ENTROPY"] and f.get("BD_DIV", 1) == 1]
                bwd = [f for f in bwd if f["HAS_BIAS"] and f["HAS_GRAD_LOGP"] and f["HAS_GRAD_ENT"] and f.get("BD_DIV", 1) == 1]
            for flags in fwd:
                yield ("fwd", target, dtype, dict(flags, DOT_PRECISION=prec))
            for flags in bwd:
                yield ("bwd", target, dtype, dict(flags, DOT_PRECISION=prec))
        # RLPLUS_AUTOTUNE=1 (forward only): each candidate, where `autotune_applies`
        if dtype != "fp32" and tunable:
            for index, candidate in enumerate(AUTOTUNE_CANDIDATES):
                if candidate.PIPELINE_TILES and not pipelining_supported():
                    continue
                for b, e in [(True, True)] if quick else itertools.product([True, False], [True, False]):
                    yield ("fwd", target, dtype, dict(HAS_BIAS=b, WITH_ENTROPY=e, EVEN_D=True, ALIGNED=True,
                                                      AUTOTUNE=index, DOT_PRECISION="ieee"))
        # the cuBLAS logits source (RLPLUS_LOGITS=cublas): the same kernels read an fp32 product, no tl.dot;
        # the backward's bf16 without a bias reads it from the dl chunk itself ([V, N] layout)
        fwd = [dict(HAS_BIAS=b, WITH_ENTROPY=e) for b, e in itertools.product([True, False], [True, False])]
        bwd = [dict(HAS_BIAS=b, HAS_GRAD_LOGP=gl, HAS_GRAD_ENT=ge, PRODUCT_IN_DL=in_dl)
               for b, gl, ge, in_dl in itertools.product([True, False], [True, False], [True, False], [True, False])
               if (gl or ge) and (not in_dl or (dtype == "bf16" and not b))]
        if quick:  # the first of each product layout
            fwd = fwd[:1]
            bwd = [next(f for f in bwd if f["PRODUCT_IN_DL"] == in_dl) for in_dl in (False, True)
                   if any(f["PRODUCT_IN_DL"] == in_dl for f in bwd)]
        for kernel, flag_sets in (("fwd", fwd), ("bwd", bwd)):
            for flags in flag_sets:
                yield (kernel, target, dtype, dict(flags, FROM_PRODUCT=True, EVEN_D=True, DOT_PRECISION="ieee"))


def _signature(kernel, dtype, flags, cfg):
    """Types and constants the JIT would specialise on for a typical launch (D=4096 or odd D)."""
    aligned = flags.get("ALIGNED", True)
    ptr = TORCH_TO_TT[dtype]

    def descriptors():
        if flags.get("USE_TMA"):
            sig["hidden_desc"] = f"tensordesc<{dtype}[{cfg.BLOCK_N},{cfg.BLOCK_D}]>"
            sig["weight_desc"] = f"tensordesc<{dtype}[{cfg.BLOCK_V},{cfg.BLOCK_D}]>"
        else:
            c("hidden_desc", None), c("weight_desc", None)
    sig, const, div = {}, {}, []

    def p(name, ty, aligned=True):
        sig[name] = ty
        if aligned:
            div.append(name)

    def i(name, divisible=False):
        sig[name] = "i32"
        if divisible:
            div.append(name)

    def c(name, value):
        sig[name] = "constexpr"
        const[name] = value

    if kernel == "head":
        optional = dict(entropy_ptr="HAS_ENTROPY", old_ptr="HAS_OLD", external_ptr="HAS_EXTERNAL",
                        behavior_ptr="HAS_BEHAVIOR", ref_ptr="HAS_KL")
        for name in ("logp_ptr", "entropy_ptr", "advantages_ptr", "old_ptr", "external_ptr", "behavior_ptr",
                     "ref_ptr", "agg_weight_ptr", "coef_ptr", "weighted_loss_ptr", "dloss_dlogp_ptr", "stats_ptr"):
            if name in optional and not flags[optional[name]]:
                c(name, None)
            else:
                p(name, "*i1" if name == "external_ptr" else "*fp32")
        i("N")
        for name in HEAD_FLAGS:
            c(name, flags[name])
        c("BLOCK", cfg.BLOCK)
        return sig, const, div
    if kernel == "fwd":
        p("hidden_ptr", ptr), p("weight_ptr", ptr)
        p("bias_ptr", ptr) if flags["HAS_BIAS"] else c("bias_ptr", None)
        p("targets_ptr", "*i64")
        for name in ("part_m_ptr", "part_s_ptr", "part_t_ptr", "part_tz_ptr"):
            p(name, "*fp32")
        p("prod_ptr", "*fp32") if flags.get("FROM_PRODUCT") else c("prod_ptr", None)
        descriptors()
        i("N"), i("V"), i("D", aligned), i("V_PER_SPLIT", True), i("SPLITS")
        i("stride_hidden_n", aligned), c("stride_hidden_d", 1), i("stride_weight_v", aligned), c("stride_weight_d", 1)
        c("stride_bias_v", 1) if flags["HAS_BIAS"] else i("stride_bias_v")
        c("stride_targets_n", 1)
        i("stride_prod_n", True)
        sig["temperature"] = "fp32"
        i("ignore_index"), i("vocab_start")
        c("WITH_ENTROPY", flags["WITH_ENTROPY"])
    else:
        p("hidden_ptr", ptr), p("weight_ptr", ptr)
        p("bias_ptr", ptr) if flags["HAS_BIAS"] else c("bias_ptr", None)
        p("targets_ptr", "*i64"), p("lse_ptr", "*fp32"), p("ent_ptr", "*fp32")
        p("grad_logp_ptr", "*fp32") if flags["HAS_GRAD_LOGP"] else c("grad_logp_ptr", None)
        p("grad_ent_ptr", "*fp32") if flags["HAS_GRAD_ENT"] else c("grad_ent_ptr", None)
        p("dl_ptr", ptr)
        in_dl = flags.get("PRODUCT_IN_DL", False)
        if flags.get("FROM_PRODUCT"):
            p("prod_ptr", ptr if in_dl else "*fp32")
        else:
            c("prod_ptr", None)
        descriptors()
        i("N"), i("V"), i("D", aligned)
        i("stride_hidden_n", aligned), c("stride_hidden_d", 1), i("stride_weight_v", aligned), c("stride_weight_d", 1)
        c("stride_bias_v", 1) if flags["HAS_BIAS"] else i("stride_bias_v")
        c("stride_targets_n", 1)
        for name in ("stride_dl", "stride_prod"):  # [N, V] row-major, or [V, N] seen transposed
            if in_dl:
                c(f"{name}_n", 1), i(f"{name}_v", True)
            else:
                i(f"{name}_n", True), c(f"{name}_v", 1)
        sig["temperature"] = "fp32"
        i("ignore_index"), i("col_start")
        c("HAS_GRAD_LOGP", flags["HAS_GRAD_LOGP"]), c("HAS_GRAD_ENT", flags["HAS_GRAD_ENT"])
    c("DOT_PRECISION", flags["DOT_PRECISION"])
    c("HAS_BIAS", flags["HAS_BIAS"]), c("EVEN_D", flags["EVEN_D"]), c("FROM_PRODUCT", flags.get("FROM_PRODUCT", False))
    c("USE_TMA", flags.get("USE_TMA", False))
    c("BLOCK_N", cfg.BLOCK_N), c("BLOCK_V", cfg.BLOCK_V), c("BLOCK_D", cfg.BLOCK_D), c("GROUP_N", cfg.GROUP_N)
    c("PIPELINE_TILES", cfg.PIPELINE_TILES)
    return sig, const, div


def _divisibility_attrs(indices):
    """The 16-divisibility hints of these argument indices, in this triton's form (3.3 on: a dict;
    3.2: AttrsDescriptor.from_hints; 3.0 and 3.1: an AttrsDescriptor of sets), so that the default
    kernels can be checked for older tritons too."""
    try:
        from triton.backends.compiler import AttrsDescriptor
    except ImportError:
        try:
            from triton.compiler.compiler import AttrsDescriptor
        except ImportError:
            return {(i,): [["tt.divisibility", 16]] for i in indices}
        return AttrsDescriptor(divisible_by_16=set(indices))
    return AttrsDescriptor.from_hints({i: 16 for i in indices})


def compile_one(case):
    kernel, target, dtype, flags = case
    row = dict(kernel=kernel, target=f"sm_{target}", dtype=dtype, flags=_flag_str(flags), error=None)
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        row["triton"] = triton.__version__

        from rlplus_kernels.kernels import _config, rlplus_head
        from rlplus_kernels.kernels.linear_logprobs_bwd import _linear_logprobs_bwd_kernel
        from rlplus_kernels.kernels.linear_logprobs_fwd import _linear_logprobs_fwd_kernel

        fam = _config.TARGET_FAMILIES[target]
        if kernel == "head":  # launched with Triton's defaults: 4 warps, 3 stages
            from types import SimpleNamespace

            cfg = SimpleNamespace(BLOCK=rlplus_head.BLOCK, num_warps=4, num_stages=3)
        elif flags.get("FROM_PRODUCT"):
            cfg = _config.PRODUCT_CONFIG
        elif "AUTOTUNE" in flags:
            cfg = _config.AUTOTUNE_CANDIDATES[flags["AUTOTUNE"]]
        else:
            cfg = _config.table_config(fam, dtype == "fp32", aligned=flags.get("ALIGNED", True), kernel=kernel)
        if flags.get("PIPELINE_TILES"):
            cfg = replace(cfg, PIPELINE_TILES=True)
        if flags.get("BD_DIV", 1) > 1:
            cfg = replace(cfg, BLOCK_D=cfg.BLOCK_D // flags["BD_DIV"])
        if os.environ.get("CHECK_CFG"):  # sweep_configs.py --compile: candidate configs
            cfg = replace(cfg, **json.loads(os.environ["CHECK_CFG"]))
        jit = {"fwd": _linear_logprobs_fwd_kernel.fn, "bwd": _linear_logprobs_bwd_kernel.fn,
               "head": rlplus_head._rlplus_head_fwd_kernel}[kernel]
        sig, const, div = _signature(kernel, dtype, flags, cfg)
        assert sorted(sig) == sorted(jit.arg_names), (sorted(sig), sorted(jit.arg_names))
        sig = {n: sig[n] for n in jit.arg_names}
        attrs = _divisibility_attrs([jit.arg_names.index(n) for n in div])
        src = triton.compiler.ASTSource(jit, sig, const, attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", target, 32),
                            options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                         **_config.LAUNCH_OPTIONS))
        shape = f"{cfg.BLOCK}" if kernel == "head" else f"{cfg.BLOCK_N}x{cfg.BLOCK_V}x{cfg.BLOCK_D}"
        row.update(config=f"{shape} w{cfg.num_warps} s{cfg.num_stages}",
                   shared=int(ck.metadata.shared))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "k.cubin")
            with open(path, "wb") as f:
                f.write(ck.asm["cubin"])
            res = subprocess.run([_cuobjdump(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([_cuobjdump(), "-sass", path], capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)", res)
        row.update(
            regs=int(m.group(1)), stack=int(m.group(2)),
            spill_st=len(re.findall(r"\bSTL(\.\w+)*\b", sass)), spill_ld=len(re.findall(r"\bLDL(\.\w+)*\b", sass)),
            hgmma="HGMMA" in sass, tcgen05=bool(re.search(r"\bUTC\w*MMA", sass)),
            hmma=bool(re.search(r"\bHMMA", sass)), tma="UTMALDG" in sass,
        )
    except Exception as exc:  # noqa: BLE001 - reported in the table, turns the exit status to 1
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
    return row


def _flag_str(flags):
    parts = [k for k, v in flags.items() if v is True and k != "ALIGNED"] + ([] if flags.get("ALIGNED", True) else ["unaligned"])
    prec = flags.get("DOT_PRECISION")
    tuned = [f"autotune{flags['AUTOTUNE']}"] if "AUTOTUNE" in flags else []
    return ",".join(parts + tuned + ([prec] if prec and prec != "ieee" else [])) or "-"


TARGETS = (80, 90, 100)
# Triton aborts (a C++ assertion, "computeCapability not supported") on a target older than its support for it
MIN_TRITON = {100: (3, 3)}


def triton_version() -> tuple:
    import triton

    from rlplus_kernels._environment import major_minor

    return major_minor(triton.__version__)


def supported_targets(targets) -> tuple[list, list]:
    """(the targets this triton compiles for, those it cannot)."""
    too_new = [t for t in targets if triton_version() < MIN_TRITON.get(t, (0, 0))]
    return [t for t in targets if t not in too_new], too_new


def main(argv=None):
    import triton

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default=None, help="default: 80,90,100, less those this triton cannot compile for")
    ap.add_argument("--dtypes", default="bf16,fp16,fp32")
    ap.add_argument("--quick", action="store_true", help="fewer flag combinations (see module docstring)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    asked = TARGETS if args.targets is None else [int(t) for t in args.targets.split(",")]
    targets, too_new = supported_targets(asked)
    for target in too_new:
        note = f"sm_{target}: needs triton >= {'.'.join(map(str, MIN_TRITON[target]))}, this is {triton.__version__}"
        if args.targets is not None:
            ap.error(f"--targets {note}")
        print(f"skipped {note}")
    cases = list(_cases(targets, args.dtypes.split(","), args.quick))
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(compile_one, cases))

    hdr = f"{'kernel':6} {'target':6} {'dtype':5} {'config':20} {'flags':44} {'regs':>4} {'smem':>6} {'stl':>4} {'ldl':>4} {'stack':>5} {'mma':6}"
    print(hdr)
    print("-" * len(hdr))
    bad = 0
    for r in rows:
        if r["error"]:
            bad += 1
            print(f"{r['kernel']:6} {r['target']:6} {r['dtype']:5} {'':20} {r['flags']:44} ERROR {r['error']}")
            continue
        mma = "HGMMA" if r["hgmma"] else "TCGEN5" if r["tcgen05"] else "HMMA" if r["hmma"] else "FFMA"
        tensor_core_dot = r["dtype"] != "fp32" and "FROM_PRODUCT" not in r["flags"] and r["kernel"] != "head"
        flag = ""
        if r["spill_st"] or r["spill_ld"]:
            flag, bad = "  <-- SPILL", bad + 1
        elif r["target"] == "sm_90" and tensor_core_dot and not r["hgmma"]:
            flag, bad = "  <-- no HGMMA", bad + 1
        elif r["target"] == "sm_100" and tensor_core_dot and not r["tcgen05"]:
            flag, bad = "  <-- no tcgen05 (UTCHMMA)", bad + 1
        elif "USE_TMA" in r["flags"] and not r["tma"]:
            flag, bad = "  <-- no TMA load (UTMALDG)", bad + 1
        print(f"{r['kernel']:6} {r['target']:6} {r['dtype']:5} {r['config']:20} {r['flags']:44} {r['regs']:>4} "
              f"{r['shared']:>6} {r['spill_st']:>4} {r['spill_ld']:>4} {r['stack']:>5} {mma:6}{flag}")
    print(f"\n{len(rows)} kernels compiled with triton {triton.__version__}, {bad} problem(s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
