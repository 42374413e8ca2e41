# Minimal conftest of the `triton` branch -- MERGE with main's conftest.py: it only makes the
# Triton kernels runnable on CPU tensors (interpreter, set before triton is first imported)
# and the package importable from a checkout.
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
