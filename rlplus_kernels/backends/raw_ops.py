"""CONTRACT.md's raw (forward, backward) pair of either backend, as PyTorch custom ops.

A custom op is opaque to torch.compile: a compiled step neither traces the Triton launchers nor
the torch backend's chunk loops, which specialise on the token count (a recompile for every new
batch size, then torch._dynamo's recompile limit error).

Ops (namespace ``rlplus``), not differentiable (a second backward raises): their caller owns
autograd (`LinearLogprobsFunction`, which also merges partials across a vocabulary-parallel group,
and the Triton backend's differentiable op in ``triton_op.py``):
- ``rlplus::linear_logprobs_fwd`` / ``rlplus::linear_logprobs_bwd``: `backend` names the
  implementation ("torch" or "triton"); `chunk_tokens` / `chunk_vocab` are the torch backend's
  chunk sizes (0: its defaults; the Triton kernels take their tiles from their config table).

Custom ops cannot return None: an absent tensor travels as an empty tensor and is converted back.
Triton (``rlplus_kernels.kernels``) is imported only when a triton op runs on real tensors.
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op needs the annotations
# as objects (it rejects "Tensor" as a string).
from typing import Optional

import torch
from torch import Tensor

from .common import compute_dtype


def _implementation(backend: str, chunk_tokens: int, chunk_vocab: int):
    """The backend's raw (forward, backward) functions, with the torch backend's chunk sizes bound."""
    if backend == "torch":
        import functools

        from . import torch_chunked

        tuning = dict(chunk_tokens=chunk_tokens or None, chunk_vocab=chunk_vocab or None)
        return functools.partial(torch_chunked.forward, **tuning), functools.partial(torch_chunked.backward, **tuning)
    from rlplus_kernels import kernels  # lazy: imports triton

    return kernels.linear_logprobs_forward, kernels.linear_logprobs_backward


def none_if_empty(x: Tensor, present: bool) -> Optional[Tensor]:
    return x if present else None


# --------------------------------------------------------------------------- raw forward
def linear_logprobs_fwd_body(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    temperature: float,
    ignore_index: int,
    vocab_start: int,
    with_entropy: bool,
    backend: str,
    chunk_tokens: int,
    chunk_vocab: int,
) -> tuple[Tensor, Tensor, Tensor]:
    raw_forward, _ = _implementation(backend, chunk_tokens, chunk_vocab)
    lse, target_logit, entropy = raw_forward(
        hidden, weight, bias, targets,
        temperature=temperature, ignore_index=ignore_index, vocab_start=vocab_start, with_entropy=with_entropy,
    )
    if entropy is None:
        entropy = lse.new_empty((0,))
    return lse, target_logit, entropy


# The bodies stay callable as plain functions: a TorchDispatchMode sees a custom op as one op, and a
# test that counts the GEMMs or allocations inside runs the body under its mode (tests/helpers.py).
_linear_logprobs_fwd_op = torch.library.custom_op("rlplus::linear_logprobs_fwd", mutates_args=())(
    linear_logprobs_fwd_body)


@_linear_logprobs_fwd_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, vocab_start, with_entropy, backend,
      chunk_tokens, chunk_vocab):
    n = hidden.shape[0]
    f = lambda k: hidden.new_empty((k,), dtype=compute_dtype(hidden.dtype))  # noqa: E731
    return f(n), f(n), f(n if with_entropy else 0)


# --------------------------------------------------------------------------- raw backward
def linear_logprobs_bwd_body(
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
    backend: str,
    chunk_tokens: int,
    chunk_vocab: int,
) -> tuple[Tensor, Tensor, Tensor]:
    _, raw_backward = _implementation(backend, chunk_tokens, chunk_vocab)
    gh, gw, gb = raw_backward(
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


_linear_logprobs_bwd_op = torch.library.custom_op("rlplus::linear_logprobs_bwd", mutates_args=())(
    linear_logprobs_bwd_body)


@_linear_logprobs_bwd_op.register_fake
def _(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
      temperature, ignore_index, vocab_start, needs_hidden, needs_weight, needs_bias, backend, chunk_tokens, chunk_vocab):
    needs_bias = needs_bias and bias is not None
    return (
        hidden.new_empty(hidden.shape if needs_hidden else (0,)),
        hidden.new_empty(weight.shape if needs_weight else (0,)),
        hidden.new_empty((weight.shape[0],) if needs_bias else (0,)),
    )


def _second_derivative(ctx, *grads):
    raise NotImplementedError(
        "rlplus_kernels computes first derivatives of the log-probabilities and entropy only: a second backward "
        "through them (a gradient taken with create_graph=True, then differentiated) is not implemented"
    )


# Without a formula, a second backward would fail with torch's advice to register one: this says why instead.
torch.library.register_autograd("rlplus::linear_logprobs_bwd", _second_derivative)


def forward(hidden, weight, bias, targets, *, temperature: float, ignore_index: int, vocab_start: int = 0,
            with_entropy: bool, backend: str, chunk_tokens: Optional[int] = None, chunk_vocab: Optional[int] = None):
    """CONTRACT.md forward through the custom op: (lse, target_logit, entropy | None)."""
    lse, target_logit, entropy = torch.ops.rlplus.linear_logprobs_fwd(
        hidden, weight, bias, targets, float(temperature), int(ignore_index), int(vocab_start), bool(with_entropy),
        backend, int(chunk_tokens or 0), int(chunk_vocab or 0),
    )
    return lse, target_logit, none_if_empty(entropy, with_entropy)


def backward(hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy, *, temperature: float,
             ignore_index: int, vocab_start: int = 0, needs_grad=(True, True, True), backend: str,
             chunk_tokens: Optional[int] = None, chunk_vocab: Optional[int] = None):
    """CONTRACT.md backward through the custom op: (grad_hidden | None, grad_weight | None, grad_bias | None)."""
    nh, nw, nb = (bool(x) for x in needs_grad)
    nb = nb and bias is not None
    gh, gw, gb = torch.ops.rlplus.linear_logprobs_bwd(
        hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
        float(temperature), int(ignore_index), int(vocab_start), nh, nw, nb,
        backend, int(chunk_tokens or 0), int(chunk_vocab or 0),
    )
    return none_if_empty(gh, nh), none_if_empty(gw, nw), none_if_empty(gb, nb)
