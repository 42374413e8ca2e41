"""The Triton backend's differentiable custom op (torch.compile(fullgraph=True) sees it as opaque).

``rlplus::linear_logprobs``: single shard; returns (logp, entropy, lse) with ``register_autograd``
whose backward calls the raw ``rlplus::linear_logprobs_bwd`` of ``raw_ops.py``. Outputs absent
from the call travel as empty tensors (custom ops cannot return None).
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op needs the annotations
# as objects (it rejects "Tensor" as a string).
from typing import Optional

import torch
from torch import Tensor

from . import raw_ops  # noqa: F401  registers rlplus::linear_logprobs_bwd, which the backward calls
from .common import finish_logprobs


# --------------------------------------------------------------------------- differentiable op
@torch.library.custom_op("rlplus::linear_logprobs", mutates_args=())
def _linear_logprobs_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    from rlplus_kernels.kernels.linear_logprobs_fwd import linear_logprobs_forward

    lse, target_logit, entropy = linear_logprobs_forward(
        hidden, weight, bias, targets,
        temperature=temperature, ignore_index=ignore_index, vocab_start=0, with_entropy=with_entropy,
    )
    logp, entropy = finish_logprobs(lse, target_logit, entropy, targets, ignore_index)
    return logp, (entropy if with_entropy else lse.new_empty((0,))), lse


@_linear_logprobs_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, with_entropy):
    n = hidden.shape[0]
    f = lambda k: hidden.new_empty((k,), dtype=torch.float32)  # noqa: E731
    return f(n), f(n if with_entropy else 0), f(n)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, with_entropy = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.with_entropy = temperature, ignore_index, with_entropy
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_logp, grad_entropy, _grad_lse):
    hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
    nh, nw, nb = ctx.needs_input_grad[:3]
    nb = nb and ctx.has_bias
    if not ctx.with_entropy:
        entropy, grad_entropy = None, None
    gh, gw, gb = torch.ops.rlplus.linear_logprobs_bwd(
        hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
        ctx.temperature, ctx.ignore_index, 0, nh, nw, nb, "triton", 0, 0,
    )
    return (
        gh if nh else None,
        gw if nw else None,
        gb if nb else None,
        None, None, None, None,
    )


torch.library.register_autograd("rlplus::linear_logprobs", _backward, setup_context=_setup_context)


def triton_linear_logprobs(hidden, weight, bias, targets, *, temperature: float = 1.0,
                           ignore_index: int = -100, with_entropy: bool = False):
    """Differentiable (logp [N] f32, entropy [N] f32 | None), both 0 at ignored rows.

    logp = target_logit - lse and entropy as CONTRACT.md's forward gives it; gradients
    flow into hidden, weight and bias for any upstream gradient of either output, and only the
    gradients that autograd asks for are computed.
    """
    logp, entropy, _ = torch.ops.rlplus.linear_logprobs(
        hidden, weight, bias, targets, float(temperature), int(ignore_index), bool(with_entropy)
    )
    return logp, (entropy if with_entropy else None)
