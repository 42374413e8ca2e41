"""rlplus_loss inside torch.compile(fullgraph=True): no graph break, same loss and gradients."""

from __future__ import annotations

import re

import pytest
import torch

from helpers import CPU_BACKENDS, TORCH_VERSION
from rlplus_kernels import rlplus_loss

BACKENDS = CPU_BACKENDS  # these tests build CPU tensors


def _loss(hidden, weight, targets, advantages, old, external, backend):
    out = rlplus_loss(hidden, weight, targets, advantages, old, external_mask=external, entropy_coef=0.01,
                      backend=backend)
    return out.loss, out.metrics["clip_frac"], out.logprobs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen_head", [False, True])
def test_compiled_loss_matches_eager(backend, frozen_head):
    torch._dynamo.reset()
    N, D, V = 8, 16, 40
    hidden = torch.randn(N, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=not frozen_head)
    batch = (torch.randint(0, V, (N,)), torch.randn(N), -torch.rand(N), torch.rand(N) < 0.5)

    eager = _loss(hidden, weight, *batch, backend)
    eager[0].backward()
    eager_grads = [hidden.grad.clone(), None if frozen_head else weight.grad.clone()]
    hidden.grad = weight.grad = None

    compiled = torch.compile(_loss, fullgraph=True)(hidden, weight, *batch, backend)
    compiled[0].backward()
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c.detach(), e.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden.grad, eager_grads[0], rtol=1e-5, atol=1e-6)
    if frozen_head:
        assert weight.grad is None
    else:
        torch.testing.assert_close(weight.grad, eager_grads[1], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(TORCH_VERSION < (2, 13),
                    reason="compiled autocast equals eager only where inductor emulates eager's half-precision "
                           "casts fully: checked on torch 2.13; 2.6 and 2.11 differ by 2 % here (2.11: the torch backend)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_loss_under_autocast(backend):
    torch._dynamo.reset()
    hidden, weight = torch.randn(6, 16, requires_grad=True), torch.randn(24, 16, requires_grad=True)
    batch = (torch.randint(0, 24, (6,)), torch.randn(6), -torch.rand(6), torch.rand(6) < 0.5)
    # Inductor fuses away half-precision round trips unless told to emulate them; eager rounds the cast inputs.
    with (torch._inductor.config.patch(emulate_precision_casts=True),
          torch.autocast("cpu", dtype=torch.float16 if backend == "triton" else torch.bfloat16)):
        eager = _loss(hidden, weight, *batch, backend)
        compiled = torch.compile(_loss, fullgraph=True)(hidden, weight, *batch, backend)
    torch.testing.assert_close(compiled[0], eager[0])
    eager_grads = torch.autograd.grad(eager[0], (hidden, weight))
    compiled_grads = torch.autograd.grad(compiled[0], (hidden, weight))
    for got, want in zip(compiled_grads, eager_grads):
        assert got.dtype == torch.float32  # the leaves' dtype, through the half-precision cast
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hyper_parameters_that_change_between_compiled_calls(backend):
    """An entropy-coefficient schedule or an adaptive KL coefficient passes a new float each step:
    torch.compile then traces it as a symbolic float, which the validation must take (it raised
    inside math.isfinite from the second value on)."""
    torch._dynamo.reset()
    N, D, V = 8, 16, 40
    hidden, weight = torch.randn(N, D, requires_grad=True), torch.randn(V, D)
    targets, advantages, ref = torch.randint(0, V, (N,)), torch.randn(N), -torch.rand(N)

    def step(hidden, entropy_coef, temperature, kl_coef):
        return rlplus_loss(hidden, weight, targets, advantages, entropy_coef=entropy_coef, temperature=temperature,
                           kl_coef=kl_coef, ref_logprobs=ref, backend=backend).loss

    compiled = torch.compile(step, fullgraph=True)
    for values in ((0.01, 0.7, 0.1), (0.02, 0.9, 0.05), (0.03, 1.3, 0.2)):
        torch.testing.assert_close(compiled(hidden, *values), step(hidden, *values), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(TORCH_VERSION < (2, 6), reason="torch < 2.6 makes every float argument of a compiled function a "
                                                  "constant of its graph: each new value recompiles (2.4: checked)")
@pytest.mark.parametrize("backend,schedule", [("torch", None), *[
    pytest.param("triton", s, marks=CPU_BACKENDS[1].marks) for s in ("two-pass", "single-pass")]])
@pytest.mark.parametrize("coefficient", ["entropy_coef", "kl_coef", "clip_eps_low", "clip_eps_high", "dual_clip",
                                         "gamma", "mis_clip_max"])
def test_a_coefficient_schedule_compiles_twice_not_once_per_value(backend, schedule, coefficient, monkeypatch):
    """An adaptive KL controller, an entropy schedule or an annealed clip range sets a new value every step. The
    Triton head took them as float arguments of its custom ops, and the torch head passed the clip bounds to
    torch.clamp and gamma to `**`: constants of the compiled graph, so every value recompiled, and the ninth raised
    torch's recompile limit under fullgraph. Now the first value compiles a static graph, the second a dynamic
    one, for all ten (loss and gradient as in eager). Every bound binds for every value (on-policy ratios of 0.5,
    2 and 20; confident external tokens, MIS weights near 4), so that each value changes the loss."""
    from torch._dynamo.testing import CompileCounterWithBackend

    if schedule is not None:
        monkeypatch.setenv("RLPLUS_SCHEDULE", schedule)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # traces the backward too
    torch.manual_seed(0)
    N, D, V = 12, 16, 40
    weight, hidden = torch.randn(V, D), torch.randn(N, D)
    external = torch.arange(N) % 3 == 0
    hidden[external] *= 3
    logits = hidden @ weight.T
    targets = torch.where(external, logits.argmax(-1), torch.randint(0, V, (N,)))
    logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    log_ratio = torch.tensor([0.0, -0.7, 0.7, 0.0, 3.0, 0.1, 0.0, -0.7, 0.7, 0.0, 3.0, -0.1])
    advantages = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0, 0.5, -1.0, -2.0, 2.0, 1.5, -0.5, 1.0])
    old, ref = torch.where(external, -8.0, logp - log_ratio), logp - 0.5
    start = {"entropy_coef": 0.01, "kl_coef": 0.05, "clip_eps_low": 0.2, "clip_eps_high": 0.28, "dual_clip": 3.0,
             "gamma": 0.5, "mis_clip_max": 2.0}

    def step(hidden, value):
        hyper = {**start, coefficient: value}
        return rlplus_loss(hidden, weight, targets, advantages, old, external_mask=external, ref_logprobs=ref,
                           backend=backend, **hyper).loss

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    eager_losses = set()
    for value in [start[coefficient] * (1 + 0.1 * k) for k in range(10)]:
        eager_leaf, compiled_leaf = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
        want, got = step(eager_leaf, value), compiled(compiled_leaf, value)
        want.backward()
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(compiled_leaf.grad, eager_leaf.grad, rtol=1e-5, atol=1e-6)
        eager_losses.add(want.item())
    assert len(eager_losses) == 10, f"{coefficient}: some values do not change the loss, so a stale graph would pass"
    assert counter.frame_count <= 2, f"{counter.frame_count} compilations for 10 values of {coefficient}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_packed_sequences(backend):
    """Packed [N] inputs with cu_seqlens (a seq mode, per-sequence advantages) under fullgraph: the
    cu_seqlens check runs on the device (it synchronised with the host, a graph break)."""
    torch._dynamo.reset()
    N, D, V = 8, 16, 40
    hidden, weight = torch.randn(N, D, requires_grad=True), torch.randn(V, D)
    targets, cu_seqlens, advantages = torch.randint(0, V, (N,)), torch.tensor([0, 3, 8]), torch.randn(2)

    def step(hidden, cu_seqlens):
        return rlplus_loss(hidden, weight, targets, advantages, loss_agg="seq-mean-token-mean", cu_seqlens=cu_seqlens,
                           backend=backend).loss

    torch.testing.assert_close(torch.compile(step, fullgraph=True)(hidden, cu_seqlens), step(hidden, cu_seqlens),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_token_count_does_not_recompile_per_batch(backend):
    """Rollout batches change size every step. The torch backend's chunk loops specialised the
    compiled graph on the token count: one recompile per size, then torch._dynamo's recompile limit
    (8) raised. Now the first size compiles a static graph and the second a dynamic one, for all 10."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")  # traces the backward too
    D, V = 16, 40
    weight = torch.randn(V, D, requires_grad=True)

    def step(hidden, targets, advantages):
        return rlplus_loss(hidden, weight, targets, advantages, entropy_coef=0.01, backend=backend).loss

    compiled = torch.compile(step, fullgraph=True, backend=counter)
    for n_tokens in range(4, 14):
        hidden = torch.randn(n_tokens, D, requires_grad=True)
        batch = (torch.randint(0, V, (n_tokens,)), torch.randn(n_tokens))
        loss = compiled(hidden, *batch)
        grads = torch.autograd.grad(loss, (hidden, weight))
        eager = torch.autograd.grad(step(hidden, *batch), (hidden, weight))
        torch.testing.assert_close(loss, step(hidden, *batch), rtol=1e-5, atol=1e-6)
        for got, want in zip(grads, eager):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counter.frame_count <= 2


@pytest.mark.skipif(TORCH_VERSION < (2, 11), reason="dynamo's error carries the message of an exception raised in "
                    "a fullgraph step in recent torch; checked on 2.11 and 2.13")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_bad_shape_after_a_dynamic_recompile_is_named(backend):
    """After a second token count, dynamo compiles with symbolic sizes; a bad shape then must still give
    the validation's message (formatting the symbolic shape failed: "Failed to trace builtin operator")."""
    torch._dynamo.reset()
    D, V = 16, 40
    weight = torch.randn(V, D)
    compiled = torch.compile(lambda hidden, targets, advantages: rlplus_loss(
        hidden, weight, targets, advantages, backend=backend).loss, fullgraph=True)
    for n_tokens in (5, 6):
        compiled(torch.randn(n_tokens, D), torch.randint(0, V, (n_tokens,)), torch.randn(n_tokens))
    with pytest.raises(Exception, match=r"advantages must have shape \[8\], got \[3\]"):
        compiled(torch.randn(8, D), torch.randint(0, V, (8,)), torch.randn(3))


@pytest.mark.skipif(TORCH_VERSION < (2, 11), reason="dynamo's error carries the message of an exception raised in "
                    "a fullgraph step in recent torch; checked on 2.11 and 2.13")
@pytest.mark.parametrize("name", ["entropy_coef", "temperature", "gamma", "normalizer"])
def test_a_numpy_scalar_inside_a_compiled_step_is_refused_by_name(name):
    """torch.compile traces a numpy scalar as a 0-dim array of unknown value: the first comparison with it failed
    inside sympy ("sympy expression is NaN"), naming neither the argument nor the remedy (a Python number)."""
    np = pytest.importorskip("numpy")
    torch._dynamo.reset()
    hidden, weight = torch.randn(6, 8), torch.randn(10, 8)
    targets, advantages = torch.randint(0, 10, (6,)), torch.randn(6)
    compiled = torch.compile(lambda value: rlplus_loss(hidden, weight, targets, advantages, backend="torch",
                                                       **{name: value}).loss, fullgraph=True)
    with pytest.raises(Exception, match=re.escape(f"{name} is a numpy scalar, which torch.compile traces as a tensor "
                                                  f"of unknown value: pass a Python number ({name}=float(value)")):
        compiled(np.float32(0.5))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_custom_ops_pass_opcheck(backend, with_entropy, dtype):
    """torch.library.opcheck on every custom op: schema, autograd registration, and each fake (what
    torch.compile traces with) against the real outputs, including the empty stand-ins of an absent
    entropy or of a gradient that was not asked for, which nothing else reads. bfloat16 inputs: the
    forward's outputs are float32 (what the fakes must say too); no bias: no bias gradient, even if asked.
    A column-major head (a [D, V] parameter passed transposed) and a strided bias: the torch backend's
    gradients kept their layout, its fake said row-major, so a compiled backward failed inductor's stride
    assertion (without it, read the weight's gradient transposed: 0.7 off)."""
    from rlplus_kernels.backends import raw_ops, triton_op  # noqa: F401  (registers the ops)

    n, d, v = 5, 8, 37
    hidden, weight = torch.randn(n, d).to(dtype), torch.randn(d, v).to(dtype).t()
    bias = torch.randn(2 * v).to(dtype)[::2]
    targets = torch.randint(0, v, (n,))
    targets[1] = -100
    forward = (hidden, weight, bias, targets, 0.8, -100, 3, with_entropy, backend, 0, 0)
    torch.library.opcheck(torch.ops.rlplus.linear_logprobs_fwd.default, forward)
    lse, _, entropy = torch.ops.rlplus.linear_logprobs_fwd(*forward)
    entropy, grad_entropy = (entropy, torch.randn(n)) if with_entropy else (None, None)
    for head_bias, needs in [(bias, (True, False, True)), (bias, (False, True, False)), (None, (True, True, True))]:
        torch.library.opcheck(torch.ops.rlplus.linear_logprobs_bwd.default,
                              (hidden, weight, head_bias, targets, lse, entropy, torch.randn(n), grad_entropy,
                               0.8, -100, 3, *needs, backend, 0, 0))
    if backend == "triton":
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        torch.library.opcheck(torch.ops.rlplus.linear_logprobs.default, (*leaves, targets, 0.8, -100, with_entropy))


def test_a_step_compiled_by_torch_before_2_6_reads_the_environment_as_last_seen(monkeypatch):
    """torch < 2.6's dynamo cannot read an unset environment variable (RLPLUS_SCHEDULE, TRITON_INTERPRET, ...) in a
    compiled step: every compiled step failed there. `environment_variable` then hands the step what the last eager
    read saw. Checked here by forcing that path under this torch: the step takes the remembered value though the
    variable is unset by then, and is traced again after an eager read sees the change."""
    from rlplus_kernels import _environment

    monkeypatch.setattr(_environment, "_COMPILED_STEPS_READ_ENVIRON", False)
    monkeypatch.setattr(_environment, "_LAST_SEEN", dict.fromkeys(_environment.NAMES))

    def step(x):
        return x + (1.0 if _environment.environment_variable("RLPLUS_SCHEDULE", "two-pass") == "single-pass" else 2.0)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    monkeypatch.setenv("RLPLUS_SCHEDULE", "single-pass")
    assert step(torch.zeros(())).item() == 1.0  # an eager read: remembered
    monkeypatch.delenv("RLPLUS_SCHEDULE")
    assert compiled(torch.zeros(())).item() == 1.0  # what the eager read saw, not os.environ
    assert step(torch.zeros(())).item() == 2.0  # the next eager read sees it unset
    assert compiled(torch.zeros(())).item() == 2.0
    torch._dynamo.reset()
