"""The public functions and module: validation, autocast, backend dispatch, then the shared head."""

from __future__ import annotations

import dataclasses
from typing import Dict, NamedTuple, Optional

import torch
from torch import nn

from .backends import LogprobsOptions, linear_logprobs_op, resolve_backend, single_pass_applies
from .backends.common import compute_dtype
from .config import SEQ_AGG_MODES, RLPlusConfig
from .distributed import checked_on_every_rank, vocab_layout, vocab_shard
from .head import TokenBatch, rlplus_head, sequence_layout
from .validation import (check_cu_seqlens, check_head_tensors, check_kl_inputs, check_normalizer,
                         check_normalizer_value, check_per_token, check_target_range, check_targets,
                         require_tensor, shape_text)


class RLPlusOutput(NamedTuple):
    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: Optional[torch.Tensor]
    metrics: Dict[str, torch.Tensor]


def _autocast_head(hidden, weight, bias):
    """Inside torch.autocast, cast like nn.Linear would; outside, leave the dtypes to validation."""
    device_type = hidden.device.type
    # meta has no autocast (torch raises; torch.amp.is_autocast_available breaks torch 2.11's dynamo graph):
    # validation names its device
    if device_type == "meta" or not torch.is_autocast_enabled(device_type):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(x):  # autocast leaves float64 alone: its eligible inputs are the other floating dtypes
        return x if x is None or not x.is_floating_point() or x.dtype == torch.float64 else x.to(dtype)
    return cast(hidden), cast(weight), cast(bias)


def _prepare_head(hidden, weight, bias, targets, config: RLPlusConfig):
    """Validated, autocast head tensors (targets: type and shape; their range in `_vocabulary_shard`), the
    backend name and the op options."""
    require_tensor("hidden", hidden)
    require_tensor("weight", weight)
    if bias is not None:
        require_tensor("bias", bias)
    hidden, weight, bias = _autocast_head(hidden, weight, bias)
    backend = resolve_backend(config.backend, hidden.device)
    check_head_tensors(hidden, weight, bias, backend=backend)
    targets = check_targets(targets, hidden)
    options = LogprobsOptions(temperature=float(config.temperature), ignore_index=config.ignore_index,
                              with_entropy=config.with_entropy,
                              chunk_tokens=config.chunk_tokens, chunk_vocab=config.chunk_vocab)
    return hidden, weight, bias, targets, backend, options


def _config_and_head(hidden, weight, bias, targets, **hyper_parameters):
    """(config, *_prepare_head(...)): `linear_logprobs`' checks."""
    config = RLPlusConfig(**hyper_parameters)
    return (config, *_prepare_head(hidden, weight, bias, targets, config))


def _vocabulary_shard(hidden, weight, targets, config: RLPlusConfig, vocab_parallel_group):
    """This rank's shard (None without a group: weight is the whole head), exchanged once every check of this
    rank passed (`distributed.checked_on_every_rank`), and the targets' range in the whole vocabulary."""
    shard = None if vocab_parallel_group is None else vocab_shard(
        weight.shape[0], vocab_parallel_group, vocab_layout(hidden, targets, config))
    check_target_range(targets, weight.shape[0] if shard is None else shard.vocab_size, config.ignore_index)
    return shard


def _run_op(backend, hidden, weight, bias, flat_targets, options, shard=None):
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    with torch.autocast(hidden.device.type, enabled=False):
        return linear_logprobs_op(backend, shard)(flat_hidden, weight, bias, flat_targets, options)


def linear_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                    return_entropy=False, backend="auto", chunk_tokens=None, chunk_vocab=None,
                    vocab_parallel_group=None):
    """log softmax((hidden @ weight.T + bias) / temperature)[targets], float32 (float64 for float64 inputs), 0 at
    ignored positions.

    With `return_entropy`, also the entropy of each token's distribution. Differentiable with respect
    to hidden, weight and bias; under torch.no_grad() it is the memory-light way to score rollouts.
    With `vocab_parallel_group`, weight/bias are this rank's vocabulary shard (docs/distributed.md).
    """
    config, hidden, weight, bias, targets, backend, options = checked_on_every_rank(
        vocab_parallel_group, _config_and_head, hidden, weight, bias, targets, temperature=temperature,
        ignore_index=ignore_index, return_entropy=return_entropy, backend=backend, chunk_tokens=chunk_tokens,
        chunk_vocab=chunk_vocab)
    shard = _vocabulary_shard(hidden, weight, targets, config, vocab_parallel_group)
    logp, entropy = _run_op(backend, hidden, weight, bias, targets.reshape(-1), options, shard)
    logp = logp.view(targets.shape)
    return (logp, entropy.view(targets.shape)) if return_entropy else logp


def _loss_inputs(config: RLPlusConfig, hidden, weight, targets, advantages, old_logprobs, external_mask,
                 behavior_logprobs, loss_mask, bias, ref_logprobs, normalizer, cu_seqlens):
    """Every check of this rank's inputs to the loss, and what the op and the head read:
    (hidden, weight, bias, targets, backend, options, batch, normalizer)."""
    hidden, weight, bias, targets, backend, options = _prepare_head(hidden, weight, bias, targets, config)
    check_cu_seqlens(cu_seqlens, targets)
    sequence_ids, num_sequences = sequence_layout(targets, cu_seqlens)
    if config.loss_agg in SEQ_AGG_MODES and sequence_ids is None:
        raise ValueError(f"loss_agg={config.loss_agg!r} needs [B, T] inputs (hidden [B, T, D]) or packed [N] inputs "
                         f"with cu_seqlens, got targets of shape {shape_text(targets.shape)} and no cu_seqlens")
    check_kl_inputs(config, ref_logprobs)
    per_sequence = dict(num_sequences=num_sequences, sequence_ids=sequence_ids)
    advantages = check_per_token("advantages", advantages, targets, kind="float", **per_sequence)
    external_mask = check_per_token("external_mask", external_mask, targets, kind="mask", **per_sequence)
    old_logprobs = check_per_token("old_logprobs", old_logprobs, targets, kind="float")
    behavior_logprobs = check_per_token("behavior_logprobs", behavior_logprobs, targets, kind="float")
    ref_logprobs = check_per_token("ref_logprobs", ref_logprobs, targets, kind="float")
    loss_mask = check_per_token("loss_mask", loss_mask, targets, kind="mask")
    normalizer = check_normalizer(normalizer, hidden.device)
    if advantages is None:
        raise TypeError("advantages must be a torch.Tensor, got None")

    dtype = compute_dtype(hidden.dtype)
    # the per-token inputs are data: gradients flow into hidden, weight and bias only (SPEC.md)
    flat = lambda x: None if x is None else x.detach().reshape(-1).to(dtype)  # noqa: E731
    valid = targets.reshape(-1) != config.ignore_index
    if loss_mask is not None:
        valid = valid & (loss_mask.reshape(-1) != 0)
    batch = TokenBatch(
        valid=valid,
        advantages=torch.where(valid, flat(advantages), torch.zeros((), dtype=dtype, device=valid.device)),
        external=None if external_mask is None else external_mask.reshape(-1) != 0,
        old_logprobs=flat(old_logprobs),
        behavior_logprobs=flat(behavior_logprobs),
        ref_logprobs=flat(ref_logprobs),
        sequence_ids=sequence_ids,
        num_sequences=num_sequences,
    )
    if isinstance(normalizer, torch.Tensor):  # data, like the per-token tensors: no gradient flows into it
        check_normalizer_value(normalizer, valid)
        normalizer = normalizer.detach().to(dtype)
    return hidden, weight, bias, targets, backend, options, batch, normalizer


def compute_rlplus_loss(config: RLPlusConfig, hidden, weight, targets, advantages, old_logprobs=None, *,
                        external_mask=None, behavior_logprobs=None, loss_mask=None, bias=None,
                        ref_logprobs=None, normalizer=None, cu_seqlens=None,
                        vocab_parallel_group=None) -> RLPlusOutput:
    """`rlplus_loss` with its hyper-parameters already gathered (and validated) in `config`."""
    hidden, weight, bias, targets, backend, options, batch, normalizer = checked_on_every_rank(
        vocab_parallel_group, _loss_inputs, config, hidden, weight, targets, advantages, old_logprobs, external_mask,
        behavior_logprobs, loss_mask, bias, ref_logprobs, normalizer, cu_seqlens)
    shard = _vocabulary_shard(hidden, weight, targets, config, vocab_parallel_group)

    # Tokens outside the loss are scored as ignored: no logits work is wasted on their gradient.
    op_targets = torch.where(batch.valid, targets.reshape(-1), config.ignore_index)
    needs_grad = [torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias)]
    if single_pass_applies(backend, shard, hidden, needs_grad):
        from .backends.single_pass_op import single_pass_loss

        with torch.autocast(hidden.device.type, enabled=False):
            loss, logp, entropy, metrics = single_pass_loss(hidden.reshape(-1, hidden.shape[-1]), weight, bias,
                                                            op_targets, batch, config, normalizer, needs_grad)
    else:
        logp, entropy = _run_op(backend, hidden, weight, bias, op_targets, options, shard)
        loss, metrics = rlplus_head(logp, entropy, batch, config, normalizer, backend=backend)
    return RLPlusOutput(
        loss=loss,
        # copies: the op saved these for the backward, which an in-place edit of an output would break
        logprobs=logp.detach().clone().view(targets.shape),
        entropy=None if entropy is None else entropy.detach().clone().view(targets.shape),
        metrics=metrics,
    )


def rlplus_loss(hidden, weight, targets, advantages, old_logprobs=None, *,
                external_mask=None, behavior_logprobs=None, loss_mask=None, bias=None,
                ref_logprobs=None, kl_coef=0.0, temperature=1.0,
                clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None,
                gamma=0.5, mis_clip_max=None, entropy_coef=0.0, return_entropy=False,
                loss_agg="token-mean", normalizer=None, ignore_index=-100,
                backend="auto", chunk_tokens=None, chunk_vocab=None, cu_seqlens=None,
                vocab_parallel_group=None) -> RLPlusOutput:
    """The RL-PLUS objective (SPEC.md) from final hidden states and the LM head, without full logits.

    Exactly `reference.rlplus_loss_reference`, which materialises `z = (hidden @ weight.T + bias) /
    temperature` and applies the clipped surrogate to on-policy tokens and the MIS weight times
    `(1 - p)^gamma` to external ones. `chunk_tokens`/`chunk_vocab` set the torch backend's chunk sizes.
    `cu_seqlens` ([S + 1] int, 0 .. N) marks the sequences of packed [N] inputs: the seq modes and [S]
    per-sequence advantages/external_mask then work without padding. With `vocab_parallel_group`,
    weight/bias are this rank's contiguous vocabulary shard (docs/distributed.md).
    """
    config = checked_on_every_rank(  # a hyper-parameter refused on one rank only, too
        vocab_parallel_group, RLPlusConfig, kl_coef=kl_coef, temperature=temperature, clip_eps_low=clip_eps_low,
        clip_eps_high=clip_eps_high, dual_clip=dual_clip, gamma=gamma, mis_clip_max=mis_clip_max,
        entropy_coef=entropy_coef, return_entropy=return_entropy, loss_agg=loss_agg, ignore_index=ignore_index,
        backend=backend, chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
    return compute_rlplus_loss(config, hidden, weight, targets, advantages, old_logprobs,
                               external_mask=external_mask, behavior_logprobs=behavior_logprobs,
                               loss_mask=loss_mask, bias=bias, ref_logprobs=ref_logprobs, normalizer=normalizer,
                               cu_seqlens=cu_seqlens, vocab_parallel_group=vocab_parallel_group)


class RLPlusLoss(nn.Module):
    """`rlplus_loss` with its hyper-parameters fixed at construction, e.g. `RLPlusLoss(**OFFICIAL_RECIPE)`.

    A `normalizer` given here is the default of `forward`'s; a `vocab_parallel_group` is used by every call.
    """

    def __init__(self, *, normalizer=None, vocab_parallel_group=None, **hyper_parameters):
        super().__init__()
        hyper_parameter_names = [field.name for field in dataclasses.fields(RLPlusConfig)]
        unknown = [name for name in hyper_parameters if name not in hyper_parameter_names]
        if unknown:
            raise TypeError(f"RLPlusLoss got unknown keyword(s) {unknown}: it takes the hyper-parameters "
                            f"{', '.join(hyper_parameter_names)}, normalizer and vocab_parallel_group; the per-batch "
                            "tensors (external_mask, loss_mask, ...) go to forward")
        self.config = RLPlusConfig(**hyper_parameters)
        if normalizer is not None:  # refused here rather than at the first forward
            check_normalizer(normalizer, None)
        self.normalizer = normalizer
        self.vocab_parallel_group = vocab_parallel_group

    def forward(self, hidden, weight, targets, advantages, old_logprobs=None, *, external_mask=None,
                behavior_logprobs=None, loss_mask=None, bias=None, ref_logprobs=None,
                normalizer=None, cu_seqlens=None) -> RLPlusOutput:
        return compute_rlplus_loss(self.config, hidden, weight, targets, advantages, old_logprobs,
                                   external_mask=external_mask, behavior_logprobs=behavior_logprobs,
                                   loss_mask=loss_mask, bias=bias, ref_logprobs=ref_logprobs,
                                   normalizer=self.normalizer if normalizer is None else normalizer,
                                   cu_seqlens=cu_seqlens, vocab_parallel_group=self.vocab_parallel_group)

    def extra_repr(self) -> str:
        fields = {**self.config.as_kwargs(), "normalizer": self.normalizer}
        return ", ".join(f"{k}={v!r}" for k, v in fields.items())
