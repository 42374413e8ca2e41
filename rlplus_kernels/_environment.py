"""What the library reads of its environment: the torch version, its environment variables, read the same way
in eager mode and in a compiled step, and whether a CUDA graph is being captured."""

from __future__ import annotations

import os
from typing import Optional

import torch


def major_minor(version: str) -> tuple:
    """(major, minor) of a version string: "2.11.0+cu130" -> (2, 11)."""
    return tuple(int(x) for x in version.split(".")[:2])


NAMES = ("TRITON_INTERPRET", "RLPLUS_SCHEDULE", "RLPLUS_LOGITS", "RLPLUS_AUTOTUNE", "RLPLUS_CHUNK_ELEMS")

# torch < 2.6's dynamo cannot read an unset variable in a compiled step: it folds os.environ.get into the
# lookup's KeyError ("constant fold exception"). There a compiled step reads what the last eager read (or the
# import) saw, and is traced again when that changes. Newer dynamo reads os.environ itself (a later change
# traces the step again on 2.6; on 2.11 and 2.13 the step keeps the value it was traced with).
_COMPILED_STEPS_READ_ENVIRON = major_minor(torch.__version__) >= (2, 6)
_LAST_SEEN = {name: os.environ.get(name) for name in NAMES}


def environment_variable(name: str, default: Optional[str]) -> Optional[str]:
    """os.environ.get(name, default), also inside a step compiled by torch < 2.6 (`name` one of NAMES)."""
    if _COMPILED_STEPS_READ_ENVIRON:
        value = os.environ.get(name)
    elif torch.compiler.is_compiling():
        value = _LAST_SEEN[name]
    else:
        value = _LAST_SEEN[name] = os.environ.get(name)
    return default if value is None else value


def environment_flag(name: str) -> bool:
    """A 0/1 switch among NAMES: unset, empty or "0" is off, "1" is on; any other value is refused, naming it."""
    value = environment_variable(name, "0")
    if value not in ("", "0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def graph_capturing(device: torch.device) -> bool:
    """Whether `device` is a CUDA device and a CUDA graph is being captured on the current device's current stream:
    no host sync may happen then. False while torch.compile traces (no graph is captured then; cudagraphs capture
    the compiled code later)."""
    return device.type == "cuda" and not torch.compiler.is_compiling() and torch.cuda.is_current_stream_capturing()
