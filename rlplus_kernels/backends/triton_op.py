"""The Triton backend as PyTorch custom ops (torch.compile(fullgraph=True) sees them as opaque).

Ops (namespace ``rlplus``):
- ``rlplus::linear_logprobs_fwd`` / ``rlplus::linear_logprobs_bwd``: CONTRACT.md's raw pair, with
  ``vocab_start`` for vocabulary parallelism (the caller merges partials across ranks). No
  autograd on these: the caller's own autograd owns the merge.
- ``rlplus::linear_logprobs``: single shard, differentiable; returns (logp, entropy, lse) with
  ``register_autograd`` whose backward calls ``rlplus::linear_logprobs_bwd``.

Custom ops cannot return None: an absent tensor travels as an empty tensor and is converted back.
Triton (``rlplus_kernels.kernels``) is imported only when an op runs on real tensors.
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op needs the annotations
# as objects (it rejects "Tensor" as a string).
from typing import Optional

import torch
from torch import Tensor


def _kernels():
    from rlplus_kernels import kernels  # lazy: imports triton

    return kernels


def _none_if_empty(x: Tensor, present: bool) -> Optional[Tensor]:
    return x if present else None


# --------------------------------------------------------------------------- raw forward
@torch.library.custom_op("rlplus::linear_logprobs_fwd", mutates_args=())
def _linear_logprobs_fwd_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    temperature: float,
    ignore_index: int,
    vocab_start: int,
    with_entropy: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    lse, target_logit, sum_pz = _kernels().linear_logprobs_forward(
        hidden, weight, bias, targets,
        temperature=temperature, ignore_index=ignore_index, vocab_start=vocab_start, with_entropy=with_entropy,
    )
    if sum_pz is None:
        sum_pz = lse.new_empty((0,))
    return lse, target_logit, sum_pz


@_linear_logprobs_fwd_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, vocab_start, with_entropy):
    n = hidden.shape[0]
    f = lambda k: hidden.new_empty((k,), dtype=torch.float32)  # noqa: E731
    return f(n), f(n), f(n if with_entropy else 0)


# --------------------------------------------------------------------------- raw backward
@torch.library.custom_op("rlplus::linear_logprobs_bwd", mutates_args=())
def _linear_logprobs_bwd_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    grad_logp: Optional[Tensor],
    grad_entropy: Optional[Tensor],
    temperature: float,
    ignore_index: int,
    vocab_start: int,
    needs_hidden: bool,
    needs_weight: bool,
    needs_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    gh, gw, gb = _kernels().linear_logprobs_backward(
        hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
        temperature=temperature, ignore_index=ignore_index, vocab_start=vocab_start,
        needs_grad=(needs_hidden, needs_weight, needs_bias),
    )
    empty = hidden.new_empty((0,))
    return (
        gh if gh is not None else empty,
        gw if gw is not None else empty.clone(),
        gb if gb is not None else empty.clone(),
    )


@_linear_logprobs_bwd_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
      temperature, ignore_index, vocab_start, needs_hidden, needs_weight, needs_bias):
    needs_bias = needs_bias and bias is not None
    return (
        hidden.new_empty(hidden.shape if needs_hidden else (0,)),
        hidden.new_empty(weight.shape if needs_weight else (0,)),
        hidden.new_empty((weight.shape[0],) if needs_bias else (0,)),
    )


def forward(hidden, weight, bias, targets, *, temperature: float, ignore_index: int,
            vocab_start: int = 0, with_entropy: bool):
    """CONTRACT.md forward through the custom op: (lse, target_logit, sum_pz | None)."""
    lse, target_logit, sum_pz = torch.ops.rlplus.linear_logprobs_fwd(
        hidden, weight, bias, targets, float(temperature), int(ignore_index), int(vocab_start), bool(with_entropy)
    )
    return lse, target_logit, _none_if_empty(sum_pz, with_entropy)


def backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, *,
             temperature: float, ignore_index: int, vocab_start: int = 0, needs_grad=(True, True, True)):
    """CONTRACT.md backward through the custom op: (grad_hidden | None, grad_weight | None, grad_bias | None)."""
    nh, nw, nb = (bool(x) for x in needs_grad)
    nb = nb and bias is not None
    gh, gw, gb = torch.ops.rlplus.linear_logprobs_bwd(
        hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
        float(temperature), int(ignore_index), int(vocab_start), nh, nw, nb,
    )
    return _none_if_empty(gh, nh), _none_if_empty(gw, nw), _none_if_empty(gb, nb)


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
    from rlplus_kernels.kernels.linear_logprobs_fwd import linear_logprobs_forward_parts

    lse, target_logit, _, entropy = linear_logprobs_forward_parts(
        hidden, weight, bias, targets,
        temperature=temperature, ignore_index=ignore_index, vocab_start=0, with_entropy=with_entropy,
    )
    valid = targets != ignore_index
    logp = torch.where(valid, target_logit - lse, 0.0)
    if with_entropy:
        # entropy = log S - T/S from the merged partials (no lse - sum_pz cancellation)
        entropy = torch.where(valid, entropy, 0.0)
    else:
        entropy = lse.new_empty((0,))
    return logp, entropy, lse


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
        ctx.temperature, ctx.ignore_index, 0, nh, nw, nb,
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

    logp = target_logit - lse and entropy = lse - sum_pz (computed as log S - T/S); gradients
    flow into hidden, weight and bias for any upstream gradient of either output, and only the
    gradients that autograd asks for are computed.
    """
    logp, entropy, _ = torch.ops.rlplus.linear_logprobs(
        hidden, weight, bias, targets, float(temperature), int(ignore_index), bool(with_entropy)
    )
    return logp, (entropy if with_entropy else None)
