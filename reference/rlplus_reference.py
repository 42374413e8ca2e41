"""SPEC.md, line by line, in float64, with the full `tokens x vocab` logits.

Written for reading, not for speed or memory: every backend of rlplus_kernels is tested against it.
It does not validate its inputs beyond what PyTorch does; the library does that.
"""

from __future__ import annotations

import math

import torch
from torch.nn.utils.rnn import pad_sequence

from rlplus_kernels import RLPlusOutput

# SPEC: r = exp(clamp(logp - o, -20, 20)); log w capped at 20. The KL term is SPEC's e^x - x - 1 up to x = 20 and
# its tangent there beyond: not SPEC's formula, but how log-ratios of +100 give finite outputs, as SPEC asks
# (docs/SPEC.md's header)
LOG_RATIO_CLAMP = 20.0


def _logits(hidden, weight, bias, temperature, dtype):
    z = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        z = z + bias.to(dtype)
    return z / temperature


def linear_logprobs_reference(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                              return_entropy=False, backend="reference", dtype=torch.float64):
    """`dtype` is the computation's: float64 defines correct; float32 measures PyTorch's own rounding."""
    z = _logits(hidden, weight, bias, temperature, dtype)
    log_softmax = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    logp = log_softmax.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, 0.0)
    if not return_entropy:
        return logp
    entropy = torch.where(valid, -(log_softmax.exp() * log_softmax).sum(-1), 0.0)
    return logp, entropy


def _per_token(x, like):
    """A per-sequence [B] tensor broadcast to the [B, T] of `like`."""
    x = torch.as_tensor(x, device=like.device)
    return x[:, None].expand_as(like) if x.dim() == 1 and like.dim() == 2 else x


def _aggregate(x, valid, mode, normalizer):
    x = torch.where(valid, x, 0.0)
    if not bool(valid.any()):  # SPEC: no valid token at all gives 0, whatever the normalizer (a global count of 0)
        return x.sum()
    if mode == "token-mean":
        return x.sum() / (normalizer if normalizer is not None else max(int(valid.sum()), 1))
    if mode == "sum":
        return x.sum() / (normalizer if normalizer is not None else 1)
    per_seq_sum, per_seq_count = x.sum(-1), valid.sum(-1)
    if mode == "seq-mean-token-mean":
        has_tokens = per_seq_count > 0
        per_seq = torch.where(has_tokens, per_seq_sum / per_seq_count.clamp(min=1), 0.0)
        count = normalizer if normalizer is not None else max(int(has_tokens.sum()), 1)
        return per_seq.sum() / count
    if mode == "seq-mean-token-sum":
        count = normalizer if normalizer is not None else per_seq_sum.shape[0]
        return per_seq_sum.sum() / count
    raise ValueError(mode)


def _mean(x, where):
    n = int(where.sum())
    return (torch.where(where, x, 0.0).sum() / n) if n else torch.zeros((), dtype=x.dtype, device=x.device)


def _packed_as_padded(arguments: dict) -> RLPlusOutput:
    """Packed [N] inputs with cu_seqlens are, literally, the padded [S, T_max] batch: one sequence per row."""
    cu_seqlens = arguments.pop("cu_seqlens")
    lengths = torch.diff(cu_seqlens).tolist()
    num_tokens = int(cu_seqlens[-1])
    for name, pad in (("hidden", 0.0), ("targets", arguments["ignore_index"]), ("old_logprobs", 0.0),
                      ("behavior_logprobs", 0.0), ("ref_logprobs", 0.0), ("loss_mask", 0),
                      ("advantages", 0.0), ("external_mask", 0)):
        x = arguments[name]
        if x is not None and x.shape[0] == num_tokens:  # per token (an [S] tensor is per sequence already)
            arguments[name] = (pad_sequence(list(torch.split(x, lengths)), batch_first=True, padding_value=pad)
                               if lengths else x.reshape(0, 0, *x.shape[1:]))  # no sequence: [0, 0]
    out = rlplus_loss_reference(**arguments)
    device = arguments["targets"].device
    in_sequence = (torch.arange(arguments["targets"].shape[1], device=device)[None, :]
                   < torch.tensor(lengths, device=device)[:, None])
    unpad = lambda x: None if x is None else x[in_sequence]  # noqa: E731
    return out._replace(logprobs=unpad(out.logprobs), entropy=unpad(out.entropy))


def rlplus_loss_reference(hidden, weight, targets, advantages, old_logprobs=None, *,
                          external_mask=None, behavior_logprobs=None, loss_mask=None, bias=None,
                          ref_logprobs=None, kl_coef=0.0, temperature=1.0,
                          clip_eps_low=0.2, clip_eps_high=0.2, dual_clip=None,
                          gamma=0.5, mis_clip_max=None, entropy_coef=0.0, return_entropy=False,
                          loss_agg="token-mean", normalizer=None, ignore_index=-100,
                          backend="reference", dtype=torch.float64, cu_seqlens=None,
                          **unused_options) -> RLPlusOutput:
    """`dtype` is the computation's (float64 defines correct); `cu_seqlens` [S + 1] marks the sequences
    of packed [N] inputs; `unused_options` (chunk sizes, process groups) do not change the function."""
    if cu_seqlens is not None:
        arguments = {k: v for k, v in locals().items() if k != "unused_options"}
        return _packed_as_padded(arguments)
    logp, entropy = linear_logprobs_reference(hidden, weight, targets, bias=bias, temperature=temperature,
                                              ignore_index=ignore_index, return_entropy=True, dtype=dtype)
    return rlplus_loss_from_logprobs_reference(
        logp, entropy, targets, advantages, old_logprobs, external_mask=external_mask,
        behavior_logprobs=behavior_logprobs, loss_mask=loss_mask, ref_logprobs=ref_logprobs, kl_coef=kl_coef,
        clip_eps_low=clip_eps_low, clip_eps_high=clip_eps_high, dual_clip=dual_clip, gamma=gamma,
        mis_clip_max=mis_clip_max, entropy_coef=entropy_coef, return_entropy=return_entropy, loss_agg=loss_agg,
        normalizer=normalizer, ignore_index=ignore_index)


def _clamp(x, low=None, high=None):
    """A clamp whose gradient passes at its bounds, the same on every torch (2.14 made torch.clamp's 0 there)."""
    clamped = torch.clamp(x, low, high)
    return torch.where(clamped == x, x, clamped)


def _k3(x):
    """e^x - x - 1 to 5e-12 relative in float64: expm1(x) - x loses 2 eps / |x| to cancellation, so below
    |x| = 1e-4 its Taylor polynomial to x^4 (what it leaves out is x^3 / 60 of the sum, < 2e-14)."""
    small = x.abs() < 1e-4
    x_small = torch.where(small, x, 0.0)  # x^4 of a large unused x would overflow: 0 * inf in the gradient
    return torch.where(small, x_small * x_small / 2 + x_small ** 3 / 6 + x_small ** 4 / 24, torch.expm1(x) - x)


def _kl_term(x):
    """SPEC's k3 term e^x - x - 1 up to x = LOG_RATIO_CLAMP, beyond it the tangent there (finite for finite x)."""
    c = LOG_RATIO_CLAMP
    return torch.where(x > c, math.expm1(c) * (x - c) + (math.expm1(c) - c), _k3(_clamp(x, high=c)))


def rlplus_loss_from_logprobs_reference(logp, entropy, targets, advantages, old_logprobs=None, *,
                                        external_mask=None, behavior_logprobs=None, loss_mask=None,
                                        ref_logprobs=None, kl_coef=0.0, clip_eps_low=0.2, clip_eps_high=0.2,
                                        dual_clip=None, gamma=0.5, mis_clip_max=None, entropy_coef=0.0,
                                        return_entropy=False, loss_agg="token-mean", normalizer=None,
                                        ignore_index=-100) -> RLPlusOutput:
    """The RL head of SPEC.md on the targets' log-probs and entropies (the second half of the reference)."""
    dtype = logp.dtype
    with_entropy = entropy_coef != 0 or return_entropy
    valid = targets != ignore_index
    if loss_mask is not None:
        valid = valid & (loss_mask != 0)
    external = torch.zeros_like(valid) if external_mask is None else (_per_token(external_mask, valid) != 0)
    # gradients flow into the head only (SPEC section 1): the per-token inputs are data
    A = _per_token(advantages, valid).detach().to(dtype)
    o = logp.detach() if old_logprobs is None else old_logprobs.detach().to(dtype)
    if isinstance(normalizer, torch.Tensor):
        normalizer = float(normalizer)

    # On-policy tokens: the clipped PPO/GRPO surrogate (SPEC section 1).
    ratio = torch.exp(_clamp(logp - o, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    loss_unclipped = -A * ratio
    loss_on = loss_unclipped
    if clip_eps_low is not None or clip_eps_high is not None:
        low = 1 - clip_eps_low if clip_eps_low is not None else -math.inf
        high = 1 + clip_eps_high if clip_eps_high is not None else math.inf
        loss_on = torch.maximum(loss_unclipped, -A * _clamp(ratio, low, high))
    clipped = loss_on > loss_unclipped
    if dual_clip is not None:
        loss_on = torch.where(A < 0, torch.minimum(loss_on, -A * dual_clip), loss_on)

    # External tokens: Multiple Importance Sampling weight times the exploration advantage.
    if behavior_logprobs is not None:
        log_pw = behavior_logprobs.detach().to(dtype)
    else:
        log_pw = torch.log((torch.exp(o) + 1) / 2)
    log_w = logp - torch.logaddexp(o, log_pw) + math.log(2)
    w = torch.exp(_clamp(log_w, high=LOG_RATIO_CLAMP))
    if mis_clip_max is not None:
        w = _clamp(w, high=mis_clip_max)
    explore = torch.clamp(1 - torch.exp(logp.detach()), min=0) ** gamma
    loss_ext = -w * A * explore

    per_token = torch.where(external, loss_ext, loss_on)
    if kl_coef > 0:
        kl = _kl_term(ref_logprobs.detach().to(dtype) - logp)
        per_token = per_token + kl_coef * kl

    loss = _aggregate(per_token, valid, loss_agg, normalizer)
    if entropy_coef != 0:
        loss = loss - entropy_coef * _aggregate(entropy, valid, loss_agg, normalizer)

    on_policy, off_policy = valid & ~external, valid & external
    metrics = {
        "clip_frac": _mean(clipped.to(dtype), on_policy),
        "ratio_mean": _mean(ratio.detach(), on_policy),
        "mis_ratio_mean": _mean(w.detach(), off_policy),
        "explore_coef_mean": _mean(explore, off_policy),
        "logprob_mean": _mean(logp.detach(), valid),
        "num_tokens": valid.sum(),
        "num_external_tokens": off_policy.sum(),
    }
    if with_entropy:
        metrics["entropy_mean"] = _mean(entropy.detach(), valid)
    if kl_coef > 0:
        metrics["kl_mean"] = _mean(kl.detach(), valid)
    return RLPlusOutput(
        loss=loss,
        logprobs=torch.where(valid, logp.detach(), 0.0),
        entropy=torch.where(valid, entropy.detach(), 0.0) if with_entropy else None,
        metrics=metrics,
    )
