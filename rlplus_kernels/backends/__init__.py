"""Backends of the vocabulary-streaming op (CONTRACT.md) and the choice between them."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Optional

import torch

from .._environment import environment_variable, major_minor


@dataclass(frozen=True)
class LogprobsOptions:
    """What the op needs besides tensors (float values are runtime arguments of the kernels)."""

    temperature: float = 1.0
    ignore_index: int = -100
    with_entropy: bool = False
    chunk_tokens: Optional[int] = None
    chunk_vocab: Optional[int] = None


# looked up once, at import: torch 2.6's dynamo cannot trace importlib's find_spec in a compiled step
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def _installed_triton_version() -> Optional[tuple]:
    for distribution in ("triton", "pytorch-triton"):
        try:
            return major_minor(importlib.metadata.version(distribution))
        except (importlib.metadata.PackageNotFoundError, ValueError):
            continue
    return None


# The values of TRITON_INTERPRET that make the installed triton interpret its kernels: "1" before triton 3.4,
# then (triton.knobs) also true, yes, on and y in any case. Reading it otherwise than triton does would take
# compiled kernels for interpreted ones: TRITON_INTERPRET=false on a GPU upcast bf16 operands and ran the
# interpreter's probe kernel on a CPU tensor.
_INTERPRET_VALUES = (("1",) if (_installed_triton_version() or (3, 4)) < (3, 4)
                     else ("1", "true", "yes", "on", "y"))


def triton_interpreting() -> bool:
    return environment_variable("TRITON_INTERPRET", "0").lower() in _INTERPRET_VALUES


def triton_installed() -> bool:
    return _TRITON_INSTALLED


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend == "auto":
        # e.g. CUDA builds of torch without triton (Windows): the torch backend computes the same function
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if backend == "triton" and not triton_installed():
        raise ValueError("backend='triton' needs the triton package (pip install triton); "
                         "backend='torch' computes the same function without it")
    if backend == "triton" and device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {device}; on the CPU the Triton "
            "kernels run only under the interpreter: set TRITON_INTERPRET=1 before importing triton"
        )
    return backend


SCHEDULES = ("two-pass", "single-pass")
SINGLE_PASS_DTYPES = (torch.float32, torch.bfloat16)  # float16's scaled dl would differ per token chunk


def schedule() -> str:
    """How the Triton backend orders the loss's work (env ``RLPLUS_SCHEDULE``): "two-pass" (default: the
    forward's log-sum-exp, then the backward's recompute) or "single-pass" (kernels/single_pass.py)."""
    value = environment_variable("RLPLUS_SCHEDULE", "two-pass")
    if value not in SCHEDULES:
        raise ValueError(f"RLPLUS_SCHEDULE (schedule) must be one of {SCHEDULES}, got {value!r}")
    return value


def single_pass_applies(backend: str, shard, hidden: torch.Tensor, needs_grad) -> bool:
    """Whether rlplus_loss takes the single-pass schedule: asked for, on the Triton backend, a single
    shard, float32 or bfloat16, and a gradient wanted (without one the two-pass forward is the whole work).
    A bfloat16 head also needs fp32 products from cuBLAS: without them (torch < 2.8 on CUDA) each slice's
    product would upcast the whole weight (2.5 GB at 152k x 4096)."""
    if not (schedule() == "single-pass" and backend == "triton" and shard is None
            and hidden.dtype in SINGLE_PASS_DTYPES and any(needs_grad)):
        return False
    from ..kernels.cublas import fp32_products_supported

    return hidden.dtype == torch.float32 or fp32_products_supported(hidden.device)


def linear_logprobs_op(backend: str, shard=None):
    """The differentiable (hidden, weight, bias, targets, options) -> (logp, entropy | None) op.

    With a vocabulary-parallel `shard` (`distributed.VocabShard`), weight and bias are this rank's
    shard (docs/distributed.md).
    """
    if backend == "triton" and shard is None:
        from .triton_op import triton_linear_logprobs  # a custom op: opaque to torch.compile

        def triton_op(hidden, weight, bias, targets, options):
            return triton_linear_logprobs(hidden, weight, bias, targets, temperature=options.temperature,
                                          ignore_index=options.ignore_index, with_entropy=options.with_entropy)

        return triton_op
    from .autograd import LinearLogprobsFunction

    def op(hidden, weight, bias, targets, options):
        raw_ops = linear_logprobs_raw_ops(backend, options)
        outputs = LinearLogprobsFunction.apply(hidden, weight, bias, targets, options, raw_ops, shard)
        return outputs if options.with_entropy else (outputs, None)

    return op


def linear_logprobs_raw_ops(backend: str, options: LogprobsOptions):
    """CONTRACT.md's raw (forward, backward) pair of a backend, as custom ops, with its options bound.

    Both take exactly the contract's arguments (incl. `vocab_start`); `LinearLogprobsFunction` is
    written against this pair only.
    """
    from . import raw_ops

    bound = dict(backend=backend, chunk_tokens=options.chunk_tokens, chunk_vocab=options.chunk_vocab)
    return functools.partial(raw_ops.forward, **bound), functools.partial(raw_ops.backward, **bound)
