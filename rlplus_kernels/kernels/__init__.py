"""Triton kernels and their launchers. Importing this subpackage imports triton: callers import it lazily."""

from .linear_logprobs_bwd import linear_logprobs_backward
from .linear_logprobs_fwd import linear_logprobs_forward

__all__ = ["linear_logprobs_forward", "linear_logprobs_backward"]
