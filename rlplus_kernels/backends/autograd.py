"""The one autograd function around a backend's raw (forward, backward) pair of CONTRACT.md.

Single device: the partials of the whole vocabulary are final. With a vocabulary-parallel shard,
the partials of this rank's shard are merged across ranks (`rlplus_kernels.distributed`) before the
log-probs are formed, and grad_hidden is summed over ranks after the backward.
"""

from __future__ import annotations

import torch

from .common import finish_logprobs


class LinearLogprobsFunction(torch.autograd.Function):
    """logp, or (logp, entropy) with `options.with_entropy`, of the targets; backward recomputes the
    logits (CONTRACT.md).

    `raw_ops` is a backend's (forward, backward) pair; with a `shard` (`distributed.VocabShard`), every
    rank of its group must call this with the same hidden, targets and options (a collective).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, options, raw_ops, shard):
        raw_forward, raw_backward = raw_ops
        group = None if shard is None else shard.group
        vocab_start = 0 if shard is None else shard.start
        # no_grad as in eager autograd.Function.forward: torch 2.4's dynamo traced it with grad on,
        # where the torch backend's torch.mm(..., out=) buffers are refused
        with torch.no_grad():
            partials = raw_forward(hidden, weight, bias, targets, temperature=options.temperature,
                                   ignore_index=options.ignore_index, vocab_start=vocab_start,
                                   with_entropy=options.with_entropy)
        if group is not None:
            from ..distributed import merge_vocab_partials

            partials = merge_vocab_partials(*partials, group=group)
        lse, target_logit, entropy = partials
        logp, entropy = finish_logprobs(lse, target_logit, entropy, targets, options.ignore_index)
        ctx.options, ctx.raw_backward, ctx.group, ctx.vocab_start = options, raw_backward, group, vocab_start
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.set_materialize_grads(False)
        # Without entropy the only output is logp: torch 2.6's dynamo fails to trace a None output
        return logp if entropy is None else (logp, entropy)

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy=None):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        options = ctx.options
        grad_hidden, grad_weight, grad_bias = ctx.raw_backward(
            hidden, weight, bias, targets, lse, entropy, grad_logp, grad_entropy,
            temperature=options.temperature, ignore_index=options.ignore_index,
            vocab_start=ctx.vocab_start, needs_grad=ctx.needs_input_grad[:3],
        )
        if ctx.group is not None and grad_hidden is not None:
            # Every shard's logits depend on every hidden row: grad_hidden is the sum of the shards' parts
            # (None on all ranks alike: the upstream gradients are the same everywhere).
            import torch.distributed as dist

            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None
