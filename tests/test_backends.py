"""Every backend against the float64 reference: property tests over shapes, dtypes and all options."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import TOLERANCES, assert_close, assert_grad_close, dot_product_allowance, reference_inputs
from problems import build, problems
from reference import linear_logprobs_reference, rlplus_loss_from_logprobs_reference, rlplus_loss_reference
from rlplus_kernels import linear_logprobs, rlplus_loss

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

TORCH_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# bfloat16 runs through the interpreter too: the launcher upcasts it there (triton 3.9's interpreter
# computes bfloat16 tl.dot wrongly), so the GPU runs are what cover the bf16 tensor-core path.
TRITON_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _reference_runs(run, hidden, weight, bias, problem):
    """run(hidden, weight, bias, dtype) in float64 (the truth) and, for lower-precision inputs, in
    float32 (PyTorch's own error, allowed twice over), each on float64 leaf copies of the inputs."""
    runs = []
    for dtype in [torch.float64] + ([torch.float32] if problem.dtype != torch.float64 else []):
        leaves = reference_inputs(hidden, weight, bias)
        runs.append((run(*leaves, dtype), [t for t in leaves if t is not None]))
    return runs + [(None, None)] * (2 - len(runs))


NOT_HEAD = ("temperature", "chunk_tokens", "chunk_vocab")


def _per_token_upstream(head_loss, hidden, weight, bias, targets, temperature):
    """d loss / d logp and d loss / d entropy per token, from the reference's RL head."""
    logp, entropy = linear_logprobs_reference(hidden.detach(), weight.detach(), targets,
                                              bias=None if bias is None else bias.detach(),
                                              temperature=temperature, return_entropy=True)
    logp.requires_grad_(), entropy.requires_grad_()
    return torch.autograd.grad(head_loss(logp, entropy), (logp, entropy), allow_unused=True)


def _allowances(problem, hidden, weight, bias, targets, grad_logp, grad_entropy):
    if problem.dtype == torch.float64:
        return [None] * 3
    return dot_product_allowance(grad_logp, grad_entropy, hidden, weight, bias, targets,
                                 problem.options["temperature"])


def check_rlplus_loss(problem, backend):
    args, kwargs = build(problem)
    hidden, weight, targets, advantages, old = args
    bias = kwargs.pop("bias")
    leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    out = rlplus_loss(hidden, weight, targets, advantages, old, bias=bias, backend=backend, **kwargs)
    (ref, ref_leaves), (own, own_leaves) = _reference_runs(
        lambda h, w, b, dtype: rlplus_loss_reference(h, w, targets, advantages, old, bias=b, dtype=dtype, **kwargs),
        hidden, weight, bias, problem)
    tol = TOLERANCES[problem.dtype]
    rtol, atol = tol["value"]
    expected_dtype = torch.float64 if problem.dtype == torch.float64 else torch.float32
    assert out.loss.dtype == expected_dtype and out.loss.dim() == 0
    assert out.logprobs.dtype == expected_dtype and not out.logprobs.requires_grad
    own_value = lambda get: None if own is None else get(own)  # noqa: E731
    assert_close(out.loss.detach(), ref.loss.detach(), rtol=rtol, atol=atol, name="loss",
                 baseline=own_value(lambda o: o.loss.detach()))
    assert_close(out.logprobs, ref.logprobs, rtol=rtol, atol=atol, name="logprobs",
                 baseline=own_value(lambda o: o.logprobs))
    assert (out.entropy is None) == (ref.entropy is None)
    if out.entropy is not None:
        assert_close(out.entropy, ref.entropy, rtol=rtol, atol=atol, name="entropy",
                     baseline=own_value(lambda o: o.entropy))
    assert out.metrics.keys() == ref.metrics.keys()
    for key, value in ref.metrics.items():
        assert out.metrics[key].dim() == 0 and not out.metrics[key].requires_grad
        assert_close(out.metrics[key], value, rtol=rtol, atol=atol, name=f"metrics[{key}]",
                     baseline=own_value(lambda o: o.metrics[key]))

    # a random upstream scale: the gradients are those of c * loss, not of the loss alone
    scale = torch.randn(()).item()
    grads = torch.autograd.grad(out.loss * scale, leaves)
    ref_grads = torch.autograd.grad(ref.loss * scale, ref_leaves)
    allowances = _allowances(problem, hidden, weight, bias, targets, *_per_token_upstream(
        lambda logp, entropy: scale * rlplus_loss_from_logprobs_reference(
            logp, entropy, targets, advantages, old, **{k: v for k, v in kwargs.items() if k not in NOT_HEAD}).loss,
        hidden, weight, bias, targets, problem.options["temperature"]))
    for name, g, rg, allowance, leaf in zip(["hidden", "weight", "bias"], grads, ref_grads, allowances, leaves):
        assert g.dtype == leaf.dtype, f"grad {name} dtype {g.dtype} != input dtype {leaf.dtype}"
        assert_grad_close(g, rg, rtol=tol["grad"], name=f"grad_{name}", allowance=allowance)


def check_linear_logprobs(problem, backend):
    """Both outputs of linear_logprobs, with random upstream gradients on both."""
    args, kwargs = build(problem)
    hidden, weight, targets = args[:3]
    bias, temperature = kwargs["bias"], problem.options["temperature"]
    leaves = [t.requires_grad_() for t in (hidden, weight, bias) if t is not None]
    logp, entropy = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature,
                                    return_entropy=True, backend=backend,
                                    chunk_tokens=problem.options.get("chunk_tokens"),
                                    chunk_vocab=problem.options.get("chunk_vocab"))
    (ref, ref_leaves), (own, own_leaves) = _reference_runs(
        lambda h, w, b, dtype: linear_logprobs_reference(h, w, targets, bias=b, temperature=temperature,
                                                         return_entropy=True, dtype=dtype),
        hidden, weight, bias, problem)
    tol = TOLERANCES[problem.dtype]
    rtol, atol = tol["value"]
    for i, name in enumerate(["logprobs", "entropy"]):
        assert_close([logp, entropy][i].detach(), ref[i].detach(), rtol=rtol, atol=atol, name=name,
                     baseline=None if own is None else own[i].detach())
    upstream = (torch.randn_like(ref[0]), torch.randn_like(ref[1]))
    grads = torch.autograd.grad((logp, entropy), leaves, tuple(u.to(logp.dtype) for u in upstream))
    ref_grads = torch.autograd.grad(ref, ref_leaves, upstream)
    allowances = _allowances(problem, hidden, weight, bias, targets, *upstream)
    for name, g, rg, allowance in zip(["hidden", "weight", "bias"], grads, ref_grads, allowances):
        assert_grad_close(g, rg, rtol=tol["grad"], name=f"grad_{name}", allowance=allowance)


@given(problems(TORCH_DTYPES))
def test_torch_backend_loss_matches_reference(problem):
    check_rlplus_loss(problem, "torch")


@given(problems(TORCH_DTYPES))
def test_torch_backend_logprobs_match_reference(problem):
    check_linear_logprobs(problem, "torch")


@needs_triton
@settings(max_examples=25)
@given(problems(TRITON_DTYPES, max_tokens=24, max_hidden=20, max_vocab=80, chunked=False))
def test_triton_backend_loss_matches_reference(problem):
    check_rlplus_loss(problem, "triton")


@needs_triton
@settings(max_examples=15)
@given(problems(TRITON_DTYPES, max_tokens=24, max_hidden=20, max_vocab=80, chunked=False))
def test_triton_backend_logprobs_match_reference(problem):
    check_linear_logprobs(problem, "triton")


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("shape", [(1,), (2, 1), (5, 3)])
def test_degenerate_sizes(backend, shape):
    """N=1, V=2, D=1: the smallest problems, with every option on."""
    hidden = torch.randn(*shape, 1, requires_grad=True)
    weight = torch.randn(2, 1, requires_grad=True)
    targets = torch.randint(0, 2, shape)
    kwargs = dict(external_mask=torch.rand(shape) < 0.5, entropy_coef=0.01, kl_coef=0.1,
                  ref_logprobs=-torch.rand(shape), dual_clip=2.0, return_entropy=True)
    args = (targets, torch.randn(shape), -torch.rand(shape))
    out = rlplus_loss(hidden, weight, *args, backend=backend, **kwargs)
    ref_hidden, ref_weight = reference_inputs(hidden, weight)
    ref = rlplus_loss_reference(ref_hidden, ref_weight, *args, **kwargs)
    assert_close(out.loss.detach(), ref.loss.detach(), rtol=2e-5, atol=2e-5, name="loss")
    assert_close(out.entropy, ref.entropy, rtol=2e-5, atol=2e-5, name="entropy")
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref.loss, (ref_hidden, ref_weight))
    for name, g, rg in zip(["hidden", "weight"], grads, ref_grads):
        assert_grad_close(g, rg, rtol=2e-5, name=f"grad_{name}")
