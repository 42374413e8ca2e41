# Makes the package and reference/ importable from a checkout (also in the processes that
# tests/test_distributed.py spawns: they inherit sys.path). MERGE with main's conftest.py.
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
