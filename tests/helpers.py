"""Shared test utilities: tolerance table, a comparison that prints the worst element, problem builders."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from rlplus_kernels._environment import major_minor
from rlplus_kernels.backends import triton_installed, triton_interpreting

# backend="triton" on CPU tensors runs under Triton's interpreter only (conftest.py turns it on
# unless TRITON_INTERPRET=0 was set, as on a GPU run of the compiled kernels)
TRITON_ON_CPU = triton_installed() and triton_interpreting()
TORCH_VERSION = major_minor(torch.__version__)
CPU_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not TRITON_ON_CPU, reason="triton on CPU tensors needs triton installed and TRITON_INTERPRET=1"))]

# (rtol, atol) of a backend against the float64 reference evaluated on the same (rounded) inputs.
# Values may also err by the effect of float32 rounding of the log-probs (eps |z| each, see
# test_backends._logit_rounding) propagated through the RL head. Gradients may also
# err by the rounding of the float32 dot products that form them (`dot_product_allowance`): a gradient
# like w_y - E_p[w] cancels, and float32 cannot do better than eps * sum |dz_v| |w_v|.
# Losses and log-probs are accumulated in float32 whatever the input dtype, so only gradients, which
# come back in the input dtype, pay the input precision: the allowance takes the rounding of dz to it,
# and the gradient's own rounding errs by half an ulp, u = 2^-11 in float16 (11 significant bits) and
# 2^-8 in bfloat16 (8), relative to each element: that u is the rtol (relative to the gradient's norm).
TOLERANCES = {
    torch.float64: dict(value=(1e-10, 1e-12), grad=1e-10),
    torch.float32: dict(value=(2e-5, 2e-5), grad=2e-5),
    torch.float16: dict(value=(2e-5, 2e-5), grad=2.0**-11),
    torch.bfloat16: dict(value=(2e-5, 2e-5), grad=2.0**-8),
}


def assert_close(actual, expected, *, rtol, atol, name, allowance=None):
    """|actual - expected| <= atol + rtol |expected| + allowance, elementwise; names the worst element.

    `allowance` is the float32 rounding error that no float32 implementation can avoid (None: none).
    """
    actual = torch.as_tensor(actual).double().cpu()
    expected = torch.as_tensor(expected).double().cpu()
    allowance = 0 if allowance is None else torch.as_tensor(allowance).double().cpu()
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values {actual[~torch.isfinite(actual)][:5]}"
    # a NaN reference or allowance would compare as no excess: it is a failure, not a pass
    assert torch.isfinite(expected).all(), f"{name}: non-finite expected {expected[~torch.isfinite(expected)][:5]}"
    assert torch.isfinite(torch.as_tensor(allowance)).all(), f"{name}: non-finite allowance"
    excess = (actual - expected).abs() - (atol + rtol * expected.abs() + allowance)
    if actual.numel() and excess.max() > 0:
        i = int(excess.flatten().argmax())
        index = tuple(int(k) for k in torch.unravel_index(torch.tensor(i), actual.shape)) if actual.dim() else ()
        raise AssertionError(
            f"{name}: worst element {index}: got {actual.flatten()[i].item():.10g}, expected "
            f"{expected.flatten()[i].item():.10g} (rtol={rtol}, atol={atol})")


def assert_rounded_once(actual, expected, *, allowance, name):
    """A half-precision gradient of float32 work, rounded once to its dtype, element by element: within half an ulp,
    u |expected| (half the smallest normal's ulp where it is subnormal), of `expected`, plus `allowance`
    (`dot_product_allowance`)."""
    u = torch.finfo(actual.dtype).eps / 2
    assert_close(actual, expected, rtol=u, atol=torch.finfo(actual.dtype).tiny * u, allowance=allowance, name=name)


FLOAT32_EPS = 2.0**-24
# rlplus_loss options that the RL head alone (rlplus_loss_from_logprobs_reference) does not take
NOT_HEAD = ("temperature", "chunk_tokens", "chunk_vocab", "backend")


def exact_entropy(logits: torch.Tensor) -> torch.Tensor:
    """The entropy of softmax(logits) over the last dimension, in float64."""
    z = logits.double()
    return -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)


def dz_rounding(dtype, backend) -> float:
    """Relative error of dz stored in `dtype` for a half-precision GEMM by `backend`: the Triton backend rounds it
    to half an ulp (u = 2^-11 in float16, 2^-8 in bfloat16), a whole one for bfloat16 under Triton's interpreter,
    which converts float32 to bfloat16 by truncation (2^-7: 1999 of 4096 values differ from round-to-nearest,
    all toward 0; compiled kernels round to nearest). The torch backend keeps dz in float32 (float64): 0."""
    if backend == "torch" or dtype not in (torch.float16, torch.bfloat16):
        return 0.0
    truncates = dtype == torch.bfloat16 and backend == "triton" and TRITON_ON_CPU
    return torch.finfo(dtype).eps * (1.0 if truncates else 0.5)


def dot_product_allowance(grad_logp, grad_entropy, hidden, weight, bias, targets, temperature, *, backend,
                          ignore_index=-100, log_p_rounding=0.0, log_p_offset=0.0):
    """Rounding allowance of float32 gradients, from float32 error analysis of z -> dz -> grads.

    The input dtype's relative rounding of dz is allowed too: a backend may round the logits' gradient
    to the input dtype to feed half-precision GEMMs, as autograd through a half nn.Linear does (scaled
    so that float16 keeps it normal; underflow to subnormals or zero is not allowed for).

    Each logit is a float32 dot product, so log p_v = z_v - lse errs by about eps |z|; the gradient of
    the logits, dz_v = g_logp (1[v=y] - p_v) - g_ent p_v (log p_v + H), errs by that times the size of
    its terms before they cancel, M_v = |g_logp| (1[v=y] + p_v) + |g_ent| p_v (1 + |log p_v| + H) (the 1:
    moving log p_v by d moves p_v (log p_v + H) by p_v (1 + log p_v + H) d, which matters where p -> 1); the
    gradients sum K such terms (K = V for hidden, N for weight and bias). Allowance:
    (8 eps (sqrt(K) + max|z|) + r) * (M @ |W|, M^T @ |h|, sum M), M including 1/temperature, r the rounding of
    dz to the input dtype by `backend` (`dz_rounding`).

    `log_p_rounding` r, where a kernel rounds T (log p + c) to the input dtype (c: `log_p_offset`, per token [N]
    or 0), moves each log p by up to r (|log p| + |c|): that times the dz terms that depend on p,
    M - |g_logp| 1[v=y], is added. grad_logp or grad_entropy may be None.
    """
    h = hidden.detach().double().reshape(-1, hidden.shape[-1])
    w = weight.detach().double()
    z = (h @ w.T + (0 if bias is None else bias.detach().double())) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1, keepdim=True)
    active = (targets.reshape(-1) != ignore_index)[:, None]
    onehot = torch.zeros_like(p).scatter_(1, targets.reshape(-1, 1).clamp(min=0), 1.0)
    g1 = 0 if grad_logp is None else grad_logp.detach().double().reshape(-1, 1).abs()
    g2 = 0 if grad_entropy is None else grad_entropy.detach().double().reshape(-1, 1).abs()
    through_p = g1 * p + g2 * p * (1 + log_p.abs() + entropy)
    M = torch.where(active, g1 * onehot + through_p, 0.0) / temperature
    offset = torch.as_tensor(log_p_offset, dtype=torch.float64, device=p.device).reshape(-1, 1).abs()
    from_log_p = torch.where(active, log_p_rounding * (log_p.abs() + offset) * through_p, 0.0) / temperature
    rounding = dz_rounding(hidden.dtype, backend)
    factor = lambda terms: 8 * FLOAT32_EPS * (terms**0.5 + z.abs().max().item()) + rounding  # noqa: E731
    allowances = [(factor(w.shape[0]) * M + from_log_p) @ w.abs(), (factor(h.shape[0]) * M + from_log_p).T @ h.abs()]
    allowances[0] = allowances[0].reshape(hidden.shape)
    if bias is not None:
        allowances.append((factor(h.shape[0]) * M + from_log_p).sum(0))
    return allowances


def assert_grad_close(actual, expected, *, rtol, name, allowance=None):
    """||actual - expected|| <= rtol ||expected|| + ||allowance|| (+ a floor for zero gradients)."""
    assert actual is not None, f"{name}: gradient missing"
    # a half-precision gradient cannot resolve values below its smallest subnormal (6e-8 in float16)
    resolution = (torch.finfo(actual.dtype).tiny * torch.finfo(actual.dtype).eps * actual.numel() ** 0.5
                  if actual.dtype in (torch.float16, torch.bfloat16) else 0.0)
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert torch.isfinite(actual).all(), f"{name}: non-finite gradient"
    assert torch.isfinite(expected).all(), f"{name}: non-finite reference gradient"  # NaN > bound is False
    error = (actual - expected).norm().item()
    bound = (rtol * expected.norm().item() + (0 if allowance is None else allowance.norm().item())
             + resolution + 1e-12)
    assert bound < float("inf"), f"{name}: non-finite allowance"  # a NaN bound would pass any error
    if error > bound:
        i = int((actual - expected).abs().flatten().argmax())
        raise AssertionError(
            f"{name}: |err| {error:.3e} > {bound:.3e}; worst element {i}: got {actual.flatten()[i].item():.10g}, "
            f"expected {expected.flatten()[i].item():.10g}")


def reference_inputs(*tensors):
    """float64 leaf copies of the (already rounded) inputs, for the reference."""
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def _custom_op_bodies() -> dict:
    """The package's custom ops (OpOverload -> the Python body they run); the Triton ones where their module is
    loaded (it needs triton), the only case in which they can be called."""
    from rlplus_kernels.backends import raw_ops, single_pass_op

    bodies = {torch.ops.rlplus.linear_logprobs_fwd.default: raw_ops.linear_logprobs_fwd_body,
              torch.ops.rlplus.linear_logprobs_bwd.default: raw_ops.linear_logprobs_bwd_body,
              torch.ops.rlplus.rlplus_loss_single_pass.default: single_pass_op.single_pass_body}
    for module, op, definition in (("triton_op", "linear_logprobs", "_linear_logprobs_op"),
                                   ("triton_head", "rlplus_head", "_rlplus_head_op")):
        loaded = sys.modules.get(f"rlplus_kernels.backends.{module}")
        if loaded is not None:
            bodies[getattr(torch.ops.rlplus, op).default] = getattr(loaded, definition)._init_fn
    return bodies


class SeesInsideCustomOps(TorchDispatchMode):
    """A dispatch mode that observes every op, also those inside the package's custom ops, which a mode otherwise
    sees as one op: it runs their bodies under itself."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        body = _custom_op_bodies().get(func)
        if body is not None:
            with self:
                return body(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        self.observe(func, args, kwargs or {}, out)
        return out


class CountMatmuls(SeesInsideCustomOps):
    def __init__(self):
        super().__init__()
        self.count = 0

    def observe(self, func, args, kwargs, out):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
            self.count += 1


# Ops whose output size depends on the data: on a GPU they wait for it (a host sync)
_SIZED_BY_DATA = (torch.ops.aten.nonzero, torch.ops.aten.masked_select, torch.ops.aten._unique2,
                  torch.ops.aten.unique_consecutive, torch.ops.aten.unique_dim)


class HostReads(SeesInsideCustomOps):
    """The ops that read a tensor's value on the host or wait for it on a GPU (bool(), .item(), an output sized by
    the data: a boolean index, repeat_interleave without output_size): a host sync on a GPU, an error while a CUDA
    graph is captured. Their names, in order."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def observe(self, func, args, kwargs, out):
        boolean_index = func.overloadpacket is torch.ops.aten.index and any(
            isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        unsized_repeat = func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None
        if (func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default,
                     torch.ops.aten.is_nonzero.default) or func.overloadpacket in _SIZED_BY_DATA
                or boolean_index or unsized_repeat):
            self.reads.append(str(func))


class LargestAllocation(SeesInsideCustomOps):
    """The largest tensor any op returned, in elements and in bytes (Triton's interpreter views each kernel
    argument's storage as bytes: its element count is then the byte count)."""

    def __init__(self):
        super().__init__()
        self.largest = self.largest_bytes = 0

    def observe(self, func, args, kwargs, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())


class PoisonedAllocations:
    """Within it, `torch.empty`, `torch.empty_like`, `torch.empty_strided` and `Tensor.new_empty` called from Python
    return memory filled as uninitialised memory may be: NaN, or with `finite=True` the dtype's largest value (a NaN
    read only by a comparison goes unseen; a huge value changes it); integers their smallest or largest value, bool
    True or False. A result that differs from an unpoisoned run's read memory nothing wrote."""

    _FACTORIES = ((torch, "empty"), (torch, "empty_like"), (torch, "empty_strided"), (torch.Tensor, "new_empty"))

    def __init__(self, finite: bool = False):
        self.finite = finite

    def _poisoned(self, allocate):
        def poisoned_allocate(*args, **kwargs):
            out = allocate(*args, **kwargs)
            if out.dtype.is_floating_point:
                return out.fill_(torch.finfo(out.dtype).max if self.finite else float("nan"))
            if out.dtype == torch.bool:
                return out.fill_(not self.finite)
            info = torch.iinfo(out.dtype)
            return out.fill_(info.min if self.finite else info.max)
        return poisoned_allocate

    def __enter__(self):
        self._saved = [(owner, name, getattr(owner, name)) for owner, name in self._FACTORIES]
        for owner, name, allocate in self._saved:
            setattr(owner, name, self._poisoned(allocate))
        return self

    def __exit__(self, *exc):
        for owner, name, allocate in self._saved:
            setattr(owner, name, allocate)
        return False


def assert_reads_only_what_it_wrote(run):
    """run() -> list of tensors, all finite, gives bit for bit the same with uninitialised memory poisoned (NaN, then
    huge values: PoisonedAllocations)."""
    clean = run()
    assert all(torch.isfinite(x).all() for x in clean)
    for finite in (False, True):
        with PoisonedAllocations(finite=finite):
            poisoned = run()
        for i, (got, want) in enumerate(zip(poisoned, clean)):
            assert torch.equal(got, want), f"output {i} read memory nothing wrote (finite poison: {finite})"
