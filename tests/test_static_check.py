"""scripts/check_kernels.py: every kernel compiles ahead of time for sm_80/sm_90/sm_100 without spills.

Needs triton's CUDA backend (ptxas and cuobjdump ship in the wheel), no GPU. The test runs the
check TRIMMED with `--quick`: 184 kernels (sm_80, sm_90 and sm_100; bf16, fp16, fp32 IEEE and TF32;
aligned, unaligned and odd-D variants, the sm_90 TMA-descriptor variants, which must show UTMALDG,
the half-precision PIPELINE_TILES variants, the kernels reading cuBLAS products and the RLPLUS_AUTOTUNE
candidates, the last two on sm_80/sm_90 only) with every flag on, the heaviest combination for registers, the forward also with every flag
off (the bias-free LM head), and the RL head kernel with every optional input present and absent;
~3.5 min on 2 cores with a cold Triton cache. The full cross product (every flag
combination and the BLOCK_D=16 fallback) is `python scripts/check_kernels.py`:
~10 min on 2 cores (797 kernels); run it by hand, under triton 3.9 and 3.6 (kernels/README.md),
before changing the table or a kernel.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    # a subprocess: the kernels must be JIT functions, not the interpreter's (conftest sets
    # TRITON_INTERPRET=1 for this process before triton is imported)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_kernels.py"), *args],
                          capture_output=True, text=True, env=env)
    print(proc.stdout[-20000:])
    return proc.returncode, proc.stdout + proc.stderr[-5000:]


def _backend_available():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


pytestmark = pytest.mark.skipif(not _backend_available(), reason="triton has no CUDA backend here")


def test_static_check_quick():
    """Every target, all dtypes and precisions, all alignments, the heaviest flag combination."""
    rc, out = _run("--quick", "-j", str(os.cpu_count() or 1))
    assert rc == 0, out
    assert "HGMMA" in out and "sm_90" in out and "sm_80" in out
    import triton

    from helpers import major_minor

    if major_minor(triton.__version__) >= (3, 3):
        assert "TCGEN5" in out and "sm_100" in out
    else:  # triton < 3.3 aborts on sm_100: left out, and said so
        assert "skipped sm_100: needs triton >= 3.3" in out and "TCGEN5" not in out
    from rlplus_kernels.kernels import _config

    if _config.tensor_descriptor_class() is not None:  # triton < 3.3 has no host descriptors to launch them
        assert "USE_TMA" in out, "the RLPLUS_LOGITS=tma variants were not compiled"
