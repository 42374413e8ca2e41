"""The Triton per-token RL head as a PyTorch custom op, ``rlplus::rlplus_head`` (opaque to torch.compile).

Forward: one kernel (kernels/rlplus_head.py) gives each token's weighted loss a (l - entropy_coef H),
its derivative a dl/dlogp and the statistics of the metrics. Backward: grad_logp = g dloss_dlogp and
grad_entropy = -entropy_coef a g, where g is the upstream gradient of the weighted losses.

The float hyper-parameters reach the op as one device tensor (`head.head_scalars`), not as floats: a float
argument of a custom op is a constant of a compiled graph, so a coefficient or clip-range schedule (an adaptive
KL controller sets a new coefficient every step) would recompile the step at every value.
"""

# No `from __future__ import annotations` here: torch 2.4's custom_op needs the annotations
# as objects (it rejects "Tensor" as a string).
from typing import Optional

import torch
from torch import Tensor

from ..config import RLPlusConfig
from ..head import PerTokenTerms, TokenBatch, head_scalars


@torch.library.custom_op("rlplus::rlplus_head", mutates_args=())
def _rlplus_head_op(
    logp: Tensor,
    entropy: Optional[Tensor],
    advantages: Tensor,
    old_logprobs: Optional[Tensor],
    external: Optional[Tensor],
    behavior_logprobs: Optional[Tensor],
    ref_logprobs: Optional[Tensor],
    agg_weight: Tensor,
    coefs: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    from rlplus_kernels.kernels.rlplus_head import rlplus_head_forward  # lazy: imports triton

    return rlplus_head_forward(
        logp, entropy, advantages, old_logprobs, external, behavior_logprobs, ref_logprobs, agg_weight, coefs)


@_rlplus_head_op.register_fake
def _(logp, entropy, advantages, old_logprobs, external, behavior_logprobs, ref_logprobs, agg_weight, coefs):
    n = logp.shape[0]
    return logp.new_empty(n), logp.new_empty(n), logp.new_empty(5, n)


def _setup_context(ctx, inputs, output):
    entropy, agg_weight, coefs = inputs[1], inputs[7], inputs[8]
    _, dloss_dlogp, stats = output
    ctx.save_for_backward(dloss_dlogp, agg_weight, coefs)
    ctx.has_entropy = entropy is not None
    ctx.mark_non_differentiable(dloss_dlogp, stats)


def _backward(ctx, grad_weighted_loss, _grad_dloss_dlogp, _grad_stats):
    dloss_dlogp, agg_weight, coefs = ctx.saved_tensors
    grad_logp = grad_weighted_loss * dloss_dlogp
    grad_entropy = None
    if ctx.has_entropy and ctx.needs_input_grad[1]:  # the coefficient the forward's loss used (float32)
        grad_entropy = grad_weighted_loss * agg_weight * -coefs[1]
    return (grad_logp, grad_entropy) + (None,) * 7


torch.library.register_autograd("rlplus::rlplus_head", _backward, setup_context=_setup_context)


def head_inputs(batch: TokenBatch, config: RLPlusConfig, agg_weight: Tensor, dtype: torch.dtype) -> tuple:
    """The head kernel's arguments after (logp, entropy), in the order of ``rlplus::rlplus_head``: per-token
    tensors (float ones in `dtype`, the log-probs'), then the float hyper-parameters as float32 `head_scalars`."""
    as_logp = lambda x: None if x is None else x.to(dtype)  # noqa: E731  (float32, or float64 in tests)
    return (
        as_logp(batch.advantages), as_logp(batch.old_logprobs), batch.external, as_logp(batch.behavior_logprobs),
        as_logp(batch.ref_logprobs) if config.kl_coef > 0 else None, as_logp(agg_weight),
        head_scalars(config, agg_weight, torch.float32),
    )


def terms_from_stats(stats: Tensor, batch: TokenBatch, config: RLPlusConfig) -> PerTokenTerms:
    """PerTokenTerms (without `loss`) from the head kernel's [5, N] statistics."""
    ratio, clipped, mis_weight, explore, kl = stats.unbind(0)
    external = batch.external is not None
    return PerTokenTerms(loss=None, ratio=ratio, clipped=clipped != 0,
                         mis_weight=mis_weight if external else None, explore=explore if external else None,
                         kl=kl if config.kl_coef > 0 else None)


def triton_head_terms(logp: Tensor, entropy: Optional[Tensor], batch: TokenBatch, config: RLPlusConfig,
                      agg_weight: Tensor):
    """(weighted_loss [N], PerTokenTerms without `loss`) through the Triton head, in logp's dtype.

    `weighted_loss.sum()` is the loss; its gradient reaches `logp` and `entropy` through the op.
    """
    head_entropy = entropy.to(logp.dtype) if entropy is not None and config.entropy_coef != 0 else None
    weighted_loss, _, stats = torch.ops.rlplus.rlplus_head(logp, head_entropy,
                                                           *head_inputs(batch, config, agg_weight, logp.dtype))
    return weighted_loss, terms_from_stats(stats, batch, config)
