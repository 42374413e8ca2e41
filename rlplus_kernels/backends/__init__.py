"""Backends of the vocabulary-streaming op (CONTRACT.md) and the choice between them."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class LogprobsOptions:
    """What the op needs besides tensors (float values are runtime arguments of the kernels)."""

    temperature: float = 1.0
    ignore_index: int = -100
    with_entropy: bool = False
    chunk_tokens: Optional[int] = None
    chunk_vocab: Optional[int] = None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; on the CPU the Triton "
            "kernels run only under the interpreter: set TRITON_INTERPRET=1 before importing triton"
        )
    return backend


def linear_logprobs_op(backend: str):
    """The differentiable (hidden, weight, bias, targets, options) -> (logp, entropy | None) op."""
    if backend == "torch":
        from .torch_chunked import torch_linear_logprobs

        return torch_linear_logprobs
    from .triton_op import triton_linear_logprobs

    return triton_linear_logprobs
