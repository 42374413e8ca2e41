"""The single-pass schedule of the Triton backend as a PyTorch custom op, ``rlplus::rlplus_loss_single_pass``.

Its forward returns the loss with the gradients of hidden, weight and bias already formed
(kernels/single_pass.py: three GEMMs); its backward multiplies them by the loss's upstream gradient,
in place (in eager), so the graph holds each gradient once. The backward therefore runs once per
forward: a second backward (after ``retain_graph=True``) is refused, and so is ``create_graph=True`` (the
gradients carry no graph: a gradient penalty on them would silently be 0). Until the backward, the graph
holds full-size gradients of hidden, weight and bias (the weight's: its size again).
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op needs the annotations
# as objects (it rejects "Tensor" as a string).
from typing import Optional

import torch
from torch import Tensor

from ..config import RLPlusConfig
from ..head import TokenBatch, aggregation_weights, head_metrics
from .triton_head import head_inputs, terms_from_stats


def single_pass_body(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    advantages: Tensor,
    old_logprobs: Optional[Tensor],
    external: Optional[Tensor],
    behavior_logprobs: Optional[Tensor],
    ref_logprobs: Optional[Tensor],
    agg_weight: Tensor,
    coefs: Tensor,
    temperature: float,
    ignore_index: int,
    with_entropy: bool,
    entropy_term: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    from rlplus_kernels.kernels.single_pass import rlplus_loss_single_pass  # lazy: imports triton

    loss, logp, entropy, stats, gh, gw, gb = rlplus_loss_single_pass(
        hidden, weight, bias, targets, advantages, old_logprobs, external, behavior_logprobs, ref_logprobs,
        agg_weight, coefs, temperature=temperature, ignore_index=ignore_index, with_entropy=with_entropy,
        entropy_term=entropy_term, needs_grad=(need_hidden, need_weight, need_bias))
    empty = hidden.new_empty((0,))  # custom ops cannot return None: absent outputs are empty tensors
    return (loss, logp, logp.new_empty((0,)) if entropy is None else entropy, stats,
            empty if gh is None else gh, empty.clone() if gw is None else gw, empty.clone() if gb is None else gb)


_single_pass_op = torch.library.custom_op("rlplus::rlplus_loss_single_pass", mutates_args=())(single_pass_body)


@_single_pass_op.register_fake
def _(hidden, weight, bias, targets, advantages, old_logprobs, external, behavior_logprobs, ref_logprobs,
      agg_weight, coefs, temperature, ignore_index, with_entropy, entropy_term, need_hidden, need_weight, need_bias):
    n = hidden.shape[0]
    f32 = lambda *shape: hidden.new_empty(shape, dtype=torch.float32)  # noqa: E731
    # row-major like the launcher's, whatever the input's layout (a transposed weight is column-major)
    grad = lambda needed, like: like.new_empty(like.shape) if needed else hidden.new_empty((0,))  # noqa: E731
    return (f32(), f32(n), f32(n if with_entropy or entropy_term else 0), f32(5, n),
            grad(need_hidden, hidden), grad(need_weight, weight), grad(need_bias and bias is not None, bias))


def _setup_context(ctx, inputs, output):
    *_, gh, gw, gb = output
    ctx.save_for_backward(gh, gw, gb)
    ctx.needs = inputs[-3:]
    ctx.used = False
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_loss, *_unused):
    if ctx.used:
        raise RuntimeError(
            "rlplus_loss: the single-pass schedule (RLPLUS_SCHEDULE=single-pass) forms the gradients in the "
            "forward and hands them out once; it cannot backward a second time (retain_graph=True). Use the "
            "default two-pass schedule for that.")
    if torch.is_grad_enabled():  # create_graph=True: the gradients below carry no graph to differentiate
        raise NotImplementedError(
            "rlplus_loss: the single-pass schedule (RLPLUS_SCHEDULE=single-pass) forms first derivatives only, "
            "without a graph (create_graph=True); the two-pass schedule takes create_graph=True for the first "
            "derivative")
    ctx.used = True
    grads = ctx.saved_tensors
    # In eager, in place: each gradient exists once (its saved copy is dropped with the graph). A compiled
    # graph traces this with tensor subclasses and gets the out-of-place product (AOTAutograd would turn
    # the mutation of the op's outputs into a copy anyway).
    eager = all(type(t) is torch.Tensor for t in (grad_loss, *grads))
    scaled = [(g.mul_(grad_loss) if eager else g * grad_loss) if needed else None
              for g, needed in zip(grads, ctx.needs)]
    return tuple(scaled) + (None,) * 15


torch.library.register_autograd("rlplus::rlplus_loss_single_pass", _backward, setup_context=_setup_context)


def single_pass_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, batch: TokenBatch,
                     config: RLPlusConfig, normalizer, needs_grad):
    """(loss, logp, entropy | None, metrics) of the RL-PLUS objective through the single-pass op.

    hidden [N, D] and targets [N] (tokens outside the loss already ignored); `needs_grad` (hidden,
    weight, bias) as autograd will ask. The loss and metrics equal `rlplus_head`'s on the two-pass op's
    log-probs; gradients reach hidden, weight and bias only.
    """
    weights = aggregation_weights(batch, config.loss_agg, normalizer)
    loss, logp, entropy, stats, *_ = torch.ops.rlplus.rlplus_loss_single_pass(
        hidden, weight, bias, targets, *head_inputs(batch, config, weights, torch.float32),
        float(config.temperature), int(config.ignore_index), bool(config.with_entropy), config.entropy_coef != 0,
        *needs_grad)
    entropy = entropy if config.with_entropy else None
    return loss, logp, entropy, head_metrics(logp, entropy, batch, terms_from_stats(stats, batch, config))
