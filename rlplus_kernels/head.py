"""The per-token RL-PLUS head, shared by every backend (SPEC.md section 1).

It sees only `[N]` tensors: the differentiable log-probabilities (and entropies) of the targets that
a backend computed, and the per-token data of the batch. Nothing here forces a host sync.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple, Union

import torch

from .backends.common import device_scalars, widest_float
from .config import RLPlusConfig

# SPEC: r = exp(clamp(logp - o, -20, 20)) and log w <= 20. The KL term e^x - x - 1 (x = q - logp) is SPEC's up to
# x = 20 and its tangent there beyond, so that log-ratios of +-100 stay finite (exp(100) overflows float32) while
# the term still pulls log p back (a clamped x had gradient 0 past +-20).
LOG_RATIO_CLAMP = 20.0
LOG_2 = math.log(2.0)
# The k3 KL term e^x - x - 1 is summed as its series x^2/2 (1 + x/3 (1 + ... (1 + x/15))) below this |x|
# (the first term left out is below 6e-18 of the sum: exact in float64 too): e^x - x - 1 itself cancels
# near 0, where the rounding of e^x in float32 (6e-8) is 12 times a KL of 5e-9 (x = 1e-4).
KL_SERIES_BELOW = 0.5
KL_SERIES_DEGREE = 15


@dataclass
class TokenBatch:
    """Per-token data, flattened to `[N]`, in the compute dtype; `valid` = loss_mask & not ignored."""

    valid: torch.Tensor
    advantages: torch.Tensor
    external: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None
    behavior_logprobs: Optional[torch.Tensor] = None
    ref_logprobs: Optional[torch.Tensor] = None
    # The sequence of each token ([B, T] rows, or packed [N] pieces of cu_seqlens), for the seq modes
    sequence_ids: Optional[torch.Tensor] = None
    num_sequences: Optional[int] = None


def sequence_layout(targets: torch.Tensor, cu_seqlens: Optional[torch.Tensor]):
    """(sequence_ids [N] int64, num_sequences) of [B, T] targets or of packed [N] ones with cu_seqlens; else (None, None).

    One representation for both layouts, so that the seq aggregation modes have one code path.
    """
    if targets.dim() == 2:
        batch, length = targets.shape
        ids = torch.arange(batch, device=targets.device).repeat_interleave(length)
        return ids, batch
    if cu_seqlens is None:
        return None, None
    num_sequences = cu_seqlens.shape[0] - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    # output_size is known: no host sync on CUDA
    ids = torch.arange(num_sequences, device=targets.device).repeat_interleave(lengths, output_size=targets.shape[0])
    return ids, num_sequences


def segment_sum(x: torch.Tensor, sequence_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """[S] sums of x [N] over each sequence of `sequence_layout` (differentiable, no host sync)."""
    return x.new_zeros(num_sequences).index_add(0, sequence_ids, x)


def head_scalars(config: RLPlusConfig, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[7] `dtype` on `like`'s device, in the order the Triton head reads them: kl_coef, entropy_coef,
    1 - clip_eps_low, 1 + clip_eps_high, dual_clip, gamma, mis_clip_max; an absent bound is an infinite one.
    Formed on the device (`common.device_scalars`), not Python floats: torch.compile makes a float that torch.clamp,
    `**` or a custom op takes a constant of the graph, so a schedule of any of these (an adaptive KL coefficient,
    an annealed clip range) would recompile at every value. Each value is rounded to `dtype`, and the clip bounds
    are formed from the rounded eps in `dtype` (1 - eps on the host made torch 2.11 specialise eps again)."""
    inf = math.inf
    kl_coef, entropy_coef, eps_low, eps_high, dual_clip, gamma, mis_clip_max = device_scalars(like, (
        config.kl_coef, config.entropy_coef,
        inf if config.clip_eps_low is None else config.clip_eps_low,  # 1 - inf: no lower bound
        inf if config.clip_eps_high is None else config.clip_eps_high,
        inf if config.dual_clip is None else config.dual_clip, config.gamma,
        inf if config.mis_clip_max is None else config.mis_clip_max), dtype).unbind()
    return torch.stack([kl_coef, entropy_coef, 1 - eps_low, 1 + eps_high, dual_clip, gamma, mis_clip_max])


def clamp(x: torch.Tensor, low=None, high=None) -> torch.Tensor:
    """torch.clamp whose gradient passes at the bounds, on every torch: the Triton head's convention at the kinks,
    and torch.clamp's own until 2.14 (which makes it 0 at a Python-number bound, 1/2 at a tensor bound).
    Outside the bounds the gradient is 0; a NaN stays NaN."""
    clamped = torch.clamp(x, low, high)
    return torch.where(clamped == x, x, clamped)


def _masked_mean(x: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean of x over `where`, 0 over an empty set, with no host sync. Summed in `widest_float`: a float32 sum of
    log-probs of -1.5e38 was -inf, and dividing each term first made the mean of ten ones 1.0000001."""
    total = torch.where(where, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dtype=widest_float(x.device))
    return (total / where.sum().clamp(min=1)).to(x.dtype).detach()


def aggregation_weights(batch: TokenBatch, mode: str, normalizer: Union[None, float, torch.Tensor]) -> torch.Tensor:
    """[N] weights a with `loss_agg`(x) = sum_t a_t x_t (SPEC.md): every mode is linear in x; 0 outside the loss."""
    valid = batch.valid
    ones = valid.to(batch.advantages.dtype)
    if mode == "token-mean":
        weights = ones / (valid.sum().clamp(min=1) if normalizer is None else normalizer)
    elif mode == "sum":
        weights = ones if normalizer is None else ones / normalizer
    elif mode == "seq-mean-token-sum":
        weights = ones / (batch.num_sequences if normalizer is None else normalizer)
    else:  # seq-mean-token-mean: sequences without a valid token are left out
        per_sequence_count = segment_sum(valid.to(torch.int64), batch.sequence_ids, batch.num_sequences)
        if normalizer is None:
            normalizer = (per_sequence_count > 0).sum().clamp(min=1)
        weights = ones / (per_sequence_count.clamp(min=1)[batch.sequence_ids].to(ones.dtype) * normalizer)
    # a global count of 0 as the normalizer (no valid token on any rank) gives 0 here, not 0 / 0
    return torch.where(valid, weights, torch.zeros((), dtype=weights.dtype, device=weights.device))


def aggregate(x: torch.Tensor, batch: TokenBatch, weights: torch.Tensor) -> torch.Tensor:
    """sum_t a_t x_t over the valid tokens (a from `aggregation_weights`)."""
    return (torch.where(batch.valid, x, torch.zeros((), dtype=x.dtype, device=x.device)) * weights).sum()


@dataclass
class PerTokenTerms:
    """The loss term l_t of every token (differentiable in log p) and the statistics the metrics average."""

    loss: Optional[torch.Tensor]
    ratio: torch.Tensor
    clipped: torch.Tensor
    mis_weight: Optional[torch.Tensor] = None
    explore: Optional[torch.Tensor] = None
    kl: Optional[torch.Tensor] = None


def per_token_terms(logp: torch.Tensor, batch: TokenBatch, config: RLPlusConfig) -> PerTokenTerms:
    """SPEC.md section 1 per token, in torch (the Triton head, kernels/rlplus_head.py, is its twin)."""
    A = batch.advantages
    o = logp.detach() if batch.old_logprobs is None else batch.old_logprobs

    # tensors, not floats: a compiled step takes new values without recompiling (head_scalars)
    _, _, ratio_low, ratio_high, dual_clip, gamma, mis_clip_max = head_scalars(config, logp, logp.dtype).unbind()

    # On-policy tokens: the clipped PPO/GRPO surrogate.
    ratio = torch.exp(clamp(logp - o, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    loss_unclipped = -A * ratio
    loss_on = loss_unclipped
    if config.clip_eps_low is not None or config.clip_eps_high is not None:
        loss_on = torch.maximum(loss_unclipped, -A * clamp(ratio, ratio_low, ratio_high))
    terms = PerTokenTerms(loss=loss_on, ratio=ratio, clipped=loss_on > loss_unclipped)
    if config.dual_clip is not None:
        terms.loss = torch.where(A < 0, torch.minimum(loss_on, -A * dual_clip), loss_on)

    # External tokens: MIS weight w = p / (p_old/2 + p_omega/2) in log space, times the
    # exploration coefficient (1 - p)^gamma (RL-PLUS, arXiv 2508.00222, eqs. for MIS and EBA).
    if batch.external is not None:
        if batch.behavior_logprobs is not None:
            log_pw = batch.behavior_logprobs
        else:  # pi_omega unknown: the official estimator (p_old + 1) / 2
            log_pw = torch.logaddexp(o, torch.zeros_like(o)) - LOG_2
        log_w = logp - torch.logaddexp(o, log_pw) + LOG_2
        terms.mis_weight = torch.exp(clamp(log_w, high=LOG_RATIO_CLAMP))
        if config.mis_clip_max is not None:
            terms.mis_weight = clamp(terms.mis_weight, high=mis_clip_max)
        # a tensor exponent: torch's general pow, within an ulp of the sqrt it takes for a number 0.5
        terms.explore = torch.clamp(1 - torch.exp(logp.detach()), min=0) ** gamma
        terms.loss = torch.where(batch.external, -terms.mis_weight * A * terms.explore, terms.loss)

    if config.kl_coef > 0:  # k3 estimator of KL(pi_theta || pi_ref)
        terms.kl = k3_kl(batch.ref_logprobs - logp)
        terms.loss = terms.loss + config.kl_coef * terms.kl
    return terms


def k3_kl(x: torch.Tensor) -> torch.Tensor:
    """e^x - x - 1, accurate near 0 (KL_SERIES_BELOW), continued past LOG_RATIO_CLAMP as its tangent there;
    kernels/rlplus_head.py's twin."""
    near = x.abs() < KL_SERIES_BELOW
    # each branch sees only the x it is taken for: an overflowing unused branch would make the gradient 0 * inf
    x_near = torch.where(near, x, torch.zeros((), dtype=x.dtype, device=x.device))
    series = torch.ones_like(x)
    for k in range(KL_SERIES_DEGREE, 2, -1):
        series = 1 + x_near / k * series
    beyond = x > LOG_RATIO_CLAMP
    bound = torch.full((), LOG_RATIO_CLAMP, dtype=x.dtype, device=x.device)
    x_exact = torch.where(beyond, bound, x)
    exact = torch.where(near, x_near * x_near / 2 * series, torch.exp(x_exact) - x_exact - 1)
    # the tangent's x - 20 is 0 up to 20 (not x - x_exact: -inf - -inf is NaN at x = -inf, and NaN in the gradient)
    return exact + torch.expm1(x_exact) * (torch.where(beyond, x, bound) - bound)


def head_metrics(logp: torch.Tensor, entropy: Optional[torch.Tensor], batch: TokenBatch,
                 terms: PerTokenTerms) -> Dict[str, torch.Tensor]:
    """SPEC.md's metrics: detached means over the valid (on-policy / external) tokens, no host sync."""
    valid = batch.valid
    external = batch.external
    on_policy = valid if external is None else valid & ~external
    off_policy = torch.zeros_like(valid) if external is None else valid & external
    # one tensor per metric: a trainer may all-reduce each in place
    zero = lambda: torch.zeros((), dtype=logp.dtype, device=logp.device)  # noqa: E731
    metrics = {
        "clip_frac": _masked_mean(terms.clipped.to(logp.dtype), on_policy),
        "ratio_mean": _masked_mean(terms.ratio.detach(), on_policy),
        "mis_ratio_mean": zero() if external is None else _masked_mean(terms.mis_weight.detach(), off_policy),
        "explore_coef_mean": zero() if external is None else _masked_mean(terms.explore, off_policy),
        "logprob_mean": _masked_mean(logp.detach(), valid),
        "num_tokens": valid.sum(),
        "num_external_tokens": off_policy.sum(),
    }
    if entropy is not None:
        metrics["entropy_mean"] = _masked_mean(entropy.detach(), valid)
    if terms.kl is not None:
        metrics["kl_mean"] = _masked_mean(terms.kl.detach(), valid)
    return metrics


def rlplus_head(logp: torch.Tensor, entropy: Optional[torch.Tensor], batch: TokenBatch,
                config: RLPlusConfig, normalizer=None, backend: str = "torch"
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """(loss, metrics) from differentiable per-token log-probs (and entropies).

    `backend="triton"` computes the per-token terms and their derivatives in one Triton kernel
    (backends/triton_head.py); the aggregation weights and the metrics are shared.
    """
    weights = aggregation_weights(batch, config.loss_agg, normalizer)
    if backend == "triton":
        from .backends.triton_head import triton_head_terms

        weighted_loss, terms = triton_head_terms(logp, entropy, batch, config, weights)
        loss = weighted_loss.sum()
    else:
        terms = per_token_terms(logp, batch, config)
        loss = aggregate(terms.loss, batch, weights)
        if config.entropy_coef != 0:
            loss = loss - config.entropy_coef * aggregate(entropy, batch, weights)
    return loss, head_metrics(logp, entropy, batch, terms)
