"""The Triton backend's single-pass schedule (RLPLUS_SCHEDULE=single-pass, kernels/single_pass.py): when
rlplus_loss takes it, what it computes (against the two-pass schedule; test_backends.py has the property
test against the reference), its GEMMs, memory, autograd and torch.compile behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import TRITON_ON_CPU, CountMatmuls, LargestAllocation, assert_grad_close
from rlplus_kernels import rlplus_loss

pytestmark = pytest.mark.skipif(not TRITON_ON_CPU, reason="triton on CPU tensors needs triton and TRITON_INTERPRET=1")

N, D, V = 40, 8, 100
BLOCK_N = 16  # the interpreter's product tile (kernels/_config.py): a chunk is a multiple of it


def inputs(dtype=torch.float32, bias=True):
    torch.manual_seed(3)
    hidden = (torch.randn(N, D) / D**0.5).to(dtype)  # logits of order 1: no one term of the loss swamps the rest
    weight = torch.randn(V, D).to(dtype)
    targets = torch.randint(0, V, (N,))
    targets[5] = -100
    head = dict(advantages=torch.randn(N), old_logprobs=-torch.rand(N) * 3,
                external_mask=torch.rand(N) < 0.3, entropy_coef=0.01, kl_coef=0.05, ref_logprobs=-torch.rand(N) * 3,
                dual_clip=3.0, temperature=0.7, bias=torch.randn(V).to(dtype) if bias else None)
    return hidden, weight, targets, head


def run(schedule, monkeypatch, *, dtype=torch.float32, chunk_elems=None, requires=(True, True, True), scale=1.0):
    """(loss, metrics, grads of hidden/weight/bias or None) of rlplus_loss under the schedule."""
    monkeypatch.setenv("RLPLUS_SCHEDULE", schedule)
    if chunk_elems is not None:
        monkeypatch.setenv("RLPLUS_CHUNK_ELEMS", str(chunk_elems))
    hidden, weight, targets, head = inputs(dtype)
    leaves = [x.requires_grad_(r) for x, r in zip((hidden, weight, head.pop("bias")), requires)]
    out = rlplus_loss(leaves[0], leaves[1], targets, head.pop("advantages"), head.pop("old_logprobs"),
                      bias=leaves[2], backend="triton", return_entropy=True, **head)
    (out.loss * scale).backward()
    monkeypatch.delenv("RLPLUS_CHUNK_ELEMS", raising=False)
    return out, [x.grad for x in leaves]


@pytest.fixture
def single_pass_calls(monkeypatch):
    """How often rlplus_loss ran the single-pass launcher."""
    from rlplus_kernels.kernels import single_pass

    calls = []
    original = single_pass.rlplus_loss_single_pass
    monkeypatch.setattr(single_pass, "rlplus_loss_single_pass",
                        lambda *args, **kwargs: calls.append(kwargs["needs_grad"]) or original(*args, **kwargs))
    return calls


# BLOCK_N * V: product slices of 16 tokens (budget / 2, at least one block), chunks of 32 (2 budget)
@pytest.mark.parametrize("chunk_elems", [None, BLOCK_N * V], ids=["one chunk", "two chunks of slices"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_single_pass_equals_two_pass(monkeypatch, single_pass_calls, dtype, chunk_elems):
    """Same loss, log-probs, entropies and metrics to float32 rounding; gradients of 2.5 x loss within the
    dtype's rounding (bfloat16: one more rounding when scaled by the upstream gradient, and grad_weight
    rounded once per token chunk)."""
    two, two_grads = run("two-pass", monkeypatch, dtype=dtype, scale=2.5)
    assert single_pass_calls == []
    one, one_grads = run("single-pass", monkeypatch, dtype=dtype, chunk_elems=chunk_elems, scale=2.5)
    assert single_pass_calls == [(True, True, True)]
    torch.testing.assert_close(one.loss, two.loss, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(one.logprobs, two.logprobs, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(one.entropy, two.entropy, rtol=2e-6, atol=2e-6)
    assert one.metrics.keys() == two.metrics.keys()
    for key in two.metrics:
        torch.testing.assert_close(one.metrics[key], two.metrics[key], rtol=2e-6, atol=2e-6, msg=key)
    rtol = 2e-6 if dtype == torch.float32 else 2 ** -7
    for name, got, expected in zip(("hidden", "weight", "bias"), one_grads, two_grads):
        assert got.dtype == dtype
        assert_grad_close(got, expected, rtol=rtol, name=f"grad_{name}")


@pytest.mark.parametrize("requires,gradient_gemms", [((True, True, True), 2), ((True, False, False), 1),
                                                     ((False, True, False), 1)],
                         ids=["all", "frozen head", "frozen trunk"])
def test_one_logits_gemm_per_slice_and_no_unasked_gradient_gemm(monkeypatch, single_pass_calls, requires,
                                                                  gradient_gemms):
    """One logits GEMM per product slice of 16 tokens (never a recompute), then per chunk of 32 tokens only
    the gradient GEMMs autograd asks for."""
    monkeypatch.setenv("RLPLUS_SCHEDULE", "single-pass")
    monkeypatch.setenv("RLPLUS_CHUNK_ELEMS", str(BLOCK_N * V))
    hidden, weight, targets, head = inputs()
    leaves = [x.requires_grad_(r) for x, r in zip((hidden, weight, head.pop("bias")), requires)]
    with CountMatmuls() as counter:
        out = rlplus_loss(leaves[0], leaves[1], targets, head.pop("advantages"), head.pop("old_logprobs"),
                          bias=leaves[2], backend="triton", **head)
        out.loss.backward()
    assert single_pass_calls == [requires]
    assert counter.count == math.ceil(N / BLOCK_N) + gradient_gemms * math.ceil(N / (2 * BLOCK_N))
    for x, r in zip(leaves, requires):
        assert (x.grad is not None) == r


def test_two_pass_wherever_single_pass_does_not_apply(monkeypatch, single_pass_calls):
    """No gradient wanted (scoring), float16 (its dl scale would differ per chunk): the two-pass schedule,
    which computes the same function."""
    monkeypatch.setenv("RLPLUS_SCHEDULE", "single-pass")
    hidden, weight, targets, head = inputs()
    head.pop("bias")
    args = (targets, head.pop("advantages"), head.pop("old_logprobs"))
    with torch.no_grad():
        rlplus_loss(hidden.requires_grad_(), weight, *args, backend="triton", **head)
    rlplus_loss(hidden.detach(), weight, *args, backend="triton", **head)  # nothing requires a gradient
    out = rlplus_loss(hidden.detach().half().requires_grad_(), weight.half(), *args, backend="triton", **head)
    out.loss.backward()
    rlplus_loss(hidden.detach().requires_grad_(), weight, *args, backend="torch", **head)
    assert single_pass_calls == []


def test_the_launcher_refuses_float16_by_name():
    """What the dispatch above keeps from it, the launcher refuses when called directly."""
    from rlplus_kernels.kernels.single_pass import rlplus_loss_single_pass

    hidden, weight, targets, _ = inputs(torch.float16)
    with pytest.raises(TypeError, match="^hidden: the single-pass schedule takes float32 or bfloat16, not "
                                        "torch.float16"):
        rlplus_loss_single_pass(hidden, weight, None, targets, *[None] * 7, temperature=1.0, ignore_index=-100,
                                with_entropy=False, entropy_term=False)


def test_two_pass_for_bfloat16_where_cublas_cannot_return_fp32_products(monkeypatch, single_pass_calls):
    """torch < 2.8 on CUDA has no mm out_dtype: a bf16 product slice would upcast the whole weight, so the
    two-pass schedule runs; float32 heads need no upcast and keep the single pass."""
    from rlplus_kernels.kernels import cublas

    monkeypatch.setattr(cublas, "fp32_products_supported", lambda device: False)
    run("single-pass", monkeypatch, dtype=torch.bfloat16)
    assert single_pass_calls == []
    run("single-pass", monkeypatch, dtype=torch.float32)
    assert len(single_pass_calls) == 1


def test_largest_allocation_is_one_chunk(monkeypatch):
    """128 tokens, chunks of 32: forward+backward allocate nothing of N x V, only a chunk's dl and a slice's product."""
    monkeypatch.setenv("RLPLUS_SCHEDULE", "single-pass")
    n, d, v = 128, 4, 16384
    budget = BLOCK_N * v
    monkeypatch.setenv("RLPLUS_CHUNK_ELEMS", str(budget))
    hidden, weight = torch.randn(n, d, requires_grad=True), torch.randn(v, d, requires_grad=True)
    with LargestAllocation() as tracker:
        out = rlplus_loss(hidden, weight, torch.randint(0, v, (n,)), torch.randn(n), entropy_coef=0.01,
                          backend="triton")
        out.loss.backward()
    # a chunk's dl (2 budget elements, float32 here; a slice's fp32 product holds budget / 2)
    assert tracker.largest_bytes <= max(2 * budget * 4, v * d * 4)
    assert tracker.largest_bytes <= n * v * 4 / 4


def test_a_second_backward_is_refused(monkeypatch):
    monkeypatch.setenv("RLPLUS_SCHEDULE", "single-pass")
    hidden, weight, targets, head = inputs()
    out = rlplus_loss(hidden.requires_grad_(), weight, targets, head["advantages"], backend="triton")
    out.loss.backward(retain_graph=True)
    first = hidden.grad.clone()
    with pytest.raises(RuntimeError, match="single-pass.*retain_graph"):
        out.loss.backward()
    torch.testing.assert_close(hidden.grad, first)  # the refused backward added nothing


def test_create_graph_is_refused(monkeypatch):
    """Its gradients carry no graph: a gradient penalty on them would silently add nothing."""
    monkeypatch.setenv("RLPLUS_SCHEDULE", "single-pass")
    hidden, weight, targets, head = inputs()
    out = rlplus_loss(hidden.requires_grad_(), weight, targets, head["advantages"], backend="triton")
    with pytest.raises(NotImplementedError, match="single-pass.*create_graph"):
        torch.autograd.grad(out.loss, hidden, create_graph=True)


def test_no_tokens(monkeypatch):
    """hidden [2, 0, D]: its gradient is an empty [2, 0, D] tensor, as on the two-pass schedule, not None."""
    monkeypatch.setenv("RLPLUS_SCHEDULE", "single-pass")
    hidden, weight = torch.randn(2, 0, D, requires_grad=True), torch.randn(V, D, requires_grad=True)
    out = rlplus_loss(hidden, weight, torch.zeros(2, 0, dtype=torch.long), torch.randn(2), backend="triton",
                      return_entropy=True)
    out.loss.backward()
    assert out.loss.item() == 0.0 and hidden.grad.shape == (2, 0, D) and out.entropy.shape == (2, 0)
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_no_valid_token(monkeypatch):
    monkeypatch.setenv("RLPLUS_SCHEDULE", "single-pass")
    hidden, weight, targets, head = inputs()
    out = rlplus_loss(hidden.requires_grad_(), weight.requires_grad_(), torch.full_like(targets, -100),
                      head["advantages"], backend="triton", entropy_coef=0.1)
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.equal(hidden.grad, torch.zeros_like(hidden)) and torch.equal(weight.grad, torch.zeros_like(weight))


def test_compiled_step_matches_eager(monkeypatch):
    """torch.compile(fullgraph=True) of a step through the single-pass op: same loss and gradients."""
    monkeypatch.setenv("RLPLUS_SCHEDULE", "single-pass")
    hidden, weight, targets, head = inputs()
    bias = head.pop("bias")
    args = (targets, head.pop("advantages"), head.pop("old_logprobs"))

    def step(h, w, b):
        out = rlplus_loss(h, w, *args, bias=b, backend="triton", **head)
        return out.loss * 3.0, out.metrics["clip_frac"]

    results = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
        loss, clip_frac = fn(*leaves)
        loss.backward()
        results.append((loss.detach(), clip_frac, *[x.grad for x in leaves]))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_compiled_step_with_a_transposed_head(monkeypatch):
    """An LM head stored [D, V] (weight = P.t(), column-major): the op's fake must describe the gradients
    the launcher returns (row-major) or the compiled graph's stride asserts fail."""
    monkeypatch.setenv("RLPLUS_SCHEDULE", "single-pass")
    hidden, weight, targets, head = inputs()
    stored = weight.t().contiguous()

    def step(h, p):
        return rlplus_loss(h, p.t(), targets, head["advantages"], backend="triton").loss

    grads = []
    for fn in (step, torch.compile(step, fullgraph=True)):
        leaves = [hidden.clone().requires_grad_(), stored.clone().requires_grad_()]
        fn(*leaves).backward()
        grads.append([x.grad for x in leaves])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_op_passes_opcheck():
    """Schema, autograd registration and the fake against the real op (also for a column-major weight).
    Not opcheck's AOT-dispatch comparison: in eager the backward scales the op's gradient outputs in
    place (the wrapper never hands them out; a compiled graph takes the out-of-place product), which
    that comparison of outputs after the backward reports as a difference."""
    from rlplus_kernels.backends import single_pass_op  # noqa: F401  (registers the op)
    from rlplus_kernels.config import RLPlusConfig
    from rlplus_kernels.head import head_scalars

    hidden, weight, targets, head = inputs()
    n = hidden.shape[0]
    for w in (weight, weight.t().contiguous().t()):
        args = (hidden.clone().requires_grad_(), w.clone().requires_grad_(), None, targets, head["advantages"],
                None, None, None, None, torch.full((n,), 1.0 / n),
                head_scalars(RLPlusConfig(entropy_coef=0.01), hidden, torch.float32), 1.0, -100, False, True, True,
                True, False)
        torch.library.opcheck(torch.ops.rlplus.rlplus_loss_single_pass.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_chunks_grow_rather_than_pass_max_token_chunks(monkeypatch):
    """bf16 grad_weight rounds once per chunk: past MAX_TOKEN_CHUNKS chunks, the chunks grow instead."""
    from rlplus_kernels.kernels import single_pass

    # the bar's shape: 22 chunks of 768 tokens, each 4 product slices of 192
    assert single_pass.plan_chunks(16384, 151936, 2**26, 64) == (768, 192)
    # the last: ceil(N / MAX_TOKEN_CHUNKS) just past whole slices of 192 rows (floor division gives 65 chunks)
    for n_tokens in (1, 63, 64 * 400, 100_000, 1_000_000, single_pass.MAX_TOKEN_CHUNKS * 192 * 100 + 1):
        rows, slice_rows = single_pass.plan_chunks(n_tokens, 151936, 2**26, 64)
        assert math.ceil(n_tokens / rows) <= single_pass.MAX_TOKEN_CHUNKS
        assert rows == n_tokens or (rows % slice_rows == 0 and slice_rows % 64 == 0)
    monkeypatch.setattr(single_pass, "MAX_TOKEN_CHUNKS", 2)  # N = 40: 2 chunks of 32, not 3 of the budget's 16
    monkeypatch.setenv("RLPLUS_SCHEDULE", "single-pass")
    monkeypatch.setenv("RLPLUS_CHUNK_ELEMS", "1")
    hidden, weight, targets, head = inputs()
    with CountMatmuls() as counter:
        out = rlplus_loss(hidden.requires_grad_(), weight.requires_grad_(), targets, head["advantages"],
                          backend="triton")
        out.loss.backward()
    assert counter.count == 3 + 2 * 2  # slices of 16 (one block): 3 logits GEMMs; 2 chunks x 2 gradient GEMMs


def test_unknown_schedule_is_refused(monkeypatch):
    monkeypatch.setenv("RLPLUS_SCHEDULE", "single_pass")
    hidden, weight, targets, head = inputs()
    with pytest.raises(ValueError, match="RLPLUS_SCHEDULE"):
        rlplus_loss(hidden.requires_grad_(), weight, targets, head["advantages"], backend="triton")


@pytest.mark.parametrize("schedule", ["two-pass", "single-pass"])
@pytest.mark.parametrize("value", ["abc", "0", "-5", "1e6"])
def test_a_bad_chunk_size_is_refused_by_name(monkeypatch, schedule, value):
    """RLPLUS_CHUNK_ELEMS, like the other settings, names itself when it is not a positive integer
    (a non-number raised int()'s message; 0 and negatives were planned as tiny chunks)."""
    monkeypatch.setenv("RLPLUS_CHUNK_ELEMS", value)
    with pytest.raises(ValueError, match="RLPLUS_CHUNK_ELEMS"):
        run(schedule, monkeypatch)
