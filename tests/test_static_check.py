"""scripts/check_kernels.py: every kernel compiles ahead of time for sm_80/sm_90 without spills.

Needs triton's CUDA backend (ptxas and cuobjdump ship in the wheel), no GPU. The default test
compiles the sm_90 bf16 kernels with all flags on (the heaviest), aligned and unaligned (~40 s
on 2 cores); the slow one runs `--quick` (both targets, all dtypes, heaviest flags: ~4 min on 2
cores). The full cross product of flags (360 kernels) is `python scripts/check_kernels.py`
(~20 min on 2 cores, ~3 min on 16): run it by hand or on a bigger box.
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
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
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


def test_static_check_sm90_bf16():
    rc, out = _run("--targets", "90", "--dtypes", "bf16", "--quick", "-j", str(os.cpu_count() or 1))
    assert rc == 0, out
    assert "HGMMA" in out


@pytest.mark.slow
def test_static_check_quick_all_targets():
    rc, out = _run("--quick", "-j", str(os.cpu_count() or 1))
    assert rc == 0, out
