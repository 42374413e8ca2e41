"""Time and peak memory of the RL-PLUS / GRPO loss head: this library against what users run instead.

    python benchmarks/bench_loss.py                       # CPU: a few minutes, float32
    python benchmarks/bench_loss.py --device cuda         # GPU: full sweep in bfloat16, model shapes
    python benchmarks/bench_loss.py --quick               # smoke run
    python benchmarks/bench_loss.py --json benchmarks/results/cpu/bench_loss.json   # + PNG plots beside it

Providers (benchmarks/providers.py): naive (full logits), compile (torch.compile of naive), torch and
triton (this library), triton-single-pass (the triton backend with RLPLUS_SCHEDULE=single-pass; its
`fwd` is triton's), liger (Liger-Kernel's chunked GRPO loss), cce (Cut Cross-Entropy log-probs).
Modes: `fwd` = no-grad log-prob scoring (old/ref log-probs); `fwd+bwd` = loss and its gradients
with respect to hidden and weight.

Memory is the peak *beyond* the inputs and the returned gradients: on CUDA
`max_memory_allocated() - memory_allocated() before the call - bytes of the returned tensors`;
on CPU the same with the process's resident set size, read from the kernel's high-water mark
(VmHWM, reset through /proc/self/clear_refs) in one call after the warm-up, with glibc's freed
memory handed back first (malloc_trim) and every block of 256 KiB or more mmapped for that call, so
that freed memory kept by malloc neither hides nor inflates a peak. On CPU each (provider, mode)
runs in its own fresh process (`--isolate size`: one per size as well).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

import torch

# this checkout's rlplus_kernels, installed or not (a bare GPU machine runs it from the working tree)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from providers import PROVIDERS, Problem, make_inputs  # noqa: E402

MODES = ("fwd", "fwd+bwd")

# (label, tokens, hidden, vocab) of real LM heads
MODEL_HEADS = [("Qwen2.5-7B", 3584, 152064), ("Llama-3.1-8B", 4096, 128256), ("Gemma-2-9B", 3584, 256000)]


# ---------------------------------------------------------------------------------------------
# the sweeps
# ---------------------------------------------------------------------------------------------

def build_configs(device: str, quick: bool, args) -> list[tuple[list[str], Problem]]:
    """[(sweeps it belongs to, problem)], each (tokens, hidden, vocab) once."""
    if device == "cpu":
        # small enough for a few minutes on two cores, large enough for the [N, V] logits to dominate
        dtype, seq = "float32", args.seq_len or 256
        if quick:
            D, vocab_sweep, vocab_n, token_sweep, token_v, models = 64, [4096, 16384], 256, [256, 512], 4096, []
        else:
            D, vocab_sweep, vocab_n = 128, [32768, 65536, 128256], 512
            token_sweep, token_v, models = [512, 1024, 2048], 32768, []
    else:
        dtype, seq = "bfloat16", args.seq_len or 1024
        if quick:
            D, vocab_sweep, vocab_n, token_sweep, token_v = 4096, [32768, 128256], 4096, [2048, 4096], 32768
            models = [(m, d, v, n) for m, d, v in MODEL_HEADS[1:2] for n in (4096,)]
        else:
            D, vocab_sweep, vocab_n = 4096, [32768, 65536, 128256, 256000], 8192
            token_sweep, token_v = [2048, 4096, 8192, 16384, 32768], 128256
            models = [(m, d, v, n) for m, d, v in MODEL_HEADS for n in (4096, 8192, 16384)]
    D = args.hidden or D
    if args.vocab:
        vocab_sweep = args.vocab
    if args.tokens:
        token_sweep = args.tokens
    out: dict[tuple, list[str]] = {}
    problems: dict[tuple, Problem] = {}

    def add(label, n, d, v):
        n = max(seq, n // seq * seq)
        key = (n, d, v)
        out.setdefault(key, []).append(label)
        problems[key] = Problem(tokens=n, hidden=d, vocab=v, dtype=args.dtype or dtype, device=device,
                                seq_len=min(seq, n), external_frac=args.external_frac)

    if args.shape:  # explicit shapes replace the sweeps
        vocab_sweep, token_sweep, models = [], [], [("shape", d, v, n) for n, d, v in args.shape]
    for v in vocab_sweep:
        add("vocab", vocab_n, D, v)
    for n in token_sweep:
        add("tokens", n, D, token_v)
    for m, d, v, n in models:
        add(m, n, d, v)
    keys = sorted(out, key=lambda k: (k[0] * k[2], k))
    return [(out[k], problems[k]) for k in keys]


# ---------------------------------------------------------------------------------------------
# measuring one (provider, mode, problem)
# ---------------------------------------------------------------------------------------------

_LIBC = None


def _malloc_trim():
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except OSError:  # not glibc: nothing to hand back
        pass


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset the peak RSS to the current RSS
        return True
    except OSError:
        return False


def _nbytes(out) -> int:
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(_nbytes(o) for o in out)
    return 0


def _make_call(provider, mode, inp):
    if mode == "fwd":
        lp = provider.logprobs(inp)

        def call():
            with torch.no_grad():
                return lp()
    else:
        loss = provider.loss(inp)

        def call():
            value = loss()
            return (value.detach(), *torch.autograd.grad(value, [inp.hidden, inp.weight]))
    return call


def _signature(mode, out) -> dict:
    """What is compared across providers: loss and gradient norms, or log-prob mean and norm."""
    if mode == "fwd":
        lp = out.double()
        return {"logp_mean": lp.mean().item(), "logp_norm": lp.norm().item()}
    loss, gh, gw = out
    return {"loss": loss.double().item(), "grad_hidden_norm": gh.double().norm().item(),
            "grad_weight_norm": gw.double().norm().item()}


def _agree(sig, ref, dtype) -> tuple[bool, str]:
    # float32: error of a chunked vs a full reduction; bfloat16: logits rounded to 8 bits of mantissa
    rtol, atol = (1e-3, 1e-4) if dtype == "float32" else (3e-2, 2e-2)
    worst, bad = "", False
    for k, r in ref.items():
        v = sig.get(k)
        if v is None or not math.isfinite(v):
            return False, f"{k}={v}"
        err = abs(v - r)
        if err > atol + rtol * abs(r):
            bad, worst = True, f"{k}: {v:.6g} vs {r:.6g}"
    return not bad, worst


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    msg = str(e)
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg


def measure(provider, mode, problem: Problem, warmup: int, repeats: int, ref: dict | None) -> dict:
    """Check against `ref`, then time and measure one (provider, mode, problem). Never raises."""
    rec = {"status": "ok"}
    cuda = problem.device == "cuda"
    try:
        inp = make_inputs(problem, with_old_logprobs=(mode == "fwd+bwd"))
        call = _make_call(provider, mode, inp)
        # warm-up (compilation, autotuning, thread pools); the first result is the check
        out = call()
        if cuda:
            torch.cuda.synchronize()
        rec["check"] = sig = _signature(mode, out)
        del out
        if ref is not None:
            ok, why = _agree(sig, ref, problem.dtype)
            rec["agree"] = ok
            if not ok:
                rec["disagreement"] = why
        for _ in range(warmup - 1):
            del_out = call()
            del del_out
        rec.update(_measure_cuda(call, repeats) if cuda else _measure_cpu(call, repeats))
    except Exception as e:  # noqa: BLE001 -- a failing provider is a row, not a crash
        rec = {"status": "OOM" if _is_oom(e) else f"error: {type(e).__name__}: {str(e)[:300]}"}
        if not _is_oom(e):
            traceback.print_exc(file=sys.stderr)
    finally:
        inp = call = None  # noqa: F841
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rec


def quantiles_ms(ms: list[float]) -> dict:
    ms = sorted(ms)

    def q(p):  # linear interpolation, as numpy's default
        x = p * (len(ms) - 1)
        lo = math.floor(x)
        hi = min(lo + 1, len(ms) - 1)
        return ms[lo] + (ms[hi] - ms[lo]) * (x - lo)

    return {"median_ms": statistics.median(ms), "p20_ms": q(0.2), "p80_ms": q(0.8), "repeats": len(ms)}


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _mallopt_mmap_threshold(nbytes: int) -> None:
    global _LIBC
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.mallopt(M_MMAP_THRESHOLD, nbytes)
    except (OSError, AttributeError):
        pass


def _measure_cpu(call, repeats) -> dict:
    # Memory: one call in which every block of 256 KiB or more is its own mmap, handed back on free,
    # so the high-water mark of the resident set is the peak of live memory, not of what glibc kept.
    gc.collect()
    _mallopt_mmap_threshold(256 * 1024)
    _malloc_trim()  # freed heap memory back to the kernel, so that this call's peak is seen
    hwm_ok = _reset_hwm()
    rss0 = _proc_status_kb("VmRSS")
    out = call()
    peak = _proc_status_kb("VmHWM") * 1024 - rss0 * 1024 - _nbytes(out)
    del out
    # Time: glibc's steady state for big-tensor programs (blocks under 32 MiB reused from the heap)
    _mallopt_mmap_threshold(32 * 2**20)
    times = []
    for _ in range(repeats):
        gc.collect()
        t0 = time.perf_counter()
        out = call()
        times.append((time.perf_counter() - t0) * 1e3)
        del out
    rec = quantiles_ms(times)
    rec["peak_mem_mb"] = peak / 2**20 if hwm_ok else None
    return rec


def cuda_call_ms(call) -> float:
    """The device time of one call (ms, at least 1e-3), to size a timing run."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    return max(start.elapsed_time(end), 1e-3)


def do_bench_ms(call, call_ms: float, *, min_samples: int, min_ms: float, warmup_ms: float, grad_to_none=None):
    """triton.testing.do_bench's samples (ms) of `call` (one call takes about `call_ms`): at least `min_ms` of
    them and at least `min_samples`. do_bench's own estimate of a call includes its L2 flush, so it is asked for
    one call more."""
    from triton.testing import do_bench

    return do_bench(call, warmup=warmup_ms, rep=max((min_samples + 1) * call_ms, min_ms), grad_to_none=grad_to_none,
                    return_mode="all")


def _measure_cuda(call, repeats) -> dict:
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    m0 = torch.cuda.memory_allocated()
    out = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - m0 - _nbytes(out)
    del out
    est = cuda_call_ms(call)  # sizes the run: about 1 s of repeats, at least `repeats`
    try:
        times = do_bench_ms(call, est, min_samples=repeats, min_ms=500.0, warmup_ms=max(2 * est, 25.0))
        timer = "triton.testing.do_bench"
    except ImportError:
        times = [cuda_call_ms(call) for _ in range(max(repeats, int(1000 / est)))]
        timer = "cuda events"
    rec = {**quantiles_ms(times), "timer": timer}
    rec["peak_mem_mb"] = peak / 2**20
    return rec


# ---------------------------------------------------------------------------------------------
# the worker: one process per (provider, mode) (or per size) on CPU
# ---------------------------------------------------------------------------------------------

def worker_main():
    spec = json.loads(sys.stdin.read())
    torch.set_num_threads(spec["threads"])
    if spec.get("mem_limit_bytes"):
        # a size that does not fit fails its allocation (a row marked OOM) instead of waking the
        # kernel's OOM killer, which may pick another process on a shared machine
        import resource
        cap = _proc_status_kb("VmSize") * 1024 + int(spec["mem_limit_bytes"])
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    provider = PROVIDERS[spec["provider"]]
    for job in spec["jobs"]:
        problem = Problem(**job["problem"])
        print("START " + json.dumps(job["id"]), flush=True)
        rec = measure(provider, spec["mode"], problem, spec["warmup"], job["repeats"], job.get("ref"))
        print("RESULT " + json.dumps({"id": job["id"], **rec}), flush=True)


def mem_limit_bytes(args) -> int | None:
    """--mem-limit-gb, else 90% of the memory the kernel reports available."""
    if args.mem_limit_gb is not None:
        return int(args.mem_limit_gb * 2**30) if args.mem_limit_gb > 0 else None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return int(0.9 * avail * 1024)
    except (OSError, StopIteration):
        return None


def run_worker(provider_name, mode, jobs, args, threads, on_result):
    """Run jobs in fresh processes; a process killed mid-job (out of memory) records that job as OOM
    and the rest go on in a new process."""
    pending = list(jobs)
    while pending:
        spec = {"provider": provider_name, "mode": mode, "threads": threads, "warmup": args.warmup,
                "jobs": pending, "mem_limit_bytes": mem_limit_bytes(args)}
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        current, done = None, set()
        for line in proc.stdout:
            if line.startswith("START "):
                current = json.loads(line[6:])
            elif line.startswith("RESULT "):
                rec = json.loads(line[7:])
                done.add(rec["id"])
                on_result(rec.pop("id"), rec)
                current = None
        proc.wait()
        err = proc.stderr.read()
        if current is not None:  # died in the middle of a job
            killed = proc.returncode in (-9, 137)
            status = "OOM" if killed else f"error: worker exited {proc.returncode}: {err.strip()[-300:]}"
            on_result(current, {"status": status})
            done.add(current)
        elif proc.returncode != 0 and not done:
            for job in pending:
                on_result(job["id"], {"status": f"error: worker exited {proc.returncode}: {err.strip()[-300:]}"})
            return
        pending = [j for j in pending if j["id"] not in done]


# ---------------------------------------------------------------------------------------------
# environment, table, summary
# ---------------------------------------------------------------------------------------------

def _module_version(name):
    try:
        return getattr(__import__(name), "__version__", None)
    except ImportError:
        return None


def environment(device: str, threads: int) -> dict:
    import importlib.metadata as md

    def ver(dist):
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    env = {"torch_version": torch.__version__, "triton_version": ver("triton"),
           "liger_version": ver("liger-kernel"), "cce_version": ver("cut-cross-entropy"),
           "rlplus_kernels_version": ver("rlplus-kernels") or _module_version("rlplus_kernels"),
           "python_version": platform.python_version(),
           "threads": threads, "argv": sys.argv}
    if device == "cuda":
        env["device_name"] = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        env["device_name"] = f"{name} ({threads} threads)"
    env["git_commit"] = os.environ.get("GIT_COMMIT")  # a copy of the tree without .git names it this way
    if env["git_commit"] is None:
        try:
            env["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                               cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
        except OSError:
            pass
    return env


def available_cores() -> int:
    """Cores not kept busy by other processes (1-minute load average), at least 1. With more busy
    threads than cores, every OpenMP barrier waits for a descheduled thread and many-small-op
    (chunked) code is penalised far more than a few big ops: fewer threads measure more fairly."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, cores - int(round(busy))))


def _fmt(x, spec=".1f"):
    return "-" if x is None else format(x, spec)


def ratios(records, provider, mode, baseline="naive"):
    """Per-size (time, memory) ratios of provider to baseline, over sizes where both ran."""
    base = {(r["tokens"], r["hidden"], r["vocab"]): r for r in records
            if r["provider"] == baseline and r["mode"] == mode and r["status"] == "ok"}
    out = []
    for r in records:
        b = base.get((r["tokens"], r["hidden"], r["vocab"]))
        if r["provider"] == provider and r["mode"] == mode and r["status"] == "ok" and b:
            tr = r["median_ms"] / b["median_ms"]
            mr = (r["peak_mem_mb"] / b["peak_mem_mb"]) if r["peak_mem_mb"] is not None and b["peak_mem_mb"] else None
            out.append((tr, mr))
    return out


def summary(records) -> list[dict]:
    rows = []
    providers = [p for p in PROVIDERS if p != "naive" and any(r["provider"] == p for r in records)]
    for mode in MODES:
        for p in providers:
            rs = ratios(records, p, mode)
            if not rs:
                continue
            mem = [m for _, m in rs if m is not None]
            rows.append({"provider": p, "mode": mode, "sizes": len(rs),
                         "time_ratio_median": statistics.median(t for t, _ in rs),
                         "mem_ratio_median": statistics.median(mem) if mem else None,
                         "mem_ratio_max": max(mem) if mem else None})
    return rows


def print_table(records, file=sys.stdout):
    hdr = f"{'provider':<9} {'mode':<8} {'N':>6} {'D':>5} {'V':>7} {'median ms':>10} {'p20-p80 ms':>19} " \
          f"{'peak MiB':>9} {'x time':>7} {'x mem':>7}  note"
    print(hdr, file=file)
    print("-" * len(hdr), file=file)
    base = {(r["mode"], r["tokens"], r["hidden"], r["vocab"]): r for r in records
            if r["provider"] == "naive" and r["status"] == "ok"}
    for r in records:
        b = base.get((r["mode"], r["tokens"], r["hidden"], r["vocab"]))
        ok = r["status"] == "ok"
        tr = _fmt(r["median_ms"] / b["median_ms"], ".2f") if ok and b else "-"
        mr = _fmt(r["peak_mem_mb"] / b["peak_mem_mb"], ".3f") if ok and b and r["peak_mem_mb"] is not None \
            and b["peak_mem_mb"] else "-"
        spread = f"{_fmt(r.get('p20_ms'))}-{_fmt(r.get('p80_ms'))}" if ok else ""
        note = "" if ok else r["status"]
        if r.get("agree") is False:
            note = f"DISAGREES ({r.get('disagreement')}) " + note
        print(f"{r['provider']:<9} {r['mode']:<8} {r['tokens']:>6} {r['hidden']:>5} {r['vocab']:>7} "
              f"{_fmt(r.get('median_ms')):>10} {spread:>19} {_fmt(r.get('peak_mem_mb')):>9} {tr:>7} {mr:>7}  {note}",
              file=file)


def print_summary(records, file=sys.stdout):
    print("\nmedian over sizes of the ratio to naive (time: median ms; memory: extra peak MiB):", file=file)
    for s in summary(records):
        print(f"  {s['provider']:<8} {s['mode']:<8} time x{s['time_ratio_median']:.2f}   memory "
              f"x{_fmt(s['mem_ratio_median'], '.3f')} (worst x{_fmt(s['mem_ratio_max'], '.3f')})   "
              f"over {s['sizes']} sizes", file=file)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--providers", nargs="+", choices=list(PROVIDERS),
                   help="default: all (without compile under --quick: its compilation dominates a smoke run)")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--json", metavar="PATH", help="write the records there, and PNG plots beside it")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: float32 on CPU, "
                   "bfloat16 on CUDA")
    p.add_argument("--hidden", type=int, help="hidden size D of the sweeps (not of the model shapes)")
    p.add_argument("--vocab", type=int, nargs="+", help="vocabulary sizes of the vocabulary sweep")
    p.add_argument("--tokens", type=int, nargs="+", help="token counts of the token sweep")
    p.add_argument("--shape", type=int, nargs=3, action="append", metavar=("N", "D", "V"),
                   help="measure exactly this tokens x hidden x vocab shape instead of the sweeps (repeatable)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (256 CPU, 1024 CUDA)")
    p.add_argument("--external-frac", type=float, default=0.0,
                   help="fraction of sequences that are external demonstrations (RL-PLUS MIS branch; "
                        "providers without it are skipped)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, help="timed repeats (CPU default 3, 2 with --quick; CUDA: "
                   "at least this many, about 1 s of them)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the cores that other processes leave idle, "
                   "by the 1-minute load average, at least 1)")
    p.add_argument("--mem-limit-gb", type=float, help="CPU: address-space limit of each worker beyond its "
                   "start (default: 90%% of available memory; 0: none); a size over it is recorded as OOM")
    p.add_argument("--isolate", choices=["provider", "size"], default="provider",
                   help="CPU: a fresh process per (provider, mode), or per (provider, mode, size)")
    p.add_argument("--label", help="free text stored in every record (e.g. which branch of a backend ran)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device visible")
    threads = args.threads or available_cores()
    torch.set_num_threads(threads)
    if not args.providers:
        args.providers = [p for p in PROVIDERS if not (args.quick and p == "compile")]
    configs = build_configs(device, args.quick, args)
    env = environment(device, threads)
    mem_method = ("cuda: max_memory_allocated - memory_allocated before the call - returned tensors"
                  if device == "cuda" else
                  "cpu: VmHWM - VmRSS before one call after the warm-up (HWM reset via /proc/self/clear_refs, "
                  "glibc malloc_trim first, mmap threshold 256 KiB during that call) - returned tensors; fresh "
                  f"process per (provider, mode{', size' if args.isolate == 'size' else ''})")
    print(f"# bench_loss on {env['device_name']}: torch {env['torch_version']}, triton {env['triton_version']}, "
          f"liger {env['liger_version']}, cce {env['cce_version']}", flush=True)
    if device == "cpu" and hasattr(os, "getloadavg") and os.getloadavg()[0] >= 0.5:
        print(f"# note: load average {os.getloadavg()[0]:.1f} before the run: other processes share the CPU; "
              f"using {threads} thread(s) (--threads to override)", flush=True)
    print(f"# {len(configs)} sizes x {len(args.modes)} modes x {len(args.providers)} providers; "
          f"dtype {configs[0][1].dtype}, seq_len {configs[0][1].seq_len}", flush=True)

    # order: naive first, so that every other provider is checked against it before being timed
    order = sorted(args.providers, key=lambda p: (p != "naive", list(PROVIDERS).index(p)))
    results: dict[tuple, dict] = {}
    refs: dict[tuple, dict] = {}
    t_start = time.time()

    def record(pname, mode, key, sweeps, problem, rec):
        r = {"provider": pname, "mode": mode, "tokens": problem.tokens, "hidden": problem.hidden,
             "vocab": problem.vocab, "dtype": problem.dtype, "device": device,
             "median_ms": None, "p20_ms": None, "p80_ms": None, "peak_mem_mb": None,
             **rec, "device_name": env["device_name"], "seq_len": problem.seq_len,
             "external_frac": problem.external_frac, "sweeps": sweeps, "note": PROVIDERS[pname].note,
             **{k: v for k, v in env.items() if k != "device_name"}, "mem_method": mem_method,
             "time_method": "triton.testing.do_bench / cuda events" if device == "cuda"
             else "time.perf_counter per call", "warmup": args.warmup,
             "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             # other processes on the machine slow the CPU timings down; this says how busy it was
             "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None, "label": args.label}
        if rec.get("status") == "ok" and "check" in rec and (key, mode) not in refs:
            refs[(key, mode)] = rec["check"]  # the first provider that ran (naive) is the yardstick
        results[(pname, mode, key)] = r
        if args.json:  # kept up to date, so that an interrupted run leaves what it measured
            write_json(args.json, sorted_records())
        extra = "" if r["status"] == "ok" else f"  [{r['status']}]"
        if r.get("agree") is False:
            extra += f"  DISAGREES: {r.get('disagreement')}"
        print(f"[{time.time() - t_start:6.0f}s] {pname:<8} {mode:<8} N={problem.tokens:<6} D={problem.hidden:<5} "
              f"V={problem.vocab:<7} {_fmt(r['median_ms'])} ms  {_fmt(r['peak_mem_mb'])} MiB{extra}", flush=True)

    def sorted_records():
        return [results[k] for k in sorted(results, key=lambda k: (MODES.index(k[1]), k[2][0] * k[2][2], k[2],
                                                                    list(PROVIDERS).index(k[0])))]

    def repeats_for(problem):
        if args.repeats:
            return args.repeats
        if device == "cuda":
            return 10
        return 2 if args.quick else 3

    for pname in order:
        prov = PROVIDERS[pname]
        runnable = []
        for sweeps, problem in configs:
            why = prov.unavailable(problem)
            if why:
                for mode in args.modes:
                    record(pname, mode, _key(problem), sweeps, problem, {"status": f"skipped: {why}"})
            else:
                runnable.append((sweeps, problem))
        if not runnable:
            continue
        for mode in args.modes:
            if device == "cuda":
                for sweeps, problem in runnable:
                    rec = measure(prov, mode, problem, args.warmup, repeats_for(problem),
                                  refs.get((_key(problem), mode)))
                    record(pname, mode, _key(problem), sweeps, problem, rec)
            else:
                by_id = {i: (sweeps, problem) for i, (sweeps, problem) in enumerate(runnable)}
                jobs = [{"id": i, "problem": problem.to_dict(), "repeats": repeats_for(problem),
                         "ref": refs.get((_key(problem), mode))} for i, (sweeps, problem) in by_id.items()]
                groups = [[j] for j in jobs] if args.isolate == "size" else [jobs]
                for group in groups:
                    run_worker(pname, mode, group, args, threads,
                               lambda i, rec, m=mode: record(pname, m, _key(by_id[i][1]), by_id[i][0],
                                                             by_id[i][1], rec))

    records = sorted_records()
    print()
    print_table(records)
    print_summary(records)
    print(f"\ntotal {time.time() - t_start:.0f}s", flush=True)
    if args.json:
        write_json(args.json, records)
        print(f"wrote {args.json}")
        if not args.no_plots:
            try:
                from plot import plot_records
                for path in plot_records(records, args.json):
                    print(f"wrote {path}")
            except ImportError as e:
                print(f"plots skipped: {e} (pip install matplotlib)")
    return 0


def write_json(path, records):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(records, f, indent=1)
    os.replace(path + ".tmp", path)


def _key(problem: Problem):
    return (problem.tokens, problem.hidden, problem.vocab)


if __name__ == "__main__":
    sys.exit(main())
