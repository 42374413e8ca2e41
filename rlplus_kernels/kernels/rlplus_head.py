"""The per-token RL-PLUS head (SPEC.md section 1) in one Triton kernel: loss terms and d loss / d logp.

Exact computation, per token t with aggregation weight a_t (0 outside the loss, see
``head.aggregation_weights``), o_t = old_logprobs or logp (detached)::

    on-policy  r = exp(clamp(logp - o, -20, 20));  l = -A r
               l = max(l, -A clamp(r, 1 - eps_low, 1 + eps_high))        (a None bound is not applied)
               l = min(l, -A c)  where A < 0                              (dual clip c)
    external   log w = logp - logaddexp(o, log pw) + log 2,  pw = b or (e^o + 1) / 2
               w = min(exp(min(log w, 20)), mis_clip_max);  C = max(0, 1 - e^logp)^gamma (detached)
               l = -w A C
    all        l += kl_coef (e^x - x - 1),  x = q - logp    past x = 20 its tangent there
                                                              (a series near 0: head.k3_kl)
    outputs    weighted_loss = a (l - entropy_coef H),   dloss_dlogp = a dl/dlogp

The loss is ``weighted_loss.sum()``; d loss / d H = -entropy_coef a needs no kernel. Where the function
has a kink, this kernel and the torch head (``head.per_token_terms``) take the same derivative, on every
torch: a clamp passes the gradient at its bounds (``head.clamp``; torch.clamp's own convention until
2.14), and ``torch.minimum`` / ``maximum`` split it between equal arguments.
"""

# No `from __future__ import annotations`: triton 3.0's interpreter finds constexpr parameters
# only by annotation objects, not by the string "tl.constexpr".
import torch

import triton
import triton.language as tl

from .. import head
from ._config import LAUNCH_OPTIONS, on_tensor_device
from .tl_utils import nan_maximum, nan_minimum

# globals a @triton.jit function reads must be constexpr
LOG_RATIO_CLAMP = tl.constexpr(head.LOG_RATIO_CLAMP)
LOG_2 = tl.constexpr(head.LOG_2)
KL_SERIES_BELOW = tl.constexpr(head.KL_SERIES_BELOW)
KL_SERIES_DEGREE = tl.constexpr(head.KL_SERIES_DEGREE)
# 512: at 1024 tokens per program (4 warps) triton 3.6, the GPU image's, spills one register on sm_90
# with the old log-probs and the KL term (scripts/check_kernels.py); triton 3.9 does not
BLOCK = 512
# Rows of the per-token statistics that the metrics average (order of `stats`).
STAT_NAMES = ("ratio", "clipped", "mis_weight", "explore", "kl")


@triton.jit
def _logaddexp(a, b):
    hi = nan_maximum(a, b)
    lo = nan_minimum(a, b)
    # log(e^a + e^b) without overflow; an infinite hi is the sum (two -inf give -inf and a +inf gives +inf,
    # as torch.logaddexp, where lo - hi would be inf - inf)
    return tl.where(tl.abs(hi) == float("inf"), hi, hi + tl.log(1.0 + tl.exp(lo - hi)))


@triton.jit
def _k3_kl(x):
    """(e^x - x - 1, its derivative e^x - 1), accurate near 0, past LOG_RATIO_CLAMP the tangent there: head.k3_kl."""
    near = tl.abs(x) < KL_SERIES_BELOW
    x_near = tl.where(near, x, 0.0)
    series = tl.full(x.shape, 1.0, x.dtype)
    for k in tl.static_range(KL_SERIES_DEGREE, 2, -1):
        series = 1.0 + x_near / k * series
    beyond = x > LOG_RATIO_CLAMP
    x_exact = tl.where(beyond, LOG_RATIO_CLAMP, x)
    e = tl.exp(x_exact)
    exact = tl.where(near, x_near * x_near / 2.0 * series, e - x_exact - 1.0)
    # e^x - 1 near 0 as x + (e^x - x - 1): no cancellation (|x| dominates); elsewhere e^x - 1 is at least 0.39
    slope = tl.where(near, x_near + exact, e - 1.0)
    return exact + tl.where(beyond, slope * (x - x_exact), 0.0), slope


@triton.jit
def _rlplus_head_fwd_kernel(
    # pointers ([N] unless said)
    # (float tensors share one dtype, float32 or float64, in which the kernel computes)
    logp_ptr,  # log p of the target
    entropy_ptr,  # entropy, or None
    advantages_ptr,  # advantages, 0 outside the loss
    old_ptr,  # old log-probs, or None (then o = logp)
    external_ptr,  # bool, or None (no external token)
    behavior_ptr,  # log pw, or None (then the estimator (e^o + 1) / 2)
    ref_ptr,  # reference log-probs, or None (only read with HAS_KL)
    agg_weight_ptr,  # aggregation weights, exactly 0 outside the loss
    coef_ptr,  # float32 [7] (head.head_scalars): kl_coef, entropy_coef, ratio_low, ratio_high, dual_clip, gamma,
    #            mis_clip_max; read, not passed: a schedule changes them without a recompile
    weighted_loss_ptr,  # out: a (l - entropy_coef H)
    dloss_dlogp_ptr,  # out: a dl/dlogp
    stats_ptr,  # [5, N] out: ratio, clipped (0/1), mis_weight, explore, kl
    # shapes
    N,
    # meta-parameters: which optional inputs are present (HAS_ENTROPY: the entropy term; HAS_KL: the KL term)
    HAS_ENTROPY: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_EXTERNAL: tl.constexpr,
    HAS_BEHAVIOR: tl.constexpr,
    HAS_KL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program = BLOCK tokens. Pointers as listed; every [N] tensor is contiguous. An option that is off
    is an infinite bound in coef_ptr, which leaves the loss and its derivative as if it were not applied."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0)
    adv = tl.load(advantages_ptr + offs, mask=mask, other=0.0)
    agg = tl.load(agg_weight_ptr + offs, mask=mask, other=0.0)
    valid = agg != 0.0
    ratio_low = tl.load(coef_ptr + 2)  # 1 - clip_eps_low, or -inf
    ratio_high = tl.load(coef_ptr + 3)  # 1 + clip_eps_high, or +inf
    dual_clip = tl.load(coef_ptr + 4)  # or +inf
    if HAS_OLD:
        old = tl.load(old_ptr + offs, mask=mask, other=0.0)
    else:
        old = logp

    # On-policy: clipped PPO/GRPO surrogate and its derivative (r' = r inside the log-ratio clamp).
    log_ratio = logp - old
    ratio = tl.exp(nan_minimum(nan_maximum(log_ratio, -LOG_RATIO_CLAMP), LOG_RATIO_CLAMP))
    d_ratio = tl.where((log_ratio >= -LOG_RATIO_CLAMP) & (log_ratio <= LOG_RATIO_CLAMP), ratio, 0.0)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * nan_minimum(nan_maximum(ratio, ratio_low), ratio_high)
    # where the clipped term is larger its derivative is 0 (ratio outside the bounds); ties give
    # equal derivatives (inside the bounds, or A = 0)
    clipped = loss_clipped > loss_unclipped
    loss = nan_maximum(loss_unclipped, loss_clipped)
    d_loss = tl.where(clipped, 0.0, -adv * d_ratio)
    # dual clip, A < 0 only; torch.minimum gives each of two equal arguments half the gradient.
    # The product takes a positive factor in every lane: A = 0 times an infinite (absent) dual clip
    # would be a NaN, discarded, but raised as a warning by the interpreter
    floor = tl.where(adv < 0, tl.where(adv < 0, -adv, 1.0) * dual_clip, float("inf"))
    d_loss = tl.where(loss > floor, 0.0, tl.where(loss == floor, 0.5 * d_loss, d_loss))
    loss = nan_minimum(loss, floor)

    # External: MIS weight times the exploration coefficient (RL-PLUS eqs. for MIS and EBA).
    mis_weight = tl.zeros_like(logp)
    explore = tl.zeros_like(logp)
    if HAS_EXTERNAL:
        external = tl.load(external_ptr + offs, mask=mask, other=0) != 0
        gamma = tl.load(coef_ptr + 5)
        mis_clip_max = tl.load(coef_ptr + 6)  # or +inf
        if HAS_BEHAVIOR:
            log_pw = tl.load(behavior_ptr + offs, mask=mask, other=0.0)
        else:
            log_pw = _logaddexp(old, tl.zeros_like(logp)) - LOG_2
        log_w = logp - _logaddexp(old, log_pw) + LOG_2
        mis_weight = tl.exp(nan_minimum(log_w, LOG_RATIO_CLAMP))
        d_mis_weight = tl.where((log_w <= LOG_RATIO_CLAMP) & (mis_weight <= mis_clip_max), mis_weight, 0.0)
        mis_weight = nan_minimum(mis_weight, mis_clip_max)
        base = nan_maximum(1.0 - tl.exp(logp), 0.0)
        # base ** gamma as torch.pow: x ** 0 = 1 for every x (0 and NaN included), 1 ** gamma = 1 (also for a gamma
        # beyond float32, inf here: not inf * log 1 = NaN), 0 ** gamma = 0, NaN ** gamma = NaN
        in_between = (base > 0.0) & (base < 1.0)
        # (gamma == 0) | block: triton 3.9's interpreter cannot OR a scalar with a block, hence two wheres
        explore = tl.where(gamma == 0.0, 1.0, tl.where(
            base == 1.0, 1.0, tl.where(in_between, tl.exp(gamma * tl.log(tl.where(in_between, base, 0.5))),
                                       tl.where(base == 0.0, 0.0, base))))
        loss = tl.where(external, -mis_weight * adv * explore, loss)
        d_loss = tl.where(external, -d_mis_weight * adv * explore, d_loss)

    kl = tl.zeros_like(logp)
    if HAS_KL:  # k3 estimator of KL(pi_theta || pi_ref)
        ref = tl.load(ref_ptr + offs, mask=mask, other=0.0)
        kl_coef = tl.load(coef_ptr)
        kl, d_kl = _k3_kl(ref - logp)
        loss += kl_coef * kl
        d_loss -= kl_coef * d_kl  # d x / d logp = -1

    if HAS_ENTROPY:
        loss -= tl.load(coef_ptr + 1) * tl.load(entropy_ptr + offs, mask=mask, other=0.0)
    # tokens outside the loss contribute exactly 0, whatever their (unused) inputs hold
    tl.store(weighted_loss_ptr + offs, tl.where(valid, agg * loss, 0.0), mask=mask)
    tl.store(dloss_dlogp_ptr + offs, tl.where(valid, agg * d_loss, 0.0), mask=mask)
    row = tl.cast(N, tl.int64)  # the [5, N] stats: 4 * N passes 2^31 from 2^29 tokens (N may be constexpr 1)
    tl.store(stats_ptr + offs, ratio, mask=mask)
    tl.store(stats_ptr + row + offs, clipped.to(logp.dtype), mask=mask)
    tl.store(stats_ptr + 2 * row + offs, mis_weight, mask=mask)
    tl.store(stats_ptr + 3 * row + offs, explore, mask=mask)
    tl.store(stats_ptr + 4 * row + offs, kl, mask=mask)


@on_tensor_device
def rlplus_head_forward(logp, entropy, advantages, old_logprobs, external, behavior_logprobs, ref_logprobs,
                        agg_weight, coefs):
    """(weighted_loss [N], dloss_dlogp [N], stats [5, N]) of the kernel, in logp's dtype (float32 or float64).

    Float inputs are [N] tensors of logp's dtype; optional ones may be None: `entropy` where the loss has
    an entropy term (entropy_coef != 0), `ref_logprobs` where it has a KL term (kl_coef > 0); `external` is
    bool. `coefs`: the float hyper-parameters, float32 [7] on logp's device (`head.head_scalars`).
    """
    n = logp.shape[0]
    weighted_loss = torch.empty_like(logp)
    dloss_dlogp = torch.empty_like(weighted_loss)
    stats = logp.new_empty(len(STAT_NAMES), n)
    if n == 0:
        return weighted_loss, dloss_dlogp, stats
    contiguous = lambda x: None if x is None else x.contiguous()  # noqa: E731
    _rlplus_head_fwd_kernel[(triton.cdiv(n, BLOCK),)](
        logp.contiguous(), contiguous(entropy), advantages.contiguous(), contiguous(old_logprobs),
        contiguous(external), contiguous(behavior_logprobs), contiguous(ref_logprobs), agg_weight.contiguous(),
        coefs, weighted_loss, dloss_dlogp, stats,
        n,
        HAS_ENTROPY=entropy is not None,
        HAS_OLD=old_logprobs is not None,
        HAS_EXTERNAL=external is not None,
        HAS_BEHAVIOR=behavior_logprobs is not None,
        HAS_KL=ref_logprobs is not None,
        BLOCK=BLOCK,
        **LAUNCH_OPTIONS,
    )
    return weighted_loss, dloss_dlogp, stats
