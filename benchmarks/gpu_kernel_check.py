#!/usr/bin/env python
"""GPU check of the Triton linear-logprobs kernels: correctness, speed vs bare GEMMs, memory.

Self-contained (torch >= 2.4, triton >= 3.0, Python >= 3.10); run from a checkout on CUDA:

    python benchmarks/gpu_kernel_check.py [--json out.json] [--quick] [--no-naive] [--logits fused,tma,cublas] [--profile]
                                          [--config '{"PIPELINE_TILES": true}']

(a) forward/backward against a higher-precision torch computation of CONTRACT.md at several
    shapes (float64 for small ones; float32, TF32 off, in token chunks, on the same
    bf16-rounded inputs for N=16384, D=4096, V=151936);
(b) triton.testing.do_bench medians (p20/p80) of our fwd+bwd vs the three bare bf16 GEMMs
    (logits = h @ W^T, grad_hidden = dl @ W, grad_weight = dl^T @ h), and their ratio;
(c) peak extra memory (torch.cuda.max_memory_allocated above the inputs) of ours vs a naive
    full-logits implementation; one summary table at the end and JSON with --json.
--logits runs (a)-(c) for each listed logits source (kernels/_config.py: "fused" tl.dot kernels,
"tma" the same fed by TMA descriptors on sm_90, "cublas" fp32 cuBLAS products read by the same
kernels), each against GEMMs timed in the same run. --profile adds (d) the device time of each
kernel in one fwd+bwd (torch.profiler): where the time beyond the bare GEMMs goes. --config
overrides the launch table (kernels/_config.py KernelConfig fields) for every check and timing (in --loss mode
the table rlplus_loss reads, `override_launch_table`).
--dry-run runs the same code on the CPU (tests/test_gpu_scripts.py): see `dry_run_stand_ins`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

IGN = -100
DEVICE = "cuda"  # "cpu" in a dry run
DRY_RUN_MAX_SHAPE = (16, 48, 130)  # N, D, V: one token block and three vocabulary tiles under the interpreter


def dry_run_stand_ins():
    """--dry-run: every step on CPU tensors, the kernels under TRITON_INTERPRET=1, each shape cut to at most
    DRY_RUN_MAX_SHAPE, torch.cuda's synchronisation and memory counters as no-ops (memory figures 0) and `bench`
    timing a few wall-clock calls. The checks compare as on the GPU; the timings and memory figures mean
    nothing. It proves the script runs through before a GPU's minutes are spent on it."""
    global DEVICE
    DEVICE = "cpu"
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    for name in ("synchronize", "empty_cache", "reset_peak_memory_stats"):
        setattr(torch.cuda, name, lambda *args, **kwargs: None)
    torch.cuda.memory_allocated = torch.cuda.max_memory_allocated = lambda *args, **kwargs: 0
    torch.cuda.get_device_name = lambda *args, **kwargs: "dry run: CPU, TRITON_INTERPRET=1"


def scaled(n, d, v):
    """(n, d, v), or in a dry run each cut to DRY_RUN_MAX_SHAPE."""
    return (n, d, v) if DEVICE == "cuda" else tuple(min(x, top) for x, top in zip((n, d, v), DRY_RUN_MAX_SHAPE))


def env_info():
    import triton

    return dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), cuda=torch.version.cuda,
    )


# ----------------------------------------------------------------------------- reference
def reference(h, w, b, t, gl, ge, temperature, ref_dtype, chunk=1024, with_grads=True):
    """lse, target_logit, entropy and the three gradients (None without with_grads), token-chunked,
    in ref_dtype."""
    n, d = h.shape
    w_r = w.to(ref_dtype)
    b_r = b.to(ref_dtype) if b is not None else None
    lse = torch.empty(n, dtype=ref_dtype, device=h.device)
    tl = torch.empty_like(lse)
    ent = torch.empty_like(lse)
    gh = torch.empty(n, d, dtype=ref_dtype, device=h.device) if with_grads else None
    gw = torch.zeros_like(w_r) if with_grads else None
    gb = torch.zeros(w.shape[0], dtype=ref_dtype, device=h.device) if with_grads and b is not None else None
    for n0 in range(0, n, chunk):
        n1 = min(n, n0 + chunk)
        hc = h[n0:n1].to(ref_dtype)
        z = hc @ w_r.T
        if b_r is not None:
            z += b_r
        z /= temperature
        lse_c = z.logsumexp(-1)
        p = torch.exp(z - lse_c[:, None])
        ent_c = lse_c - (p * z).sum(-1)
        tc = t[n0:n1]
        valid = tc != IGN
        tl_c = torch.where(valid, z.gather(1, tc.clamp(min=0)[:, None])[:, 0], 0.0)
        lse[n0:n1], tl[n0:n1], ent[n0:n1] = lse_c, tl_c, ent_c
        if not with_grads:
            continue
        # dz = g_logp (onehot - p) + g_ent (-p (z - lse + H))
        dz = -p * (gl[n0:n1].to(ref_dtype)[:, None] + ge[n0:n1].to(ref_dtype)[:, None] * (z - lse_c[:, None] + ent_c[:, None]))
        dz.scatter_add_(1, tc.clamp(min=0)[:, None], gl[n0:n1].to(ref_dtype)[:, None])
        dz = torch.where(valid[:, None], dz, 0.0) / temperature
        del z, p
        gh[n0:n1] = dz @ w_r
        gw += dz.T @ hc
        if b_r is not None:
            gb += dz.sum(0)
        del dz
    return dict(lse=lse, target_logit=tl, entropy=ent, grad_hidden=gh, grad_weight=gw, grad_bias=gb)


def run_label(schedule, logits, config) -> str:
    """What names a run in the checks, timings, errors and verdicts: [schedule/]logits source [config]."""
    label = logits if schedule is None else f"{schedule}/{logits}"
    return label + "".join(f" {key}={value}" for key, value in (config or {}).items())


def rel_err(got, ref):
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item(), (got - ref).abs().max().item()


TOL = {  # relative norm error
    torch.float32: dict(fwd=1e-5, bwd=1e-4),
    torch.float16: dict(fwd=1e-5, bwd=5e-3),
    torch.bfloat16: dict(fwd=1e-5, bwd=2e-2),
}


def check_shape(n, d, v, dtype, bias, upstream=1.0, logits="fused", config=None, temperature=0.8, seed=0):
    """Relative errors of every output against a float32/float64 reference; ``upstream`` scales the
    gradients of logprob and entropy (2^-14: a token-mean loss over 16k tokens)."""
    from rlplus_kernels.kernels import linear_logprobs_backward, linear_logprobs_forward
    from rlplus_kernels.kernels._config import kernel_operand, logits_source, uses_descriptors

    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h = (torch.randn(n, d, device=DEVICE, generator=g) / d**0.25).to(dtype)
    w = (torch.randn(v, d, device=DEVICE, generator=g) / d**0.25).to(dtype)
    b = torch.randn(v, device=DEVICE, generator=g).to(dtype) if bias else None
    t = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    t[::7] = IGN
    gl = torch.randn(n, device=DEVICE, generator=g) * upstream
    ge = torch.randn(n, device=DEVICE, generator=g) * upstream
    big = n * v * d > 2**36
    ref_dtype = torch.float32 if big else torch.float64
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref = reference(h, w, b, t, gl, ge, temperature, ref_dtype, chunk=1024 if big else 4096)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    # poison: outputs are fresh tensors of the launcher; check them finite and complete
    lse, tl, ent = linear_logprobs_forward(h, w, b, t, temperature=temperature, ignore_index=IGN, with_entropy=True,
                                           logits=logits, config=config)
    gh, gw, gb = linear_logprobs_backward(h, w, b, t, lse, ent, gl, ge, temperature=temperature,
                                          ignore_index=IGN, needs_grad=(True, True, bias), logits=logits,
                                          config=config)
    torch.cuda.synchronize()
    out = dict(lse=lse, target_logit=tl, entropy=ent, grad_hidden=gh, grad_weight=gw, grad_bias=gb)
    # whether "tma" fetched these operands by descriptors (unaligned rows take the pointer path)
    descriptors = uses_descriptors(logits_source(logits), h.device, kernel_operand(h), kernel_operand(w))
    rows = []
    for k, got in out.items():
        if ref[k] is None:
            continue
        r, m = rel_err(got, ref[k])
        kind = "fwd" if k in ("lse", "target_logit", "entropy") else "bwd"
        ok = bool(torch.isfinite(got).all()) and r <= TOL[dtype][kind]
        rows.append(dict(shape=f"{n}x{d}x{v}", dtype=str(dtype).replace("torch.", ""), bias=bias, upstream=upstream,
                         logits=run_label(None, logits, config), descriptors=descriptors, out=k, rel_err=r,
                         max_abs=m, tol=TOL[dtype][kind], ok=ok, ref=str(ref_dtype).replace("torch.", "")))
    del ref, out, gh, gw
    torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- timing
MIN_SAMPLES = 10


def bench(fn, rep=200, grad_to_none=None):
    """Quantiles (ms) of fn over at least `rep` ms and MIN_SAMPLES calls, and how many it took: do_bench repeats
    a call rep / its estimate times (the estimate includes its L2 flush), which is once for a 160 ms fwd+bwd at
    the bar's shape, where p20 = p50 = p80 would say nothing."""
    from bench_loss import cuda_call_ms, do_bench_ms, quantiles_ms

    fn()
    torch.cuda.synchronize()
    if DEVICE == "cpu":  # a dry run
        samples = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - start))
    else:
        samples = do_bench_ms(fn, cuda_call_ms(fn), min_samples=MIN_SAMPLES, min_ms=rep, warmup_ms=25,
                              grad_to_none=grad_to_none)
    q = quantiles_ms(samples)
    return dict(p50=q["median_ms"], p20=q["p20_ms"], p80=q["p80_ms"], samples=q["repeats"])


def kernel_breakdown(fn, top=12):
    """[{kernel, calls, ms}] of one call of fn, by device time, largest first (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    # device-side events only: a leaf CPU op (aten::mm) also carries its kernel's time as its own
    rows = [dict(kernel=e.key[:100], calls=e.count, ms=e.self_device_time_total / 1e3)
            for e in prof.key_averages()
            if e.device_type != torch.autograd.DeviceType.CPU and e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r["ms"])[:top]


def bare_gemms(h, w, rep, res):
    """Times the three bare GEMMs of a naive implementation in the input dtype, as cuBLAS runs them
    (logits = h @ W^T, grad_hidden = dl @ W, grad_weight = dl^T @ h), into res; returns their sum (ms)."""
    dl = torch.randn(h.shape[0], w.shape[0], device=DEVICE).to(h.dtype)
    res["gemm_logits"] = bench(lambda: h @ w.T, rep)
    res["gemm_grad_hidden"] = bench(lambda: dl @ w, rep)
    res["gemm_grad_weight"] = bench(lambda: dl.T @ h, rep)
    del dl
    torch.cuda.empty_cache()
    res["gemm_sum_ms"] = res["gemm_logits"]["p50"] + res["gemm_grad_hidden"]["p50"] + res["gemm_grad_weight"]["p50"]
    return res["gemm_sum_ms"]


def fwd_bwd_against_gemms(fwd_bwd, h, w, rep, profile, res):
    """Times fwd_bwd (and, with profile, its kernels) and the bare GEMMs of the same shapes, into res."""
    res["ours_fwd_bwd"] = bench(fwd_bwd, rep)
    if profile:
        try:  # never yet run on CUDA: a profiler failure must not cost the timing
            res["kernels"] = kernel_breakdown(fwd_bwd)
        except Exception as e:  # noqa: BLE001  recorded with the timing
            res["kernels_error"] = repr(e)
    gemms = bare_gemms(h, w, rep, res)
    res["ratio_fwd_bwd_over_gemms"] = res["ours_fwd_bwd"]["p50"] / gemms
    res["tflops_fwd_bwd"] = 6 * h.shape[0] * w.shape[0] * h.shape[1] / res["ours_fwd_bwd"]["p50"] / 1e9


def peak_extra_mb(fn):
    """MiB that one call of fn allocated at its peak above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


NAIVE_OUT_OF_MEMORY = "out of memory"


def naive_peak_extra_mb(h, w, t, gl, ge):
    """peak_extra_mb of the naive forward+backward (its gradients of h and w included), or NAIVE_OUT_OF_MEMORY."""
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()

    def fwd_bwd():
        logp, ent = naive(hr, wr, None, t, 1.0)
        ((logp * gl).sum() + (ent * ge).sum()).backward()

    try:
        return peak_extra_mb(fwd_bwd)
    except torch.cuda.OutOfMemoryError:
        return NAIVE_OUT_OF_MEMORY
    finally:
        del hr, wr
        torch.cuda.empty_cache()


def record_memory(res, peak_mb, h, w, naive_mb=None):
    """The issue's memory figure: MiB beyond the inputs and the gradients of h and w (which every
    implementation returns), ours and naive's, in MiB (bytes / 2^20) throughout. `naive_mb` None: not measured;
    NAIVE_OUT_OF_MEMORY is recorded as such, with no fraction. Naive's gradients come after its peak (mid-backward), so
    taking them off its peak too understates naive by grads_mb: the fraction errs against us, by 3 % of itself at
    the bar's shape."""
    grads_mb = (h.numel() + w.numel()) * h.element_size() / 2**20
    res.update(ours_peak_extra_mb=peak_mb, grads_mb=grads_mb, ours_beyond_grads_mb=peak_mb - grads_mb)
    if naive_mb == NAIVE_OUT_OF_MEMORY:
        res.update(naive_peak_extra_mb=None, naive_error=naive_mb)
    elif naive_mb is not None:
        res.update(naive_peak_extra_mb=naive_mb, naive_beyond_grads_mb=naive_mb - grads_mb,
                   memory_fraction_of_naive=(peak_mb - grads_mb) / (naive_mb - grads_mb))


# ----------------------------------------------------------------------------- the loss, end to end
ENTROPY_COEF = 0.01


def loss_inputs(n, d, v, dtype, seed=0):
    """Hidden, weight, targets (every 7th ignored), advantages (mean 1: a loss without cancellation, so its
    relative error means something) and external tokens (every 5th) of a batch."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    h = (torch.randn(n, d, device=DEVICE, generator=g) / d**0.25).to(dtype)
    w = (torch.randn(v, d, device=DEVICE, generator=g) / d**0.25).to(dtype)
    t = torch.randint(0, v, (n,), device=DEVICE, generator=g)
    t[::7] = IGN
    adv = torch.randn(n, device=DEVICE, generator=g) + 1.0
    return h, w, t, adv, torch.arange(n, device=DEVICE) % 5 == 0


def loss_step(h, w, t, adv, old=None, external=None):
    """rlplus_loss (triton backend, token-mean, entropy bonus) and its backward: a user's step."""
    from rlplus_kernels import rlplus_loss

    out = rlplus_loss(h, w, t, adv, old, external_mask=external, entropy_coef=ENTROPY_COEF, return_entropy=True,
                      backend="triton")
    out.loss.backward()
    return out


def with_schedule(schedule, logits):
    os.environ["RLPLUS_SCHEDULE"] = schedule
    os.environ["RLPLUS_LOGITS"] = logits


def override_launch_table(config):
    """--config in --loss mode: rlplus_loss takes no launch config, so `config` is laid over the table's
    half-precision entries of aligned rows (kernels/_config.py table_config), the ones a new default would
    change: the bar's bf16 timings and checks take it, the float32 check keeps its own table."""
    from rlplus_kernels.kernels import _config

    original = _config.table_config

    def table_config(family, is_fp32, aligned=True, kernel="fwd"):
        cfg = original(family, is_fp32, aligned, kernel)
        return cfg if is_fp32 or not aligned else _config._with_override(cfg, config)

    _config.table_config = table_config


def require_single_pass(schedule, h):
    """A single-pass run that silently took the two-pass schedule (no fp32 cuBLAS products: torch < 2.8)
    would be timed under the wrong label: refused instead."""
    from rlplus_kernels.backends import single_pass_applies

    if schedule == "single-pass" and not single_pass_applies("triton", None, h, (True, True, False)):
        raise RuntimeError(f"RLPLUS_SCHEDULE=single-pass does not apply to {h.dtype} here (torch {torch.__version__}); "
                           "rlplus_loss would run the two-pass schedule")


def loss_reference(n, d, v, dtype):
    """The reference of `check_loss`'s batch: log-probs and entropies (float32, TF32 off, or float64), old
    log-probs 0.3 nats from them (ratios on both sides of the clip), the loss and d loss / d (log p, H) from
    the package's reference head (reference/, float64), and the gradients they give."""
    from reference import rlplus_loss_from_logprobs_reference

    h, w, t, adv, external = loss_inputs(n, d, v, dtype, seed=1)
    big = n * v * d > 2**36
    ref_dtype = torch.float32 if big else torch.float64
    chunk = 1024 if big else 4096
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        zero = torch.zeros(n, device=DEVICE)
        fwd = reference(h, w, None, t, zero, zero, 1.0, ref_dtype, chunk=chunk, with_grads=False)
        valid = t != IGN
        logp = torch.where(valid, fwd["target_logit"] - fwd["lse"], 0.0)
        entropy = torch.where(valid, fwd["entropy"], 0.0)
        g = torch.Generator(device=DEVICE).manual_seed(2)
        old = (logp + 0.3 * torch.randn(n, device=DEVICE, generator=g, dtype=logp.dtype)).float()
        lp, en = logp.double().requires_grad_(), entropy.double().requires_grad_()
        head = rlplus_loss_from_logprobs_reference(lp, en, t, adv, old, external_mask=external,
                                                   entropy_coef=ENTROPY_COEF, return_entropy=True)
        gl, ge = torch.autograd.grad(head.loss, (lp, en))
        grads = reference(h, w, None, t, gl.float(), ge.float(), 1.0, ref_dtype, chunk=chunk)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    return dict(ref_dtype=ref_dtype, old=old, loss=head.loss.detach(), logprobs=logp, entropy=entropy,
                grad_hidden=grads["grad_hidden"], grad_weight=grads["grad_weight"])


def check_loss(n, d, v, dtype, schedule, logits, references, config=None):
    """rlplus_loss's loss, log-probs, entropies and gradients against `loss_reference` (kept in `references`
    per shape: every schedule is checked against the same one), and against a second run of the same step,
    which must give the same bits (no atomics; cuBLAS is deterministic on one stream). Off-policy and external
    tokens: the ratios, clips, MIS weights and exploration coefficients all depend on the log-probs."""
    with_schedule(schedule, logits)
    key = (n, d, v, dtype)
    if key not in references:
        references[key] = loss_reference(n, d, v, dtype)
    ref = references[key]
    h, w, t, adv, external = loss_inputs(n, d, v, dtype, seed=1)
    require_single_pass(schedule, h)

    def outputs():
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        out = loss_step(hr, wr, t, adv, ref["old"], external)
        torch.cuda.synchronize()
        return dict(loss=out.loss.detach()[None], logprobs=out.logprobs, entropy=out.entropy, grad_hidden=hr.grad,
                    grad_weight=wr.grad)

    first = outputs()
    again = outputs()
    rows = []
    row = dict(shape=f"{n}x{d}x{v}", dtype=str(dtype).replace("torch.", ""), bias=False, upstream=1.0,
               logits=run_label(schedule, logits, config), ref=str(ref["ref_dtype"]).replace("torch.", ""))
    for k, got in first.items():
        kind = "bwd" if k.startswith("grad") else "fwd"
        expected = ref[k][None] if k == "loss" else ref[k]
        r, m = rel_err(got, expected)
        rows.append(dict(row, out=k, rel_err=r, max_abs=m, tol=TOL[dtype][kind],
                         ok=bool(torch.isfinite(got).all()) and r <= TOL[dtype][kind]))
        r, m = rel_err(again[k], got)
        rows.append(dict(row, out=f"{k} rerun", rel_err=r, max_abs=m, tol=0.0, ok=torch.equal(again[k], got),
                         ref="the first run"))
    del first, again
    torch.cuda.empty_cache()
    return rows


def severity(row) -> float:
    """How far a check is from its tolerance (1 at it); a bitwise check (tol 0): 0 if equal, else inf."""
    if row["tol"] == 0:
        return 0.0 if row["ok"] else math.inf
    return row["rel_err"] / row["tol"]


def time_loss(n, d, v, dtype, schedule, logits, rep, profile=False, config=None):
    """rlplus_loss forward+backward (the user's step) vs the three bare GEMMs, and its peak extra memory
    beyond the inputs and the two gradients it returns, against the naive forward+backward's."""
    with_schedule(schedule, logits)
    h, w, t, adv, external = loss_inputs(n, d, v, dtype)
    require_single_pass(schedule, h)
    old = -torch.rand(n, device=DEVICE) * 5
    hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()

    def step():
        hr.grad = wr.grad = None
        loss_step(hr, wr, t, adv, old, external)

    res = dict(shape=f"{n}x{d}x{v}", dtype=str(dtype).replace("torch.", ""), logits=run_label(schedule, logits, config),
               schedule=schedule, loss=True, config=config)
    fwd_bwd_against_gemms(step, h, w, rep, profile, res)
    hr.grad = wr.grad = None
    peak = peak_extra_mb(step)
    del hr, wr
    torch.cuda.empty_cache()
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    record_memory(res, peak, h, w, naive_peak_extra_mb(h, w, t, gl, ge))
    return res


def naive(h, w, b, t, temperature):
    z = h @ w.T
    if b is not None:
        z = z + b
    z = z.float() / temperature
    logp_all = z.log_softmax(-1)
    valid = t != IGN
    logp = torch.where(valid, logp_all.gather(1, t.clamp(min=0)[:, None])[:, 0], 0.0)
    ent = torch.where(valid, -(logp_all.exp() * logp_all).sum(-1), 0.0)
    return logp, ent


def time_and_memory(n, d, v, dtype, do_naive, rep, logits="fused", profile=False, config=None):
    from rlplus_kernels.kernels import linear_logprobs_backward, linear_logprobs_forward

    torch.manual_seed(0)
    h = (torch.randn(n, d, device=DEVICE) / d**0.25).to(dtype)
    w = (torch.randn(v, d, device=DEVICE) / d**0.25).to(dtype)
    t = torch.randint(0, v, (n,), device=DEVICE)
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    res = dict(shape=f"{n}x{d}x{v}", dtype=str(dtype).replace("torch.", ""), logits=run_label(None, logits, config),
               config=config)

    def fwd():
        return linear_logprobs_forward(h, w, None, t, temperature=1.0, ignore_index=IGN, with_entropy=True,
                                       logits=logits, config=config)

    lse, _, ent = fwd()

    def bwd(needs_grad=(True, True, False)):
        return linear_logprobs_backward(h, w, None, t, lse, ent, gl, ge, temperature=1.0, ignore_index=IGN,
                                        needs_grad=needs_grad, logits=logits, config=config)

    def fwd_bwd():
        lse_, _, ent_ = fwd()
        return linear_logprobs_backward(h, w, None, t, lse_, ent_, gl, ge, temperature=1.0,
                                        ignore_index=IGN, needs_grad=(True, True, False), logits=logits,
                                        config=config)

    res["ours_fwd"] = bench(fwd, rep)
    res["ours_bwd"] = bench(bwd, rep)
    res["ours_bwd_hidden_only"] = bench(lambda: bwd(needs_grad=(True, False, False)), rep)
    fwd_bwd_against_gemms(fwd_bwd, h, w, rep, profile, res)
    naive_mb = naive_peak_extra_mb(h, w, t, gl, ge) if do_naive else None
    record_memory(res, peak_extra_mb(fwd_bwd), h, w, naive_mb)
    if do_naive:
        hr, wr = h.clone().requires_grad_(), w.clone().requires_grad_()
        try:
            res["naive_fwd_bwd"] = bench(lambda: torch.autograd.backward(
                [x.sum() for x in naive(hr, wr, None, t, 1.0)]), max(20, rep // 4), grad_to_none=[hr, wr])
        except torch.cuda.OutOfMemoryError:
            res["naive_fwd_bwd"] = None
        del hr, wr
        torch.cuda.empty_cache()
    return res


def autotuned_candidates() -> list:
    """RLPLUS_AUTOTUNE=1: the candidate the autotuner chose per key so far (an empty list: it never applied)."""
    from rlplus_kernels.kernels import linear_logprobs_fwd

    return [dict(key=repr(key), candidate=repr(cfg)) for key, cfg in linear_logprobs_fwd._TUNED.items()]


BAR_RATIO, BAR_MEMORY_FRACTION = 1.5, 0.01  # issue 3: fwd+bwd within 1.5x the three bare GEMMs, 1% of naive's memory


def bar_verdicts(timings, bar_shape, checks, errors) -> list:
    """One line per timing at the bar's shape: its ratio to the three bare GEMMs of the same run and its memory
    fraction of naive's, against the bar, so the default to pick can be read off. A run meets the bar only
    where its own checks ran and passed (a fast variant with wrong gradients, or none checked, is no default)."""
    shape = "x".join(map(str, bar_shape))
    lines = [f"\nissue-3 bar at {shape} (fwd+bwd <= {BAR_RATIO}x the 3 GEMMs, extra memory <= "
             f"{BAR_MEMORY_FRACTION:.0%} of naive's, its checks pass)"
             f"{':' if DEVICE == 'cuda' else ', a dry run: no measurement:'}"]
    for r in (r for r in timings if r["shape"] == shape):
        fraction = r.get("memory_fraction_of_naive")  # absent: naive not run (--no-naive) or out of memory
        own = [c for c in checks if c["logits"] == r["logits"]]
        failed = any(not c["ok"] for c in own) or any(e.get("label") == r["logits"] for e in errors)
        if r["ratio_fwd_bwd_over_gemms"] > BAR_RATIO or (fraction or 0.0) > BAR_MEMORY_FRACTION:
            verdict = "misses"
        elif failed or not own:
            verdict = "misses: its checks fail" if failed else "time and memory meet, but its checks did not run"
        else:
            verdict = "MEETS" if fraction is not None else "time meets, memory not measured"
        memory = "not measured" if fraction is None else f"{100 * fraction:.2f} %"
        lines.append(f"  {r['logits']:36} {r['ratio_fwd_bwd_over_gemms']:5.2f}x  memory {memory:>12}  {verdict}")
    return lines if len(lines) > 1 else lines + ["  (no timing at this shape)"]


def timing_shapes(quick: bool) -> list:
    """(N, D, V) of the timings, the issue's bar (N=16384) first."""
    shapes = [(4096, 4096, 151936)] if quick else [(16384, 4096, 151936), (4096, 4096, 151936)]
    return [scaled(*shape) for shape in shapes]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--quick", action="store_true", help="skip the 16384x4096x151936 shape")
    ap.add_argument("--no-naive", action="store_true")
    ap.add_argument("--rep", type=int, default=200, help="do_bench rep (ms)")
    ap.add_argument("--logits", default="fused", help="comma-separated logits sources: fused,tma,cublas")
    ap.add_argument("--profile", action="store_true", help="device time per kernel of one fwd+bwd per timing")
    ap.add_argument("--config", default=None, help='launch-table override as JSON, e.g. \'{"PIPELINE_TILES": true}\'')
    ap.add_argument("--loss", default=None, metavar="SCHEDULES",
                    help="instead of the launchers, rlplus_loss forward+backward end to end under these comma-separated "
                         "schedules (RLPLUS_SCHEDULE: two-pass, single-pass); two-pass once per --logits source")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at small shapes: that it runs "
                                                               "through, no measurement (see dry_run_stand_ins)")
    args = ap.parse_args()
    if args.dry_run:
        dry_run_stand_ins()
    else:
        assert torch.cuda.is_available(), "needs CUDA"
        os.environ.pop("TRITON_INTERPRET", None)
    info = env_info()
    info["dry_run"] = args.dry_run
    info["autotune"] = os.environ.get("RLPLUS_AUTOTUNE")
    info["argv"] = sys.argv
    info["git_commit"] = os.environ.get("GIT_COMMIT")
    print(info, flush=True)

    check_cases = [
        (1, 64, 2, torch.float32, True), (7, 40, 300, torch.float16, True), (257, 1000, 5003, torch.float32, False),
        (257, 1000, 5003, torch.bfloat16, True), (1031, 896, 32000, torch.float16, False),
        # aligned rows with a bias and a vocabulary that is no multiple of the tile: "tma" with its zero fill
        (257, 1024, 5003, torch.bfloat16, True),
        (2048, 4096, 151936, torch.bfloat16, False),
        # float16 dl is stored scaled (kernels/README.md): gradients of a token-mean over 16k tokens
        (2048, 4096, 151936, torch.float16, False, 2.0**-14),
    ]
    if not args.quick:
        check_cases.append((16384, 4096, 151936, torch.bfloat16, False))
    check_cases = [(*scaled(*case[:3]), *case[3:]) for case in check_cases]
    sources = args.logits.split(",")
    config = json.loads(args.config) if args.config else None
    if config:
        info["config"] = config
    checks, timings, errors = [], [], []
    bar_shape = timing_shapes(False)[0]

    def save():  # after every case: a run cut short by the device's time limit keeps what it measured
        if args.json:  # written aside, then renamed: a kill mid-write leaves the previous file whole
            from rlplus_kernels.kernels import cublas

            # which fp32-result cuBLAS forms this torch took (False: refused, and the slower fallback timed)
            info["cublas_out_dtype_forms"] = {str(key): taken for key, taken in cublas._OUT_DTYPE_OK.items()}
            with open(args.json + ".tmp", "w") as f:
                json.dump(dict(info=info, checks=checks, timings=timings, errors=errors,
                               autotuned=autotuned_candidates(),
                               ok=bool(checks) and not errors and all(r["ok"] for r in checks)), f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    def attempt(what, label, fn):
        """fn(), or None with the error recorded under the run's label: one logits source that fails (TMA has
        never run on a GPU yet) must not cost the others' results."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001  recorded, printed, and the run fails at the end
            errors.append(dict(what=what, label=label, error=repr(e)))
            print(f"ERROR {what}: {e!r}", flush=True)
            torch.cuda.empty_cache()
            return None
        finally:
            save()

    def landed(timing):
        """A timing that ran (None: its error is recorded): kept, printed with its provisional verdict, saved."""
        if timing is not None:
            timings.append(timing)
            print(json.dumps(timing), flush=True)
            print(*bar_verdicts([timing], bar_shape, [], [])[1:], "(before its checks)", flush=True)
            save()

    if args.loss:  # (schedule, logits source) pairs: the single pass reads cuBLAS products whatever the source
        runs = [(schedule, logits) for schedule in args.loss.split(",")
                for logits in (sources if schedule == "two-pass" else ["cublas"])]
        if config:
            override_launch_table(config)
        loss_checks = [(257, 1000, 5003, torch.float32), (2048, 4096, 151936, torch.bfloat16)]
        if not args.quick:
            loss_checks.append((16384, 4096, 151936, torch.bfloat16))
        loss_checks = [(*scaled(*case[:3]), case[3]) for case in loss_checks]
        check_cases = []  # the launchers' checks and timings are the other mode's
        # the bar's shape first, and timings before checks: a step cut by the time limit loses the least
        for (n, d, v), (schedule, logits) in ((shape, run) for shape in timing_shapes(args.quick) for run in runs):
            landed(attempt(f"loss timing {schedule}/{logits} {(n, d, v)}", run_label(schedule, logits, config),
                           lambda: time_loss(n, d, v, torch.bfloat16, schedule, logits, args.rep, args.profile,
                                             config)))
        references = {}  # per shape, shared by the runs
        for (n, d, v, dtype), (schedule, logits) in ((case, run) for case in loss_checks for run in runs):
            rows = attempt(f"loss check {schedule}/{logits} {(n, d, v)}", run_label(schedule, logits, config),
                           lambda: check_loss(n, d, v, dtype, schedule, logits, references, config))
            if rows is not None:
                checks += rows
                worst = max(rows, key=severity)
                print(f"loss check {schedule}/{logits} {n}x{d}x{v} {dtype} {'OK' if all(r['ok'] for r in rows) else 'FAIL'} "
                      f"worst {worst['out']} rel {worst['rel_err']:.2e} (tol {worst['tol']:.0e})", flush=True)
            if len(references) > 1:  # shapes in order: drop the finished one's (GBs at the largest shape)
                references.pop(next(iter(references)))
        references.clear()
        torch.cuda.empty_cache()
        sources = []

    for (n, d, v), logits in ((shape, logits) for shape in timing_shapes(args.quick) for logits in sources):
        landed(attempt(f"timing {logits} {(n, d, v)}", run_label(None, logits, config), lambda: time_and_memory(
            n, d, v, torch.bfloat16, not args.no_naive, args.rep, logits, args.profile, config)))

    for case, logits in ((case, logits) for logits in sources for case in check_cases):
        t0 = time.time()
        rows = attempt(f"check {logits} {case[:4]}", run_label(None, logits, config),
                       lambda: check_shape(*case, logits=logits, config=config))
        if rows is None:
            continue
        checks += rows
        worst = max(rows, key=severity)
        upstream = f" upstream={case[5]:g}" if len(case) > 5 else ""
        print(f"check {logits:6} {rows[0]['shape']:>20} {rows[0]['dtype']:9} bias={case[4]!s:5}{upstream} "
              f"{'OK ' if all(r['ok'] for r in rows) else 'FAIL'} worst {worst['out']} rel {worst['rel_err']:.2e} "
              f"(tol {worst['tol']:.0e}, ref {worst['ref']}) [{time.time() - t0:.1f}s]", flush=True)

    print("\n=== summary (" + ", ".join(f"{k} {v}" for k, v in info.items()) + ") ===")
    print(f"{'correctness':12} {'logits':6} {'shape':>20} {'dtype':9} {'worst output':14} {'rel err':>9} {'tol':>7} ok")
    for key in dict.fromkeys((r["logits"], r["shape"], r["dtype"]) for r in checks):
        rows = [r for r in checks if (r["logits"], r["shape"], r["dtype"]) == key]
        w = max(rows, key=severity)
        print(f"{'':12} {w['logits']:6} {w['shape']:>20} {w['dtype']:9} {w['out']:14} {w['rel_err']:9.2e} "
              f"{w['tol']:7.0e} {all(r['ok'] for r in rows)}")
    reruns = [r for r in checks if r["tol"] == 0]
    if reruns:
        differ = sorted({f"{r['logits']} {r['shape']} {r['out']}" for r in reruns if not r["ok"]})
        print(f"{'':12} a second run of the loss step gave other bits: {', '.join(differ)}" if differ else
              f"{'':12} a second run of each loss step gave the same bits in every output")
    print(f"\n{'timing (ms p50)':16} {'logits':6} {'shape':>18} {'fwd':>7} {'bwd':>7} {'fwd+bwd':>8} {'3 GEMMs':>8} {'ratio':>6} "
          f"{'TFLOP/s':>8} {'naive':>8} {'peak MiB':>9} {'- grads':>8} {'naive - grads':>13} {'% naive':>7}")
    for r in timings:
        nv = r.get("naive_fwd_bwd")
        part = lambda key: r[key]["p50"] if key in r else float("nan")  # noqa: E731  (a loss timing: fwd+bwd only)
        print(f"{'':16} {r['logits']:6} {r['shape']:>18} {part('ours_fwd'):7.2f} {part('ours_bwd'):7.2f} "
              f"{r['ours_fwd_bwd']['p50']:8.2f} {r['gemm_sum_ms']:8.2f} {r['ratio_fwd_bwd_over_gemms']:6.2f} "
              f"{r['tflops_fwd_bwd']:8.1f} {nv['p50'] if nv else float('nan'):8.2f} {r['ours_peak_extra_mb']:9.0f} "
              f"{r['ours_beyond_grads_mb']:8.0f} {r.get('naive_beyond_grads_mb', float('nan')):13.0f} "
              f"{100 * r.get('memory_fraction_of_naive', float('nan')):7.2f}")
    print(*bar_verdicts(timings, bar_shape, checks, errors), sep="\n")
    for r in timings:
        if "kernels" in r:
            print(f"\nkernels of one fwd+bwd, {r['logits']} {r['shape']} (ms, calls):")
            for k in r["kernels"]:
                print(f"  {k['ms']:9.2f} {k['calls']:6}  {k['kernel']}")
    if info["autotune"]:
        chosen = "; ".join(f"{r['key']}: {r['candidate']}" for r in autotuned_candidates())
        where = "it applies on sm_80/sm_90, fp16/bf16, aligned rows, D % 64 == 0"
        print(f"\nautotuned (RLPLUS_AUTOTUNE): {chosen or f'none ({where})'}")
    ok = bool(checks) and not errors and all(r["ok"] for r in checks)
    print("\nALL CHECKS PASS" if ok else f"\nSOME CHECKS FAILED ({len(errors)} error(s))")
    save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
