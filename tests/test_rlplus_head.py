"""The Triton per-token RL head (kernels/rlplus_head.py) against the shared torch head (head.py).

Both run in float64 on the same inputs, so they must compute the same function to float64 rounding,
also at the extremes (log-ratios of +-100, p = 1, gamma = 0, KL ratios of e^20) and at the kinks.
The float32 path, as the Triton backend uses it, is checked end to end against the reference in
test_backends.py.
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import NOT_HEAD, assert_close
from reference import rlplus_loss_from_logprobs_reference
from rlplus_kernels.backends import triton_installed
from rlplus_kernels.config import RLPlusConfig
from rlplus_kernels.head import TokenBatch, head_scalars, per_token_terms, rlplus_head, sequence_layout
from rlplus_kernels.kernels.rlplus_head import STAT_NAMES, rlplus_head_forward

pytestmark = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")

DEVICE = os.environ.get("RLPLUS_TEST_DEVICE", "cpu")
# The Triton head computes with float32 hyper-parameters (head_scalars), the torch head it is compared
# with is given the same values (as_the_kernel_sees): what is left is float64 evaluation order, which
# ill-conditioned terms amplify (1 - exp(logp) as logp -> 0: 5e-9 relative seen in grad_logp).
RTOL = 1e-7


@st.composite
def head_cases(draw):
    batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**31 - 1))
    config = RLPlusConfig(
        clip_eps_low=draw(st.sampled_from([0.2, None, 0.0])),
        clip_eps_high=draw(st.sampled_from([0.2, None, 0.28])),
        dual_clip=draw(st.sampled_from([None, 3.0])),
        gamma=draw(st.sampled_from([0.5, 0.0, 1.0, 2.0])),
        mis_clip_max=draw(st.sampled_from([None, 2.0])),
        kl_coef=draw(st.sampled_from([0.0, 0.05])),
        entropy_coef=draw(st.sampled_from([0.0, 0.01, -0.02])),
        loss_agg=draw(st.sampled_from(["token-mean", "sum", "seq-mean-token-mean", "seq-mean-token-sum"])),
    )
    options = dict(with_old=draw(st.booleans()), with_external=draw(st.booleans()),
                   with_behavior=draw(st.booleans()), normalizer=draw(st.sampled_from([None, 7.0, "tensor"])))
    return (batch, length), seed, config, options


def _draw_log_probs(shape, g):
    """log p in (-30, 0] with exact extremes mixed in: 0 (p = 1), -1e-8 (p rounds to 1), -100."""
    logp = -torch.rand(shape, generator=g, dtype=torch.float64) * 30
    special = torch.tensor([0.0, -1e-8, -1e-3, -100.0], dtype=torch.float64)
    pick = torch.rand(shape, generator=g) < 0.3
    return torch.where(pick, special[torch.randint(0, 4, shape, generator=g)], logp)


def build_head_case(shape, seed, config, options):
    """(logp, entropy, TokenBatch, normalizer), float64 on DEVICE; log-ratios from -100 to +100."""
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1]
    logp = _draw_log_probs((n,), g)
    shifts = torch.tensor([100.0, -100.0, 25.0, -25.0, 0.0], dtype=torch.float64)
    shift = torch.where(torch.rand(n, generator=g) < 0.3, shifts[torch.randint(0, 5, (n,), generator=g)],
                        0.5 * torch.randn(n, generator=g, dtype=torch.float64))
    valid = torch.rand(n, generator=g) < 0.8
    sequence_ids, num_sequences = sequence_layout(torch.zeros(shape, dtype=torch.long), None)
    batch = TokenBatch(
        valid=valid,
        advantages=torch.where(valid, torch.randn(n, generator=g, dtype=torch.float64) * 2, 0.0),
        external=(torch.rand(n, generator=g) < 0.5) if options["with_external"] else None,
        old_logprobs=(logp - shift).clamp(max=0) if options["with_old"] else None,
        behavior_logprobs=_draw_log_probs((n,), g) if options["with_behavior"] else None,
        ref_logprobs=(logp + shift.flip(0)).clamp(max=0) if config.kl_coef > 0 else None,
        sequence_ids=sequence_ids, num_sequences=num_sequences,
    )
    entropy = torch.rand(n, generator=g, dtype=torch.float64) * 5
    normalizer = torch.tensor(11.0, dtype=torch.float64) if options["normalizer"] == "tensor" else options["normalizer"]
    return logp.to(DEVICE), entropy.to(DEVICE), on_device(batch), normalizer


def on_device(batch: TokenBatch) -> TokenBatch:
    return TokenBatch(**{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in vars(batch).items()})


def as_the_kernel_sees(config: RLPlusConfig) -> RLPlusConfig:
    """config with the float32 hyper-parameters the Triton head computes with (head_scalars); the clip bounds are
    fl32(1 - fl32(eps)), and 1 - (1 - fl32(1 - fl32(eps))) is that bound exactly in float64."""
    kernel_float = lambda x: torch.tensor(x, dtype=torch.float64).float().item()  # noqa: E731  (inf beyond)
    rounded = lambda x: None if x is None else kernel_float(x)  # noqa: E731
    return dataclasses.replace(
        config,
        clip_eps_low=(None if config.clip_eps_low is None
                      else 1 - kernel_float(1 - kernel_float(config.clip_eps_low))),
        clip_eps_high=(None if config.clip_eps_high is None
                       else kernel_float(1 + kernel_float(config.clip_eps_high)) - 1),
        dual_clip=rounded(config.dual_clip), gamma=kernel_float(config.gamma),
        mis_clip_max=rounded(config.mis_clip_max), kl_coef=kernel_float(config.kl_coef),
        entropy_coef=kernel_float(config.entropy_coef))


def run_head(backend, logp, entropy, batch, config, normalizer, upstream):
    """The torch head runs with the hyper-parameters the Triton head sees (as_the_kernel_sees)."""
    if backend == "torch":
        config = as_the_kernel_sees(config)
    logp = logp.clone().requires_grad_()
    entropy = entropy.clone().requires_grad_()
    loss, metrics = rlplus_head(logp, entropy, batch, config, normalizer, backend=backend)
    grad_logp, grad_entropy = torch.autograd.grad(upstream * loss, (logp, entropy), allow_unused=True)
    zeros = torch.zeros_like(logp)
    return loss.detach(), metrics, (zeros if grad_logp is None else grad_logp), (
        zeros if grad_entropy is None else grad_entropy)


def check_heads_agree(shape, seed, config, options):
    logp, entropy, batch, normalizer = build_head_case(shape, seed, config, options)
    upstream = torch.randn((), generator=torch.Generator().manual_seed(seed)).item()
    loss, metrics, grad_logp, grad_entropy = run_head("triton", logp, entropy, batch, config, normalizer, upstream)
    t_loss, t_metrics, t_grad_logp, t_grad_entropy = run_head("torch", logp, entropy, batch, config, normalizer,
                                                              upstream)
    assert_close(loss, t_loss, rtol=RTOL, atol=0.0, name="loss")
    assert metrics.keys() == t_metrics.keys()
    for key in t_metrics:
        assert_close(metrics[key], t_metrics[key], rtol=RTOL, atol=0.0, name=f"metrics[{key}]")
    assert_close(grad_logp, t_grad_logp, rtol=RTOL, atol=0.0, name="grad_logp")
    assert_close(grad_entropy, t_grad_entropy, rtol=RTOL, atol=0.0, name="grad_entropy")


OFFICIAL_LIKE = ((2, 8), 3, RLPlusConfig(clip_eps_low=None, clip_eps_high=None, gamma=0.5, entropy_coef=0.001,
                                          loss_agg="sum"),
                 dict(with_old=True, with_external=True, with_behavior=False, normalizer=8192.0))
EVERY_OPTION = ((1, 5), 0, RLPlusConfig(dual_clip=3.0, kl_coef=0.05, gamma=0.0, mis_clip_max=2.0),
                dict(with_old=False, with_external=True, with_behavior=True, normalizer=None))


@example(case=OFFICIAL_LIKE)
@example(case=EVERY_OPTION)
@given(case=head_cases())
def test_triton_head_matches_torch_head(case):
    check_heads_agree(*case)


# Kinks hit exactly in float64 (log r = log 2, log 0.5, +-20 are exact here, and float32 holds the bounds):
# (config, old log-probs, log-probs, advantages).
KINKS = {
    # ratio 2 at the upper bound 1 + 1.0, ratio 0.5 at the lower bound 1 - 0.5, dual-clip tie -A r = -A c
    "clip bounds": (RLPlusConfig(clip_eps_low=0.5, clip_eps_high=1.0, dual_clip=2.0),
                    [0.0, 0.0, 0.0, 0.0], [math.log(2.0), math.log(0.5), math.log(2.0), math.log(4.0)],
                    [1.0, -1.0, -1.0, -2.0]),
    # log-ratios exactly at +-20 (clamp bounds) and beyond, for the ratio and the KL term (its tangent past +20)
    "log-ratio clamps": (RLPlusConfig(clip_eps_low=None, clip_eps_high=None, kl_coef=0.125),
                         [-21.0, -21.0, -41.0, -50.0], [-1.0, -41.0, -21.0, -1.0], [1.0, -1.0, 1.0, 1.0]),
    # external tokens with old = behaviour: w = p / p_old hits mis_clip_max = 2 exactly on the first (p = 0.5, whose
    # exploration coefficient is not 0), and on the second (p = 2: no probability, but exact)
    "MIS clip": (RLPlusConfig(mis_clip_max=2.0),
                 [math.log(0.25), 0.0, 0.0, 0.0], [math.log(0.5), math.log(2.0), math.log(0.5), -1.0],
                 [1.0, 1.0, -1.0, 1.0]),
}


def _minimum_norm_clamp(clamp):
    """torch.clamp as torch >= 2.14 differentiates it with Python-number bounds: 0 at a bound (before: 1)."""
    def minimum_norm(x, min=None, max=None):
        inside = torch.ones_like(x, dtype=torch.bool)
        if min is not None:
            inside &= x > min
        if max is not None:
            inside &= x < max
        return torch.where(inside, x, clamp(x, min, max).detach())
    return minimum_norm


@pytest.mark.parametrize("torch_clamp", ["installed", "minimum-norm at bounds (torch >= 2.14)"])
@pytest.mark.parametrize("kink", list(KINKS))
def test_triton_head_derivatives_at_the_kinks(kink, torch_clamp, monkeypatch):
    """At a kink the Triton head, the torch head and the reference agree, whatever torch.clamp's own convention:
    a clamp passes the gradient at its bounds, torch.minimum / maximum split a tie."""
    if torch_clamp != "installed":
        monkeypatch.setattr(torch, "clamp", _minimum_norm_clamp(torch.clamp))
    config, old, logp, advantages = KINKS[kink]
    f64 = lambda values: torch.tensor(values, dtype=torch.float64, device=DEVICE)  # noqa: E731
    logp, n = f64(logp), len(logp)
    # ref - logp = +-20 exactly on the first two tokens
    external = torch.full((n,), kink == "MIS clip", device=DEVICE)
    batch = TokenBatch(valid=torch.ones(n, dtype=torch.bool, device=DEVICE), advantages=f64(advantages),
                       old_logprobs=f64(old), ref_logprobs=logp + f64([20.0, -20.0, 30.0, 0.0]),
                       external=external, behavior_logprobs=f64(old))
    entropy = torch.zeros(n, dtype=torch.float64, device=DEVICE)
    loss, metrics, grad_logp, _ = run_head("triton", logp, entropy, batch, config, None, 1.0)
    t_loss, t_metrics, t_grad_logp, _ = run_head("torch", logp, entropy, batch, config, None, 1.0)
    assert_close(loss, t_loss, rtol=RTOL, atol=0.0, name="loss")
    assert_close(grad_logp, t_grad_logp, rtol=RTOL, atol=0.0, name="grad_logp")
    assert_close(metrics["clip_frac"], t_metrics["clip_frac"], rtol=0.0, atol=0.0, name="clip_frac")

    leaf = logp.clone().requires_grad_()
    hyper_parameters = {k: v for k, v in config.as_kwargs().items() if k not in NOT_HEAD}
    reference = rlplus_loss_from_logprobs_reference(
        leaf, entropy, torch.zeros(n, dtype=torch.int64, device=DEVICE), batch.advantages, batch.old_logprobs,
        external_mask=external, behavior_logprobs=batch.behavior_logprobs, ref_logprobs=batch.ref_logprobs,
        **hyper_parameters)
    reference.loss.backward()
    assert_close(t_grad_logp, leaf.grad, rtol=RTOL, atol=0.0, name="grad_logp against the reference")


def test_tokens_outside_the_loss_contribute_nothing_even_when_their_inputs_are_not_finite():
    config = RLPlusConfig(kl_coef=0.1, entropy_coef=0.01)
    n = 4
    valid = torch.tensor([True, False, True, False])
    nan = float("nan")
    batch = on_device(TokenBatch(valid=valid, advantages=torch.tensor([1.0, 0.0, -1.0, 0.0]),
                                 old_logprobs=torch.tensor([-1.0, nan, -2.0, float("inf")]),
                                 external=torch.tensor([True, True, False, False]),
                                 ref_logprobs=torch.tensor([-1.0, nan, -1.0, nan])))
    logp = torch.tensor([-0.5, 0.0, -1.5, 0.0], device=DEVICE)
    entropy = torch.tensor([1.0, nan, 1.0, nan], device=DEVICE)
    loss, _, grad_logp, grad_entropy = run_head("triton", logp, entropy, batch, config, None, 1.0)
    assert torch.isfinite(loss)
    valid = valid.to(DEVICE)
    assert not grad_logp[~valid].any() and not grad_entropy[~valid].any()
    assert torch.isfinite(grad_logp).all() and torch.isfinite(grad_entropy).all()
    t_loss, _, t_grad_logp, _ = run_head("torch", logp, torch.nan_to_num(entropy), batch, config, None, 1.0)
    # float32 here, as the Triton backend runs it: a few ulps of the head's own arithmetic
    assert_close(loss, t_loss, rtol=1e-6, atol=0.0, name="loss")
    assert_close(grad_logp[valid], t_grad_logp[valid], rtol=1e-6, atol=0.0, name="grad_logp")


def _kl_and_derivative(head, logp, ref, kl_coef):
    """(k3 term [N], d loss / d logp [N]) of each head with only the KL on: advantages 0, aggregation weights 1."""
    zeros, ones = torch.zeros_like(logp), torch.ones_like(logp)
    if head == "triton":
        _, dloss_dlogp, stats = rlplus_head_forward(logp, None, zeros, None, None, None, ref, ones,
                                                    head_scalars(RLPlusConfig(kl_coef=kl_coef, gamma=1.0), logp,
                                                                 torch.float32))
        return stats[STAT_NAMES.index("kl")], dloss_dlogp
    logp = logp.clone().requires_grad_()
    terms = per_token_terms(logp, TokenBatch(valid=ones.bool(), advantages=zeros, ref_logprobs=ref),
                            RLPlusConfig(kl_coef=kl_coef))
    (grad_logp,) = torch.autograd.grad(terms.loss.sum(), logp)
    return terms.kl.detach(), grad_logp


@pytest.mark.parametrize("head", ["torch", "triton"])
def test_the_kl_term_is_float32_accurate_near_a_zero_log_ratio(head):
    """In float32, the k3 term e^x - x - 1 (x = ref - logp) and its derivative -(e^x - 1) against float64,
    for |x| from 1e-7 to 19: e^x - x - 1 cancelled near 0 (e^x's rounding error, 6e-8, is 12 million
    times a KL of 5e-15 at x = 1e-7), and so did e^x - 1 in the derivative."""
    x = torch.logspace(-7, math.log10(19.0), 60, dtype=torch.float64)
    logp = torch.full((120,), -2.5, device=DEVICE)
    ref = logp + torch.cat([x, -x]).float().to(DEVICE)
    kl, grad_logp = _kl_and_derivative(head, logp, ref, kl_coef=1.0)
    x32 = (ref - logp).double()  # the log-ratio as both heads form it, in float32
    # e^x's error (2 ulps on a GPU, whose ex2.approx is not correctly rounded) is amplified by e^x / kl,
    # at most 11 where the series ends (|x| = 1/2): 22 ulps, 2.6e-6
    rtol = 4e-6
    assert_close(kl.double(), torch.expm1(x32) - x32, rtol=rtol, atol=0.0, name="kl")
    assert_close(grad_logp.double(), -torch.expm1(x32), rtol=rtol, atol=0.0, name="d kl / d logp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("head", ["torch", "triton", "reference"])
def test_the_kl_term_is_specs_up_to_20_and_its_tangent_beyond(head, dtype):
    """x = ref - logp from -1e8 to 1e4, token by token: SPEC's e^x - x - 1 up to x = 20, below -20 too (a clamp of x
    had kept the term at its value at -20, gradient 0, for a token the policy made e^25 times likelier than the
    reference), and past 20 the tangent at 20: finite at log-ratios of 100, as SPEC asks, and still pulling log p
    up. Also the series' edge (|x| just under 1/2), and x = -inf (ref_logprobs -inf): a finite gradient."""
    x = torch.tensor([-math.inf, -1e8, -1e4, -100.0, -25.0, -20.0, -3.0, -0.45, -0.3, 0.3, 0.45, 3.0, 19.5, 20.0,
                      20.5, 30.0, 100.0, 1e4], dtype=torch.float64)
    logp = torch.full(x.shape, -2e4, dtype=dtype, device=DEVICE)
    ref = logp + x.to(dtype).to(DEVICE)
    if head == "reference":
        leaf = logp.double().requires_grad_()
        one_token = lambda t: torch.arange(len(x), device=DEVICE) == t  # noqa: E731
        kl = torch.stack([rlplus_loss_from_logprobs_reference(
            leaf, None, torch.zeros(x.shape, dtype=torch.long, device=DEVICE), torch.zeros_like(leaf),
            leaf.detach(), ref_logprobs=ref.double(), kl_coef=1.0, loss_agg="sum", loss_mask=one_token(t)).loss
            for t in range(len(x))])
        (grad_logp,) = torch.autograd.grad(kl.sum(), leaf)
        kl = kl.detach()
    else:
        kl, grad_logp = _kl_and_derivative(head, logp, ref, kl_coef=1.0)
    x_formed = (ref - logp).double()  # exact here, but for x = -1e8 in float32 (logp's unit there is 2^-9)
    bound = 20.0
    expected = torch.where(x_formed <= bound, torch.expm1(x_formed) - x_formed,
                           math.expm1(bound) * (x_formed - bound + 1) - bound)
    slope = torch.where(x_formed <= bound, torch.expm1(x_formed), math.expm1(bound))  # d kl / d x; d x / d logp = -1
    rtol = 4e-6 if dtype == torch.float32 else 1e-12
    assert kl[0].item() == math.inf and grad_logp[0].item() == 1.0, "x = -inf"
    assert_close(kl[1:].double(), expected[1:], rtol=rtol, atol=0.0, name="kl")
    assert_close(grad_logp[1:].double(), -slope[1:], rtol=rtol, atol=0.0, name="d kl / d logp")


@pytest.mark.parametrize("poisoned", ["logp", "advantages", "old_logprobs", "behavior_logprobs", "ref_logprobs"])
@pytest.mark.parametrize("gamma", [0.5, 0.0])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_a_nan_on_a_valid_token_is_a_nan_loss_in_both_heads(poisoned, gamma):
    """A NaN in a valid token's inputs: both heads give a NaN loss and NaN metrics where the torch head's
    are NaN (tl.maximum's default, max.f32 on a GPU, dropped the NaN; x ** 0 is 1 for a NaN x, as
    torch.pow's); every other token's d loss / d logp is unchanged. Run on RLPLUS_TEST_DEVICE, so the
    GPU run checks the compiled kernel."""
    n = 6
    config = RLPlusConfig(kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0, gamma=gamma, loss_agg="sum")
    logp = -torch.rand(n, dtype=torch.float64) - 0.1
    inputs = dict(advantages=torch.randn(n, dtype=torch.float64), old_logprobs=logp - 0.1,
                  behavior_logprobs=logp - 0.3, ref_logprobs=logp + 0.2)
    batch = TokenBatch(valid=torch.ones(n, dtype=torch.bool), external=torch.arange(n) % 2 == 1, **inputs)
    target = logp if poisoned == "logp" else inputs[poisoned]
    target[3] = float("nan")  # an external token
    entropy = torch.rand(n, dtype=torch.float64).to(DEVICE)
    results = {backend: run_head(backend, logp.to(DEVICE), entropy, on_device(batch), config, None, 1.0)
               for backend in ("triton", "torch")}
    (loss, metrics, grad_logp, _), (t_loss, t_metrics, t_grad_logp, _) = results["triton"], results["torch"]
    assert loss.isnan() and t_loss.isnan()
    assert {k for k, v in metrics.items() if v.isnan()} == {k for k, v in t_metrics.items() if v.isnan()}
    others = torch.arange(n, device=DEVICE) != 3
    assert_close(grad_logp[others], t_grad_logp[others], rtol=RTOL, atol=0.0, name="grad_logp")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_head_scalars_are_in_the_kernels_order_rounded_as_the_heads_assume(dtype):
    """The seven values in the order the Triton head loads them, each rounded to `dtype`, the clip bounds formed from
    the rounded eps (what as_the_kernel_sees models), absent bounds infinite. For these eps a bound formed on the
    host in float64 and then rounded is an ulp off (a quarter of eps values are; 0.2 is not)."""
    config = RLPlusConfig(kl_coef=0.05, entropy_coef=-0.01, clip_eps_low=0.12525317068122027,
                          clip_eps_high=0.2382984770761779, dual_clip=3.3, gamma=0.7, mis_clip_max=2.5)
    value = lambda x: torch.tensor(x, dtype=dtype)  # noqa: E731
    low, high = 1 - value(config.clip_eps_low), 1 + value(config.clip_eps_high)
    expected = torch.stack([value(0.05), value(-0.01), low, high, value(3.3), value(0.7), value(2.5)])
    assert torch.equal(head_scalars(config, torch.empty(0), dtype), expected)
    if dtype == torch.float32:
        assert value(1 - config.clip_eps_low) != low and value(1 + config.clip_eps_high) != high
    unbounded = RLPlusConfig(clip_eps_low=None, clip_eps_high=None, dual_clip=None, mis_clip_max=None)
    assert head_scalars(unbounded, torch.empty(0), dtype)[[2, 3, 4, 6]].tolist() == [-math.inf, *[math.inf] * 3]


@pytest.mark.parametrize("with_entropy", [True, False])
def test_head_op_passes_opcheck(with_entropy):
    """torch.library.opcheck on ``rlplus::rlplus_head``: schema, autograd registration and its fake against the
    real op, with every optional input present, the float hyper-parameters as one device tensor."""
    from rlplus_kernels.backends import triton_head  # noqa: F401  (registers the op)

    n = 7
    logp, entropy = -torch.rand(n, device=DEVICE) - 0.1, torch.rand(n, device=DEVICE)
    config = RLPlusConfig(dual_clip=3.0, kl_coef=0.05, entropy_coef=0.01, mis_clip_max=2.0)
    args = (logp.requires_grad_(), entropy.requires_grad_() if with_entropy else None, torch.randn(n, device=DEVICE),
            -torch.rand(n, device=DEVICE), torch.arange(n, device=DEVICE) % 2 == 0, -torch.rand(n, device=DEVICE),
            -torch.rand(n, device=DEVICE), torch.full((n,), 1.0 / n, device=DEVICE),
            head_scalars(config, logp, torch.float32))
    torch.library.opcheck(torch.ops.rlplus.rlplus_head.default, args)
