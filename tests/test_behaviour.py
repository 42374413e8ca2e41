"""Contract behaviour beyond the property tests: empty batches, extreme inputs, layouts, autocast,
frozen heads, memory, the module, the preset and group advantages."""

from __future__ import annotations

import inspect
import math
import re

import pytest
import torch

from helpers import (CPU_BACKENDS, TOLERANCES, CountMatmuls, HostReads, LargestAllocation, assert_close,
                     assert_grad_close, assert_reads_only_what_it_wrote, dot_product_allowance, reference_inputs)
from reference import linear_logprobs_reference, rlplus_loss_from_logprobs_reference, rlplus_loss_reference
from rlplus_kernels import OFFICIAL_RECIPE, RLPlusLoss, group_advantages, linear_logprobs, rlplus_loss

BACKENDS = CPU_BACKENDS  # these tests build CPU tensors
AGG_MODES = ["token-mean", "sum", "seq-mean-token-mean", "seq-mean-token-sum"]
# (backend, RLPLUS_SCHEDULE): the torch backend, and the Triton one under each schedule
BACKEND_SCHEDULES = [("torch", None), *[pytest.param("triton", schedule, marks=BACKENDS[1].marks)
                                        for schedule in ("two-pass", "single-pass")]]


def leaf(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, dtype=dtype) * scale).requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", AGG_MODES)
@pytest.mark.parametrize("normalizer", [None, torch.tensor(0)], ids=["own-count", "global-count-0"])
def test_no_valid_token_gives_zero_loss_and_zero_gradients(backend, loss_agg, normalizer):
    """Also with the normalizer `global_normalizer` gives when no rank has a valid token: 0."""
    hidden, weight, bias = leaf(2, 3, 5), leaf(7, 5), leaf(7)
    targets = torch.randint(0, 7, (2, 3))
    targets[0] = -100
    batch = (targets, torch.randn(2), -torch.rand(2, 3))
    kwargs = dict(bias=bias, loss_mask=torch.tensor([[1, 1, 1], [0, 0, 0]]), external_mask=torch.tensor([True, False]),
                  entropy_coef=0.1, kl_coef=0.1, ref_logprobs=-torch.rand(2, 3), loss_agg=loss_agg,
                  normalizer=normalizer)
    out = rlplus_loss(hidden, weight, *batch, **kwargs, backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0.0
    # SPEC: no valid token at all gives loss = 0; the reference divided 0 by a global count of 0 (NaN)
    assert rlplus_loss_reference(*reference_inputs(hidden, weight), *batch, **kwargs).loss.item() == 0.0
    for t in (hidden, weight, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))
    assert torch.equal(out.logprobs, torch.zeros(2, 3))
    for key, value in out.metrics.items():
        assert value.item() == 0, key


@pytest.mark.parametrize("backend", BACKENDS)
def test_seq_modes_leave_out_or_count_a_sequence_without_valid_tokens_as_the_readme_says(backend):
    """At ratio 1 each token's loss is -A_t, so the two seq modes are explicit sums of the advantages: the middle
    sequence has no valid token, which seq-mean-token-mean leaves out (2 sequences) and seq-mean-token-sum
    counts as a sum of 0 (3 sequences)."""
    hidden, weight = leaf(3, 4, 5), leaf(7, 5)
    targets, advantages = torch.randint(0, 7, (3, 4)), torch.randn(3, 4)
    loss_mask = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    own_logprobs = linear_logprobs(hidden.detach(), weight.detach(), targets, backend=backend)
    per_sequence = [-advantages[0].sum(), -advantages[2, :2].sum()]
    expected = {"seq-mean-token-mean": (per_sequence[0] / 4 + per_sequence[1] / 2) / 2,
                "seq-mean-token-sum": (per_sequence[0] + per_sequence[1]) / 3}
    for loss_agg, value in expected.items():
        out = rlplus_loss(hidden, weight, targets, advantages, own_logprobs, loss_mask=loss_mask, loss_agg=loss_agg,
                          backend=backend)
        torch.testing.assert_close(out.loss, value, rtol=1e-5, atol=1e-6, msg=loss_agg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,packed,loss_agg", [
    *[pytest.param((0,), False, mode, id=f"N=0-{mode}") for mode in ("token-mean", "sum")],
    *[pytest.param(shape, packed, mode, id=f"{name}-{mode}") for name, shape, packed in (
        ("B=2,T=0", (2, 0), False), ("B=0,T=3", (0, 3), False), ("packed,S=0", (0,), True)) for mode in AGG_MODES]])
def test_an_empty_batch_gives_zero_loss_and_zero_gradients(backend, shape, packed, loss_agg):
    """A data-parallel rank can receive no tokens: every branch on, every output zero, nothing fails, and the
    reference agrees (it gave 0 / 0 for seq-mean-token-sum over [0, T] inputs and raised on packed ones)."""
    hidden, weight, bias = leaf(*shape, 5), leaf(7, 5), leaf(7)
    empty = lambda dtype=torch.float32: torch.zeros(shape, dtype=dtype)  # noqa: E731
    sequences = dict(cu_seqlens=torch.tensor([0])) if packed else {}
    batch = (empty(torch.long), empty(), empty())
    kwargs = dict(bias=bias, external_mask=empty(torch.bool), entropy_coef=0.1, kl_coef=0.1, ref_logprobs=empty(),
                  loss_agg=loss_agg, **sequences)
    out = rlplus_loss(hidden, weight, *batch, **kwargs, backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.logprobs.shape == shape and out.entropy.shape == shape
    reference = rlplus_loss_reference(*reference_inputs(hidden, weight), *batch, **kwargs)
    assert reference.loss.item() == 0.0 and reference.logprobs.shape == shape
    for t in (hidden, weight, bias):
        assert torch.equal(t.grad, torch.zeros_like(t))
    for key, value in out.metrics.items():
        assert value.item() == 0, key
    assert linear_logprobs(hidden, weight, empty(torch.long), backend=backend).shape == shape
    logp, entropy = linear_logprobs(hidden, weight, empty(torch.long), return_entropy=True, backend=backend)
    assert logp.shape == shape and entropy.shape == shape


def _finite_everywhere(out, leaves):
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert torch.isfinite(out.logprobs).all()
    for name, value in out.metrics.items():
        assert torch.isfinite(value), name
    for t in leaves:
        assert torch.isfinite(t.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_and_saturated_probabilities_stay_finite(backend):
    """Logits of 1e4 (every p rounds to 0 or 1) with every branch of the loss on."""
    hidden, weight = leaf(8, 4, scale=100.0), leaf(9, 4, scale=100.0)
    targets = torch.randint(0, 9, (8,))
    with torch.no_grad():
        argmax = (hidden @ weight.T).argmax(-1)
    targets[:4] = argmax[:4]  # p rounds to exactly 1 here: (1 - p)^gamma must be 0, not NaN
    out = rlplus_loss(hidden, weight, targets, torch.randn(8), -torch.rand(8),
                      external_mask=torch.arange(8) % 2 == 0, entropy_coef=0.01, kl_coef=0.1,
                      ref_logprobs=-torch.rand(8), gamma=0.5, backend=backend)
    _finite_everywhere(out, (hidden, weight))
    assert out.logprobs.min() < -1000  # the logits really were huge


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_mean_of_huge_finite_log_probs_is_finite(backend):
    """A bias of 1.5e38 on a row that no target takes gives each target a finite log p of about -1.5e38; their
    mean, logprob_mean, summed them first and was -inf."""
    torch.manual_seed(0)
    bias = torch.zeros(20)
    bias[0] = 1.5e38
    hidden, weight, advantages = torch.randn(4, 8), torch.randn(20, 8), torch.randn(4)
    targets = torch.tensor([1, 2, 3, 4])
    got = rlplus_loss(hidden, weight, targets, advantages, bias=bias, backend=backend)
    expected = rlplus_loss_reference(hidden.double(), weight.double(), targets, advantages, bias=bias.double())
    assert torch.isfinite(got.logprobs).all() and got.logprobs.max() < -1e38  # as drawn
    rtol, atol = TOLERANCES[torch.float32]["value"]
    for name in ("logprob_mean", "ratio_mean"):
        assert_close(got.metrics[name], expected.metrics[name], rtol=rtol, atol=atol, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [10, 12, 1000])
def test_a_mean_of_equal_values_is_exact(backend, n):
    """Every ratio 1 (no old log-probs) and every token clipped (ratio e^3, positive advantages): ratio_mean and
    clip_frac are exactly 1, as they were before the mean's sum was made overflow-free (dividing each term first
    gave 1.0000001 for 10 tokens, a clip fraction above 1)."""
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(n, 8), torch.randn(20, 8), torch.randint(0, 20, (n,))
    fresh = rlplus_loss(hidden, weight, targets, torch.randn(n), backend=backend)
    assert fresh.metrics["ratio_mean"].item() == 1.0
    logp = linear_logprobs(hidden, weight, targets, backend=backend)
    clipped = rlplus_loss(hidden, weight, targets, torch.rand(n) + 0.1, logp - 3, backend=backend)
    assert clipped.metrics["clip_frac"].item() == 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("coefficient", [dict(gamma=1e39), dict(entropy_coef=1e37)], ids=["gamma=1e39", "entropy=1e37"])
def test_coefficients_at_float32s_edge_give_the_references_loss_and_gradients(backend, coefficient):
    """Valid coefficients at the edge of float32, with peaked distributions (every target's p rounds to 0 or 1):
    gamma = 1e39 (inf in float32) gave the Triton head inf * log 1 = NaN where p is 0, whose (1 - p)^gamma is 1;
    entropy_coef = 1e37 gave the torch backend's backward g_ent * log p = inf times p = 0, NaN gradients. The
    reference's loss and gradients are finite, and so are each backend's."""
    torch.manual_seed(0)
    hidden, weight = leaf(8, 6, scale=40.0), leaf(20, 6)
    with torch.no_grad():
        logits = hidden @ weight.T
    # the least likely token of each row (p below 1e-30 in float32 and float64 alike), or the likeliest
    targets = torch.where(torch.arange(8) % 2 == 0, logits.argmin(-1), logits.argmax(-1))
    advantages, external = torch.randn(8), torch.ones(8, dtype=torch.bool)
    ref_hidden, ref_weight = reference_inputs(hidden, weight)
    expected = rlplus_loss_reference(ref_hidden, ref_weight, targets, advantages, external_mask=external,
                                     **coefficient)
    got = rlplus_loss(hidden, weight, targets, advantages, external_mask=external, backend=backend, **coefficient)
    assert got.logprobs[0::2].exp().max() == 0 and got.logprobs[1::2].exp().min() > 0.99  # as drawn
    rtol, atol = TOLERANCES[torch.float32]["value"]
    assert_close(got.loss.detach(), expected.loss.detach(), rtol=rtol, atol=atol, name="loss")
    for name in ("explore_coef_mean", "mis_ratio_mean"):
        assert_close(got.metrics[name], expected.metrics[name], rtol=rtol, atol=atol, name=name)
    # the gradients' float32 rounding at these logits (|z| ~ 400) is allowed, by `dot_product_allowance`, from the
    # reference's upstream gradients of each token's log p and entropy
    logp, entropy = (x.detach().requires_grad_() for x in linear_logprobs_reference(
        ref_hidden, ref_weight, targets, return_entropy=True))
    upstream = torch.autograd.grad(rlplus_loss_from_logprobs_reference(
        logp, entropy, targets, advantages, external_mask=external, **coefficient).loss, (logp, entropy),
        allow_unused=True)
    allowances = dot_product_allowance(*upstream, hidden, weight, None, targets, 1.0, backend=backend)
    grads = torch.autograd.grad(got.loss, (hidden, weight))
    for name, g, rg, allowance in zip(("hidden", "weight"), grads,
                                      torch.autograd.grad(expected.loss, (ref_hidden, ref_weight)), allowances):
        assert_grad_close(g, rg, rtol=TOLERANCES[torch.float32]["grad"], name=f"grad_{name}", allowance=allowance)


@pytest.mark.parametrize("backend,source", [("torch", None), *[
    pytest.param("triton", source, marks=BACKENDS[1].marks) for source in ("fused", "cublas")]])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("masked", ["first rows", "last rows"])
@pytest.mark.filterwarnings("ignore:overflow encountered in divide:RuntimeWarning")  # -3.4e38 / 0.7, by design
def test_a_vocabulary_masked_by_its_bias(backend, source, temperature, masked, monkeypatch):
    """Rows of a padded vocabulary masked by a bias of float32's lowest value (logits -3.4e38, or
    -inf once divided by T < 1), whole tiles, splits and chunks of them: the reference's loss and
    gradients, entropy on, not NaN from 0 * inf in the running sums."""
    if source is not None:
        monkeypatch.setenv("RLPLUS_LOGITS", source)
    N, D, V, real = 24, 16, 300, 160
    masked_rows = slice(0, V - real) if masked == "first rows" else slice(real, V)
    hidden, weight, bias = leaf(N, D), leaf(V, D), torch.zeros(V)
    bias[masked_rows] = torch.finfo(torch.float32).min
    bias.requires_grad_()
    targets = torch.randint(0, real, (N,)) + (V - real if masked == "first rows" else 0)
    advantages, old_logprobs = torch.randn(N), -torch.rand(N)
    kwargs = dict(external_mask=torch.arange(N) % 3 == 0, temperature=temperature, entropy_coef=0.05,
                  return_entropy=True)
    out = rlplus_loss(hidden, weight, targets, advantages, old_logprobs, bias=bias, backend=backend,
                      chunk_vocab=32, **kwargs)
    h, w, b = reference_inputs(hidden, weight, bias)
    ref = rlplus_loss_reference(h, w, targets, advantages, old_logprobs, bias=b, **kwargs)
    value_tol, grad_tol = TOLERANCES[torch.float32]["value"], TOLERANCES[torch.float32]["grad"]
    assert_close(out.loss.detach(), ref.loss.detach(), rtol=value_tol[0], atol=value_tol[1], name="loss")
    assert_close(out.entropy, ref.entropy, rtol=value_tol[0], atol=value_tol[1], name="entropy")
    grads = torch.autograd.grad(out.loss, (hidden, weight, bias))
    ref_grads = torch.autograd.grad(ref.loss, (h, w, b))
    for name, g, rg in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert_grad_close(g, rg, rtol=grad_tol, name=name)
    assert not grads[2][masked_rows].any()  # p = 0 exactly there


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shift", [100.0, -100.0])
def test_log_ratios_of_100_are_clamped_as_the_reference_clamps_them(backend, shift):
    """Log-ratios of +-100 meet SPEC's clamps at +-20 (the PPO ratio's on both sides, the MIS weight's log w = 100 at
    shift 100: log w <= 20, no mis_clip_max to hide it) and the KL term's tangent past x = 20 (at shift 100; at -100
    it is SPEC's e^x - x - 1). Finite, and the reference's values and gradients."""
    hidden, weight = leaf(6, 4), leaf(9, 4)
    targets = torch.randint(0, 9, (6,))
    logp = linear_logprobs(hidden.detach(), weight.detach(), targets)
    args = (targets, torch.randn(6), logp - shift)
    kwargs = dict(behavior_logprobs=logp - shift, external_mask=torch.arange(6) % 2 == 0, kl_coef=0.5,
                  ref_logprobs=logp + shift, clip_eps_low=None, clip_eps_high=None, mis_clip_max=None)
    out = rlplus_loss(hidden, weight, *args, backend=backend, **kwargs)
    h, w = reference_inputs(hidden, weight)
    ref = rlplus_loss_reference(h, w, *args, **kwargs)
    value_tol, grad_tol = TOLERANCES[torch.float32]["value"], TOLERANCES[torch.float32]["grad"]
    assert_close(out.loss.detach(), ref.loss.detach(), rtol=value_tol[0], atol=value_tol[1], name="loss")
    _finite_everywhere(out, (hidden, weight))
    ref.loss.backward()
    for name, leaf_, ref_leaf in (("hidden", hidden, h), ("weight", weight, w)):
        assert_grad_close(leaf_.grad, ref_leaf.grad, rtol=grad_tol, name=f"grad_{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_near_its_range_stays_finite(backend):
    """Hidden states and weights whose products overflow float16 (65504): accumulation is float32."""
    hidden = leaf(5, 8, dtype=torch.float16, scale=200.0)
    weight = leaf(11, 8, dtype=torch.float16, scale=200.0)
    out = rlplus_loss(hidden, weight, torch.randint(0, 11, (5,)), torch.randn(5), external_mask=torch.rand(5) < 0.5,
                      entropy_coef=0.01, backend=backend)
    _finite_everywhere(out, (hidden, weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    base_hidden = torch.randn(4, 7, 12)
    hidden = base_hidden[:, ::2, ::2].detach().requires_grad_()  # [4, 4, 6], strided in two dims
    weight = torch.randn(6, 13).T.detach().requires_grad_()        # [13, 6], column-major
    bias = torch.randn(26)[::2].detach().requires_grad_()
    targets = torch.randint(0, 13, (4, 8))[:, ::2]
    advantages = torch.randn(4, 4).T.contiguous().T
    assert not (hidden.is_contiguous() or weight.is_contiguous() or bias.is_contiguous())
    out = rlplus_loss(hidden, weight, targets, advantages, bias=bias, entropy_coef=0.01,
                      loss_agg="seq-mean-token-mean", backend=backend)
    h, w, b = reference_inputs(hidden, weight, bias)
    ref = rlplus_loss_reference(h, w, targets, advantages, bias=b, entropy_coef=0.01, loss_agg="seq-mean-token-mean")
    assert_close(out.loss.detach(), ref.loss.detach(), rtol=2e-5, atol=2e-5, name="loss")
    grads = torch.autograd.grad(out.loss, (hidden, weight, bias))
    ref_grads = torch.autograd.grad(ref.loss, (h, w, b))
    for name, g, rg in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert_grad_close(g, rg, rtol=TOLERANCES[torch.float32]["grad"], name=name)


def test_autocast_casts_like_a_linear_layer():
    hidden, weight, bias = leaf(6, 8), leaf(10, 8), leaf(10)
    targets, advantages = torch.randint(0, 10, (6,)), torch.randn(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rlplus_loss(hidden, weight, targets, advantages, bias=bias, backend="torch")
    out.loss.backward()
    cast = [t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias)]
    expected = rlplus_loss(*cast[:2], targets, advantages, bias=cast[2], backend="torch")
    expected.loss.backward()
    assert out.loss.item() == expected.loss.item()
    for t, c in zip((hidden, weight, bias), cast):
        assert t.grad.dtype == torch.float32  # the autocast cast is differentiable, like nn.Linear's
        assert torch.equal(t.grad, c.grad.float())
    with pytest.raises(TypeError, match="weight"):  # outside autocast a mismatch is an error
        rlplus_loss(hidden, weight.detach().bfloat16(), targets, advantages)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="bias"):
            rlplus_loss(hidden, weight, targets, advantages, bias=[0.0] * 10)
        # float64 is not cast, as by nn.Linear: the float64 loss of the torch backend
        as_f64 = [t.detach().double() for t in (hidden, weight, bias)]
        assert torch.nn.functional.linear(as_f64[0], as_f64[1], as_f64[2]).dtype == torch.float64
        out64 = rlplus_loss(*as_f64[:2], targets, advantages, bias=as_f64[2], backend="torch")
    assert out64.loss.dtype == torch.float64
    expected64 = rlplus_loss(*as_f64[:2], targets, advantages, bias=as_f64[2], backend="torch")
    assert out64.loss.item() == expected64.loss.item()


def _backward_matmuls(weight_requires_grad):
    torch.manual_seed(1)
    hidden, weight = leaf(40, 8), torch.randn(100, 8, requires_grad=weight_requires_grad)
    out = rlplus_loss(hidden, weight, torch.randint(0, 100, (40,)), torch.randn(40), backend="torch",
                      chunk_tokens=16, chunk_vocab=32)
    with CountMatmuls() as counter:
        out.loss.backward()
    return counter.count, hidden.grad


def test_frozen_head_skips_the_grad_weight_gemm():
    trained, grad_trained = _backward_matmuls(True)
    frozen, grad_frozen = _backward_matmuls(False)
    chunks = math.ceil(40 / 16) * math.ceil(100 / 32)
    assert trained == 3 * chunks  # recompute logits, grad_hidden, grad_weight
    assert frozen == 2 * chunks
    torch.testing.assert_close(grad_frozen, grad_trained)


@pytest.mark.parametrize("with_entropy", [False, True])
def test_no_tokens_by_vocab_tensor_is_ever_allocated(with_entropy):
    """A vocabulary 64x the chunk: the largest tensor of forward+backward is one chunk (or a weight)."""
    N, D, V, chunk_tokens, chunk_vocab = 96, 4, 16384, 64, 256
    hidden, weight = leaf(N, D), leaf(V, D)
    with LargestAllocation() as tracker:
        out = rlplus_loss(hidden, weight, torch.randint(0, V, (N,)), torch.randn(N), external_mask=torch.rand(N) < 0.5,
                          entropy_coef=0.01 if with_entropy else 0.0, backend="torch",
                          chunk_tokens=chunk_tokens, chunk_vocab=chunk_vocab)
        out.loss.backward()
    assert tracker.largest <= max(chunk_tokens * chunk_vocab, V * D, N * D)
    assert tracker.largest < N * V / 16


def test_module_equals_function_and_takes_the_preset():
    hidden, weight = torch.randn(2, 5, 6), torch.randn(9, 6)
    targets, advantages, old = torch.randint(0, 9, (2, 5)), torch.randn(2), -torch.rand(2, 5)
    external = torch.tensor([False, True])
    module = RLPlusLoss(**OFFICIAL_RECIPE)
    out = module(hidden, weight, targets, advantages, old, external_mask=external)
    direct = rlplus_loss(hidden, weight, targets, advantages, old, external_mask=external, **OFFICIAL_RECIPE)
    assert torch.equal(out.loss, direct.loss)
    assert out.entropy is not None  # the preset's entropy bonus computes entropies
    override = module(hidden, weight, targets, advantages, old, external_mask=external, normalizer=2.0)
    torch.testing.assert_close(override.loss, direct.loss * 8192 / 2.0)
    assert "loss_agg='sum'" in repr(module) and "normalizer=8192" in repr(module)  # both define the objective


def test_the_module_takes_the_functions_defaults():
    """RLPlusLoss() is rlplus_loss(): each hyper-parameter's default is the function's (SPEC.md's signature)."""
    parameters = inspect.signature(rlplus_loss).parameters
    module = RLPlusLoss()
    defaults = {**module.config.as_kwargs(), "normalizer": module.normalizer}
    assert set(defaults) <= set(parameters)
    for name, value in defaults.items():
        assert value == parameters[name].default, (
            f"{name}: RLPlusLoss's default {value!r}, rlplus_loss's {parameters[name].default!r}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_normalizer_and_a_float_loss_mask_are_read_as_given(backend):
    """A fractional normalizer divides as it is (not truncated), and a float loss_mask selects its nonzero
    entries, fractional, negative and NaN ones too (flags, README), as the reference reads it."""
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(6, 4), torch.randn(11, 4), torch.randint(0, 11, (6,))
    advantages, mask = torch.randn(6), torch.tensor([1.0, -1.0, 0.0, 0.5, -2.0, math.nan])
    args = (hidden, weight, targets, advantages)
    reference_args = (hidden.double(), weight.double(), targets, advantages)
    rtol, atol = TOLERANCES[torch.float32]["value"]
    for kwargs in (dict(loss_agg="sum", normalizer=2.5), dict(loss_mask=mask)):
        got = rlplus_loss(*args, **kwargs, backend=backend)
        assert_close(got.loss, rlplus_loss_reference(*reference_args, **kwargs).loss, rtol=rtol, atol=atol,
                     name=f"loss with {kwargs}")
    assert torch.equal(got.loss, rlplus_loss(*args, loss_mask=mask != 0, backend=backend).loss)
    assert got.metrics["num_tokens"].item() == 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logprobs_takes_its_ignore_index(backend):
    torch.manual_seed(0)
    hidden, weight, targets = torch.randn(6, 4), torch.randn(11, 4), torch.randint(0, 11, (6,))
    targets[1] = -1
    got = linear_logprobs(hidden, weight, targets, ignore_index=-1, backend=backend)
    expected = linear_logprobs_reference(hidden.double(), weight.double(), targets, ignore_index=-1)
    assert got[1].item() == 0.0
    rtol, atol = TOLERANCES[torch.float32]["value"]
    assert_close(got, expected, rtol=rtol, atol=atol, name="logprobs")


def test_official_preset_is_the_papers_recipe():
    assert OFFICIAL_RECIPE["clip_eps_low"] is None and OFFICIAL_RECIPE["clip_eps_high"] is None
    assert OFFICIAL_RECIPE["loss_agg"] == "sum" and OFFICIAL_RECIPE["normalizer"] == 8192
    assert OFFICIAL_RECIPE["entropy_coef"] == 0.001 and OFFICIAL_RECIPE["gamma"] == 0.5
    assert OFFICIAL_RECIPE["kl_coef"] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_targets_of_any_integer_dtype(backend, dtype):
    """SPEC: targets are "integer". gather and the kernels index with int64, and an int32 tensor
    cannot hold every ignore_index: the same loss and gradients as int64 targets."""
    hidden, weight = leaf(2, 5, 4), leaf(100, 4)
    targets = torch.randint(0, 100, (2, 5))
    ignore_index = -100 if dtype.is_signed else 99  # uint8 holds no negative id
    targets[0, 1] = ignore_index
    results = []
    for t in (targets.to(dtype), targets):
        out = rlplus_loss(hidden, weight, t, torch.randn(2, generator=torch.Generator().manual_seed(0)),
                          ignore_index=ignore_index, entropy_coef=0.01, backend=backend)
        results.append((out.loss, out.logprobs, *torch.autograd.grad(out.loss, (hidden, weight))))
    for got, expected in zip(*results):
        assert torch.equal(got, expected)
    assert results[0][1][0, 1] == 0  # the ignored token
    in_range = targets.clamp(min=0)  # with an ignore_index beyond int32's range, nothing is ignored
    logp = linear_logprobs(hidden, weight, in_range.to(torch.int32), ignore_index=-2**40, backend=backend)
    assert torch.equal(logp, linear_logprobs(hidden, weight, in_range, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_flow_into_the_head_only(backend):
    """SPEC: gradients flow into hidden, weight and bias only. old_logprobs scored without no_grad
    (still attached to the graph), advantages and the other per-token inputs are data."""
    hidden, weight = leaf(2, 5, 4), leaf(30, 4)
    targets = torch.randint(0, 30, (2, 5))
    per_token = {name: (-torch.rand(2, 5)).requires_grad_()
                 for name in ("old_logprobs", "behavior_logprobs", "ref_logprobs")}
    advantages, normalizer = torch.randn(2).requires_grad_(), torch.tensor(7.0, requires_grad=True)
    kwargs = dict(external_mask=torch.tensor([False, True]), kl_coef=0.1, entropy_coef=0.01, backend=backend)
    attached = rlplus_loss(hidden, weight, targets, advantages, **per_token, normalizer=normalizer, **kwargs)
    attached.loss.backward()
    grads = (hidden.grad.clone(), weight.grad.clone())
    for x in (advantages, normalizer, *per_token.values()):
        assert x.grad is None
    hidden.grad = weight.grad = None
    detached = rlplus_loss(hidden, weight, targets, advantages.detach(),
                           **{k: v.detach() for k, v in per_token.items()}, normalizer=normalizer.detach(), **kwargs)
    detached.loss.backward()
    assert torch.equal(grads[0], hidden.grad) and torch.equal(grads[1], weight.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("external", [False, True], ids=["on-policy", "external"])
def test_the_outputs_are_the_callers_to_edit(backend, external):
    """Each metric is a tensor of its own (a trainer all-reduces them in place, one by one: two metrics that
    were one tensor, 0 without external tokens, were reduced twice), and editing the returned log-probs or
    entropies in place leaves the loss's backward as it was (they were views of what the op saved for it)."""
    hidden, weight = leaf(2, 5, 4), leaf(30, 4)
    inputs = (torch.randint(0, 30, (2, 5)), torch.randn(2), -torch.rand(2, 5))
    kwargs = dict(external_mask=torch.tensor([False, external]), entropy_coef=0.01, backend=backend)
    out = rlplus_loss(hidden, weight, *inputs, **kwargs)
    values = [out.logprobs, out.entropy, *out.metrics.values()]
    assert len({x.untyped_storage().data_ptr() for x in values}) == len(values)
    before = {name: value.clone() for name, value in out.metrics.items()}
    for value in out.metrics.values():
        value.add_(1)
    for name, value in out.metrics.items():
        assert torch.equal(value, before[name] + 1), name
    out.logprobs.zero_()
    out.entropy.zero_()
    out.loss.backward()
    grads = (hidden.grad.clone(), weight.grad.clone())
    hidden.grad = weight.grad = None
    rlplus_loss(hidden, weight, *inputs, **kwargs).loss.backward()
    assert torch.equal(grads[0], hidden.grad) and torch.equal(grads[1], weight.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_second_derivative_is_refused_with_a_reason(backend):
    """The first backward with create_graph=True is right (a gradient penalty's first step); differentiating
    it again raises an error that says the head has first derivatives only (it was an mm(out=) error
    on the torch backend and torch's advice to register a formula on the triton one)."""
    hidden, weight = leaf(6, 16), leaf(40, 16)
    targets = torch.randint(0, 40, (6,))
    grad, = torch.autograd.grad(linear_logprobs(hidden, weight, targets, backend=backend).sum(), hidden,
                                create_graph=True)
    want, = torch.autograd.grad(linear_logprobs(hidden, weight, targets, backend="torch").sum(), hidden)
    torch.testing.assert_close(grad.detach(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(NotImplementedError, match="first derivatives .* only"):
        grad.pow(2).sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_entropy_only_loss_has_the_references_gradients(backend):
    """Only the entropy reaches the loss (an entropy bonus on its own): the backward's path without a
    log-prob gradient, against the reference (float64 on the torch backend, float32 on Triton's)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    hidden, weight, bias = leaf(6, 16, dtype=dtype), leaf(11, 16, dtype=dtype), leaf(11, dtype=dtype)
    targets = torch.randint(0, 11, (6,))
    targets[2] = -100
    _, entropy = linear_logprobs(hidden, weight, targets, bias=bias, return_entropy=True, backend=backend,
                                 chunk_tokens=4, chunk_vocab=5)
    assert entropy[2] == 0
    grads = torch.autograd.grad(entropy.sum(), (hidden, weight, bias))
    h, w, b = reference_inputs(hidden, weight, bias)
    _, ref_entropy = linear_logprobs_reference(h, w, targets, bias=b, return_entropy=True)
    ref_grads = torch.autograd.grad(ref_entropy.sum(), (h, w, b))
    for name, g, rg in zip(["hidden", "weight", "bias"], grads, ref_grads):
        assert_grad_close(g, rg, rtol=TOLERANCES[dtype]["grad"], name=f"grad_{name}")


def test_linear_logprobs_under_no_grad_is_detached():
    hidden, weight = leaf(4, 3), leaf(5, 3)
    with torch.no_grad():
        logp = linear_logprobs(hidden, weight, torch.tensor([0, 1, -100, 4]))
    assert not logp.requires_grad and logp.dtype == torch.float32 and logp[2] == 0


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 5.0, 3.0])
    groups = torch.tensor([7, 7, 7, 7, 2, 2])
    expected = torch.tensor([0.25, -0.75, 0.25, 0.25, 1.0, -1.0])
    torch.testing.assert_close(group_advantages(rewards, groups), expected)
    std = torch.tensor([0.5, 0.5, 0.5, 0.5, 2**0.5, 2**0.5])
    torch.testing.assert_close(group_advantages(rewards, groups, normalize_std=True, eps=0.0), expected / std)
    # half precision: a group of 600 (300 ones) has advantages +-0.5; bfloat16 sums stop counting at 256
    large = torch.arange(600) % 2 == 0
    for dtype in (torch.bfloat16, torch.float16):
        got = group_advantages(large.to(dtype), torch.zeros(600, dtype=torch.long))
        assert got.dtype == dtype
        torch.testing.assert_close(got, torch.where(large, 0.5, -0.5).to(dtype), rtol=0, atol=0)
    # float32 rewards whose group sum (6e38) or squares (1e40) pass float32's range: -inf and 0 advantages once
    huge = group_advantages(torch.tensor([3e38, 3e38, 0.0]), torch.zeros(3, dtype=torch.long))
    torch.testing.assert_close(huge, torch.tensor([1e38, 1e38, -2e38]))
    spread = group_advantages(torch.tensor([1e20, -1e20]), torch.zeros(2, dtype=torch.long), normalize_std=True)
    torch.testing.assert_close(spread, torch.tensor([0.5**0.5, -0.5**0.5]))
    with pytest.raises(TypeError, match="group_ids"):
        group_advantages(rewards, torch.zeros(5, dtype=torch.long))
    for bad_rewards, got in ((torch.ones(6, dtype=torch.long), "got torch.int64 of shape [6]"),
                             (torch.ones(3, 2), "got torch.float32 of shape [3, 2]"), ([1.0] * 6, "got list")):
        with pytest.raises(TypeError, match=re.escape(f"rewards must be a 1-D floating-point tensor [S], {got}")):
            group_advantages(bad_rewards, groups)
    with pytest.raises(TypeError, match="group_ids"):
        group_advantages(rewards, groups.to(torch.complex64))
    with pytest.raises(TypeError, match="normalize_std"):
        group_advantages(rewards, groups, normalize_std="no")
    np = pytest.importorskip("numpy")  # a flag read from a config through numpy
    assert torch.equal(group_advantages(rewards, groups, normalize_std=np.bool_(True)),
                       group_advantages(rewards, groups, normalize_std=True))
    for eps, error in ((float("nan"), ValueError), (float("inf"), ValueError), (-1e-6, ValueError),
                       ("x", TypeError), (None, TypeError)):
        with pytest.raises(error, match="eps"):
            group_advantages(rewards, groups, normalize_std=True, eps=eps)


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("normalize_std", [True, False])
def test_a_group_without_spread_has_advantage_zero(eps, normalize_std):
    """A group of one member, or of equal rewards, has std 0: at eps 0 that was 0 / 0, a NaN advantage from
    finite rewards (which makes the whole loss NaN); seven rewards of 0.1 have a mean one ulp off, which
    the std turned into advantages of +-0.93. A NaN reward still makes its group NaN."""
    rewards = torch.tensor([1.0, 0.5, 0.5, 2.0, 0.0] + [0.1] * 7 + [float("nan"), 1.0], dtype=torch.float64)
    groups = torch.tensor([0, 1, 1, 2, 2] + [3] * 7 + [4, 4])
    got = group_advantages(rewards, groups, normalize_std=normalize_std, eps=eps)
    spread = 1 / (2**0.5 + eps) if normalize_std else 1.0
    expected = torch.tensor([0.0, 0.0, 0.0, spread, -spread] + [0.0] * 7 + [float("nan")] * 2, dtype=torch.float64)
    # zeros exactly; the spread to the 2 ulps of torch.sqrt (1 ulp off 2**0.5 on some AVX-512 CPUs) and the division
    torch.testing.assert_close(got, expected, equal_nan=True, rtol=2 * 2.0**-52, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bound", [dict(clip_eps_high=1e39), dict(clip_eps_low=1e39), dict(mis_clip_max=1e39)])
def test_a_bound_beyond_float32_is_no_bound(backend, bound):
    """Finite hyper-parameters past float32's range are valid: as float32 holds them (1 + 1e39 is inf),
    the bound is absent, on every backend (torch.clamp refused such a Python float on a float32 tensor)."""
    torch.manual_seed(0)
    hidden, weight = torch.randn(6, 8), torch.randn(10, 8) / 3
    targets, advantages, old = torch.randint(0, 10, (6,)), torch.randn(6), torch.randn(6) - 2
    external = torch.tensor([True, False] * 3)
    unbounded = {"clip_eps_high": dict(clip_eps_high=None), "clip_eps_low": dict(clip_eps_low=None),
                 "mis_clip_max": dict(mis_clip_max=None)}[next(iter(bound))]
    expected = rlplus_loss_reference(hidden.double(), weight.double(), targets, advantages, old,
                                     external_mask=external, **unbounded).loss
    got = rlplus_loss(hidden, weight, targets, advantages, old, external_mask=external, backend=backend, **bound).loss
    rtol, atol = TOLERANCES[torch.float32]["value"]
    assert_close(got, expected, rtol=rtol, atol=atol, name=f"loss with {bound}")


# (input, index, value) of one non-finite value; targets are drawn from rows 0..4, so weight row 7 is never
# a target. An infinite old or behavior log-prob is a finite loss (a MIS weight of 0, a ratio of e^-20).
NAN, INF = float("nan"), float("inf")
NON_FINITE_PLACES = [("hidden", (3, 2), NAN), ("weight", (7, 1), NAN), ("advantages", (2,), NAN),
                     ("old_logprobs", (2,), NAN), ("ref_logprobs", (2,), NAN), ("behavior_logprobs", (0,), NAN),
                     ("old_logprobs", (2,), INF), ("old_logprobs", (2,), -INF), ("behavior_logprobs", (0,), INF)]


@pytest.mark.parametrize("backend,schedule", BACKEND_SCHEDULES)
@pytest.mark.parametrize("place", NON_FINITE_PLACES, ids=[f"{name}={value}" for name, _, value in NON_FINITE_PLACES])
@pytest.mark.parametrize("external", [False, True], ids=["on-policy", "external"])
@pytest.mark.parametrize("gamma", [0.5, 0.0])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_a_non_finite_input_gives_the_references_loss_and_metrics(backend, schedule, place, external, gamma,
                                                                   monkeypatch):
    """One NaN in an input the loss reads makes the loss NaN, as in the reference, so that a trainer sees
    it: the Triton kernels' max/min dropped a NaN operand (a NaN weight row, advantage or old log-prob gave
    a plausible finite loss). An input that is not read (behavior log-probs of on-policy tokens) changes
    nothing. The metrics are NaN exactly where the reference's are (a NaN log p ** 0 is 1, as torch.pow's),
    and infinite log-probs give the reference's finite loss (logaddexp(inf, inf) is inf, not inf - inf)."""
    if schedule is not None:
        monkeypatch.setenv("RLPLUS_SCHEDULE", schedule)
    torch.manual_seed(0)
    n, d, v = 8, 16, 12
    inputs = dict(hidden=torch.randn(n, d), weight=torch.randn(v, d) / 3, advantages=torch.randn(n),
                  old_logprobs=-torch.rand(n) - 1, ref_logprobs=-torch.rand(n) - 1,
                  behavior_logprobs=-torch.rand(n) - 1)
    name, index, value = place
    inputs[name][index] = value
    targets = torch.randint(0, 5, (n,))
    kwargs = dict(external_mask=torch.full((n,), external), kl_coef=0.1, entropy_coef=0.01, dual_clip=3.0,
                  gamma=gamma)
    if name != "behavior_logprobs":  # the estimator (e^o + 1) / 2 then: an infinite o goes through it
        inputs.pop("behavior_logprobs")
    hidden, weight = inputs.pop("hidden"), inputs.pop("weight")
    expected = rlplus_loss_reference(hidden.double(), weight.double(), targets, **inputs, **kwargs)
    hidden.requires_grad_()
    got = rlplus_loss(hidden, weight, targets, **inputs, **kwargs, backend=backend)
    assert got.loss.isnan() == expected.loss.isnan(), f"loss {got.loss.item()} vs reference {expected.loss.item()}"
    if not expected.loss.isnan():
        rtol, atol = TOLERANCES[torch.float32]["value"]
        assert_close(got.loss.detach(), expected.loss, rtol=rtol, atol=atol, name="loss")
    nan_metrics = {key for key, value in got.metrics.items() if value.isnan()}
    assert nan_metrics == {key for key, value in expected.metrics.items() if value.isnan()}
    if name in ("hidden", "weight"):  # a NaN logit: no finite gradient step either
        got.loss.backward()
        assert hidden.grad.isnan().any()


@pytest.mark.parametrize("backend,schedule", BACKEND_SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_nothing_reads_memory_it_did_not_write(backend, schedule, dtype, monkeypatch):
    """Every buffer the loss allocates uninitialised is written before it is read: with that memory poisoned
    (NaN, then huge values: PoisonedAllocations) the loss, log-probs, entropies, metrics and gradients are bit
    for bit those of a clean run. torch's CPU bfloat16 GEMM reads a padded dl chunk's rows past their last column
    (a vocabulary of 100 here, in one chunk) and multiplies that padding by 0: NaN there made gradients NaN at
    random."""
    if schedule is not None:
        monkeypatch.setenv("RLPLUS_SCHEDULE", schedule)
    torch.manual_seed(0)
    n, d, v = 40, 24, 100
    hidden, weight, bias = (leaf(n, d, scale=0.3).to(dtype).detach(), leaf(v, d).to(dtype).detach(),
                            leaf(v).to(dtype).detach())
    targets = torch.randint(0, v, (n,))
    targets[3] = -100
    data = dict(advantages=torch.randn(n), old_logprobs=-torch.rand(n) - 1, external_mask=torch.rand(n) < 0.3,
                ref_logprobs=-torch.rand(n) - 1, kl_coef=0.1, entropy_coef=0.01, temperature=0.7, backend=backend)

    def step():
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        out = rlplus_loss(leaves[0], leaves[1], targets, bias=leaves[2], **data)
        out.loss.backward()
        return [out.loss, out.logprobs, out.entropy, *out.metrics.values()] + [x.grad for x in leaves]

    assert_reads_only_what_it_wrote(step)


@pytest.mark.parametrize("backend,schedule", BACKEND_SCHEDULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_nan_token_reaches_only_its_own_row_of_grad_hidden(backend, schedule, dtype, monkeypatch):
    """A NaN advantage makes the loss NaN, and its own token's grad_hidden row; every other row stays finite, as in
    the reference (grad_hidden is row by row). torch's CPU bfloat16 GEMM read each row of a dl chunk whose stride
    was padded to 16 (not 32) past its end, into the next row: the NaN reached its neighbour's gradient too."""
    if schedule is not None:
        monkeypatch.setenv("RLPLUS_SCHEDULE", schedule)
    torch.manual_seed(0)
    n, d, v = 33, 24, 100
    hidden = (torch.randn(n, d) * 0.3).to(dtype).requires_grad_()
    weight = torch.randn(v, d).to(dtype)
    advantages = torch.randn(n)
    advantages[1] = float("nan")
    out = rlplus_loss(hidden, weight, torch.randint(0, v, (n,)), advantages, -torch.rand(n) - 1, loss_agg="sum",
                      backend=backend)
    out.loss.backward()
    assert out.loss.isnan()
    assert hidden.grad.isnan().any(1).nonzero().flatten().tolist() == [1]


@pytest.mark.parametrize("backend,schedule", BACKEND_SCHEDULES)
def test_no_host_read_while_a_cuda_graph_is_captured(backend, schedule, monkeypatch):
    """A host read while a CUDA graph is captured is an error (cudaErrorStreamCaptureUnsupported), and so the
    captured step of a trainer failed at the check of the targets' range. Now the value checks (targets,
    cu_seqlens, a tensor normalizer) run on the device then, as inside torch.compile, and at every replay.
    Capture is faked on CPU tensors: the step that reads values on the host eagerly reads none, with the same
    loss, log-probs and gradients; bad values are still refused, with the device message."""
    from rlplus_kernels import validation

    if schedule is not None:
        monkeypatch.setenv("RLPLUS_SCHEDULE", schedule)
    torch.manual_seed(0)
    cu_seqlens = torch.tensor([0, 3, 3, 8, 10])
    n = int(cu_seqlens[-1])
    hidden, weight, bias = leaf(n, 16), leaf(12, 16, scale=0.3), leaf(12)
    targets = torch.randint(0, 12, (n,))
    targets[4] = -100
    data = dict(advantages=torch.randn(4), old_logprobs=-torch.rand(n) - 1,
                external_mask=torch.tensor([False, True, False, True]), ref_logprobs=-torch.rand(n) - 1,
                loss_mask=torch.arange(n) != 6, bias=bias, cu_seqlens=cu_seqlens, normalizer=torch.tensor(3.0),
                kl_coef=0.1, entropy_coef=0.01, loss_agg="seq-mean-token-mean", backend=backend)

    def step(**changes):
        for x in (hidden, weight, bias):
            x.grad = None
        with HostReads() as reads:
            out = rlplus_loss(hidden, weight, changes.pop("targets", targets), **{**data, **changes})
            out.loss.backward()
        return out, [x.grad for x in (hidden, weight, bias)], reads.reads

    eager, eager_grads, eager_reads = step()
    assert eager_reads, "the eager checks read values on the host (else this test could not fail)"
    monkeypatch.setattr(validation, "graph_capturing", lambda device: True)
    captured, captured_grads, captured_reads = step()
    assert captured_reads == []
    assert torch.equal(captured.loss, eager.loss) and torch.equal(captured.logprobs, eager.logprobs)
    for name, got, expected in zip(("hidden", "weight", "bias"), captured_grads, eager_grads):
        assert torch.equal(got, expected), f"grad_{name}"

    bad_targets = targets.clone()
    bad_targets[2] = 12
    refusals = [
        (dict(targets=bad_targets), "targets must lie in [0, V) or equal ignore_index (V: the vocabulary size)"),
        (dict(cu_seqlens=torch.tensor([0, 3, 2, 8, 10])), "cu_seqlens must start at 0, end at N and never decrease"),
        (dict(normalizer=torch.tensor(0.0)), "normalizer must be finite and > 0")]
    for changes, message in refusals:
        with pytest.raises(RuntimeError, match=re.escape(message)):  # torch._assert_async's error on a CPU tensor
            step(**changes)


def test_what_a_cuda_graph_cannot_capture_is_refused_by_name(monkeypatch):
    """While a CUDA graph is captured, a CPU normalizer's copy to the GPU and a vocabulary-parallel call's
    exchange of shard sizes would fail inside CUDA: each is refused naming the argument, before anything is
    copied or exchanged."""
    from rlplus_kernels import distributed, validation
    from rlplus_kernels.config import RLPlusConfig

    monkeypatch.setattr(validation, "graph_capturing", lambda device: True)
    monkeypatch.setattr(distributed, "graph_capturing", lambda device: True)
    with pytest.raises(ValueError, match=re.escape("normalizer is a CPU tensor while a CUDA graph is captured")):
        validation.check_normalizer(torch.tensor(8.0), torch.device("cuda"))
    with pytest.raises(ValueError, match=re.escape("vocab_parallel_group: the ranks' exchange of shard sizes reads "
                                                   "them on the host, which cannot happen while a CUDA graph is "
                                                   "captured")):
        distributed.vocab_layout(torch.randn(4, 8), torch.zeros(4, dtype=torch.long), RLPlusConfig())

    # a rank's own refusal raises as it is: the exchange that would tell the other ranks (a copy from the host)
    # cannot run either, and the others refuse at vocab_layout
    exchanges = []

    def refuses():
        raise ValueError("this rank's inputs")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed, "_exchange", lambda *args: exchanges.append(args))
    with pytest.raises(ValueError, match="this rank's inputs"):
        distributed.checked_on_every_rank(object(), refuses)
    assert exchanges == []
