"""benchmarks/gpu_session.sh and gpu_kernel_check.py run through on the CPU (DRY_RUN=1).

A GPU is lent to a session rarely and for minutes, and the issue-3 bar is measured by these scripts only: a
change that broke one (an import, a launcher's signature, a key the summary reads) would cost that session's
measurement whole. The dry run runs the recommended call's steps (the loss end to end under both schedules and
the three logits sources, then with the PIPELINE_TILES option; the launchers) at small shapes with the kernels
interpreted; its checks compare against the references as on the GPU, its timings mean nothing.
"""

import json
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the figures the bar and the summary table are read from, in every timing
TIMING_KEYS = {"ours_fwd_bwd", "gemm_sum_ms", "ratio_fwd_bwd_over_gemms", "tflops_fwd_bwd", "ours_peak_extra_mb",
               "ours_beyond_grads_mb", "kernels"}


def _session(out_dir, *steps):
    env = dict(os.environ, DRY_RUN="1", OUT=str(out_dir), PYTHON=sys.executable, GIT_COMMIT="dry-run")
    return subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu_session.sh"), *steps], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def test_the_recommended_gpu_session_runs_through(tmp_path):
    from rlplus_kernels.kernels._config import pipelining_supported, tensor_descriptor_class

    # PIPELINE_TILES is refused before triton 3.3 (the GPU image has 3.6): that step is left out there
    pipelined = pipelining_supported()
    proc = _session(tmp_path, "loss", *(["pipelined"] if pipelined else []), "kernels")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    expected = {"gpu_loss_check.json": {"two-pass/fused", "two-pass/tma", "two-pass/cublas", "single-pass/cublas"},
                "gpu_kernel_check.json": {"fused", "tma", "cublas"}}
    if pipelined:
        expected["gpu_loss_check_pipelined.json"] = {"two-pass/fused PIPELINE_TILES=True",
                                                     "two-pass/tma PIPELINE_TILES=True"}
    for name, runs in expected.items():
        result = json.loads((tmp_path / name).read_text())
        assert result["info"]["dry_run"] and result["info"]["git_commit"] == "dry-run", name
        assert result["ok"] and not result["errors"], (name, result["errors"])
        assert {row["logits"] for row in result["checks"]} == runs, name
        if name.startswith("gpu_loss_check"):  # each output also against a second run of the step, bit for bit
            reruns = {(row["logits"], row["out"]) for row in result["checks"] if row["tol"] == 0}
            assert reruns == {(run, f"{out} rerun") for run in runs
                              for out in ("loss", "logprobs", "entropy", "grad_hidden", "grad_weight")}, reruns
        assert {row["logits"] for row in result["timings"]} == runs, name
        assert "cublas_out_dtype_forms" in result["info"], name
        if name == "gpu_kernel_check.json":  # "tma" takes descriptors on aligned rows only (D = 40 is not)
            taken = {(row["logits"], row["descriptors"]) for row in result["checks"]}
            with_descriptors = {("tma", True)} if tensor_descriptor_class() is not None else set()
            assert taken == {("fused", False), ("cublas", False), ("tma", False), *with_descriptors}, taken
        for timing in result["timings"]:
            assert TIMING_KEYS <= timing.keys(), (name, TIMING_KEYS - timing.keys())
        log = (tmp_path / name.replace(".json", ".txt")).read_text()
        assert "issue-3 bar at" in log, name
        if name.startswith("gpu_loss_check"):
            assert "a second run of each loss step gave the same bits in every output" in log
        for run in runs:  # the summary's verdict on the bar, a line per run
            assert re.search(rf"^  {re.escape(run)} +[0-9.]+x  memory .+  (MEETS|misses|time meets, memory not measured)$",
                             log, re.MULTILINE), (name, run)
    if pipelined:
        config = json.loads((tmp_path / "gpu_loss_check_pipelined.json").read_text())["info"]["config"]
        assert config == {"PIPELINE_TILES": True}
    assert "dry run on the CPU" in (tmp_path / "env.txt").read_text()


def test_a_run_meets_the_bar_only_where_its_checks_ran_and_passed():
    """A fast variant whose checks failed (or raised, or never ran: a step cut by the time limit) was marked MEETS
    from its time and memory alone, and the defaults are flipped to the run marked MEETS."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from gpu_kernel_check import bar_verdicts
    finally:
        sys.path.pop(0)
    timing = lambda label, ratio=1.2: dict(shape="8x4x16", logits=label, ratio_fwd_bwd_over_gemms=ratio,  # noqa: E731
                                           memory_fraction_of_naive=0.005)
    check = lambda label, ok: dict(logits=label, ok=ok)  # noqa: E731
    runs = ["passes", "fails", "raised", "unchecked", "slow"]
    lines = bar_verdicts([timing(run, 1.6 if run == "slow" else 1.2) for run in runs], (8, 4, 16),
                         [check("passes", True), check("fails", True), check("fails", False), check("slow", True)],
                         [dict(what="loss check raised (8, 4, 16)", label="raised", error="RuntimeError()")])
    verdicts = {line.split()[0]: line.split("  ")[-1] for line in lines[1:]}
    assert verdicts == {"passes": "MEETS", "fails": "misses: its checks fail", "raised": "misses: its checks fail",
                        "unchecked": "time and memory meet, but its checks did not run", "slow": "misses"}, verdicts


def test_a_step_without_a_dry_run_is_refused(tmp_path):
    proc = _session(tmp_path, "loss", "tests")
    assert proc.returncode == 2 and "step 'tests' has no dry run" in proc.stderr, proc.stderr
    assert not (tmp_path / "gpu_loss_check.json").exists()  # refused before any step ran
