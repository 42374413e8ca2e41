"""Triton launchers and custom ops against a float64 torch computation of CONTRACT.md.

Runs under TRITON_INTERPRET=1 on CPU tensors (tests/conftest.py sets it); on a CUDA machine
without the interpreter the same tests run compiled on the GPU.

Tolerances, against float64 on the same (already rounded) inputs. Forward outputs are float32 from
exact products with fp32 accumulation whatever the input dtype: |got - ref| <= 2e-5 max|ref| (+1e-6)
elementwise, as float32 gradients. Half-precision gradients are checked element by element against
their error analysis (`check_grads`): dlogits rounded once to the input dtype, the gradient rounded
once, fp32 accumulation (`helpers.dot_product_allowance`, `helpers.dz_rounding`).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

triton = pytest.importorskip("triton")

from helpers import (PoisonedAllocations, assert_reads_only_what_it_wrote, assert_rounded_once,  # noqa: E402
                     dot_product_allowance, exact_entropy, major_minor)
from rlplus_kernels.backends import triton_interpreting  # noqa: E402
from rlplus_kernels.kernels import linear_logprobs_backward, linear_logprobs_forward  # noqa: E402
from rlplus_kernels.kernels._config import (_padded_row, descriptors_supported, padded_matrix,  # noqa: E402
                                            padded_storage)

IGN = -100
FWD_TOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}
BWD_TOL = {torch.float32: 2e-5}  # relative to the largest element; half precision: check_grads
# (33, 48, 300) and (7, 32, 37) have TMA-aligned rows (D % 16 == 0); 48 also leaves a D tail past BLOCK_D = 32
SHAPES = [(1, 1, 2), (7, 5, 37), (33, 40, 300), (7, 40, 2), (1, 5, 300), (33, 1, 37), (33, 48, 300), (7, 32, 37)]

if torch.cuda.is_available() and not triton_interpreting():
    DEVICE = "cuda"
elif triton_interpreting():
    DEVICE = "cpu"
else:  # pragma: no cover
    pytest.skip("needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def make_inputs(n, d, v, dtype, *, bias=True, ignored=(0,), scale=1.0, n_targets=None):
    h = (torch.randn(n, d) * scale / max(d, 1) ** 0.5).to(dtype).to(DEVICE)
    w = torch.randn(v, d).to(dtype).to(DEVICE)
    b = torch.randn(v).to(dtype).to(DEVICE) if bias else None
    t = torch.randint(0, n_targets or v, (n,))
    for i in ignored:
        if i < n:
            t[i] = IGN
    return h, w, b, t.to(DEVICE)


def ref_logits(h, w, b, temperature):
    z = h.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    return z / temperature


def ref_forward(h, w, b, t, *, temperature, vocab_start=0):
    z = ref_logits(h, w, b, temperature)
    v = w.shape[0]
    local = t - vocab_start
    inside = (t != IGN) & (local >= 0) & (local < v)
    tl = torch.where(inside, z.gather(1, local.clamp(0, v - 1)[:, None])[:, 0], 0.0)
    return z.logsumexp(-1), tl, exact_entropy(z)


def ref_backward(h, w, b, t, lse, ent, gl, ge, *, temperature, vocab_start=0):
    """CONTRACT.md's dz, with the GLOBAL lse/entropy given (float64)."""
    z = ref_logits(h, w, b, temperature)
    lse, valid = lse.double()[:, None], (t != IGN)[:, None]
    p = torch.exp(z - lse)
    dz = torch.zeros_like(z)
    if gl is not None:
        onehot = torch.arange(w.shape[0], device=t.device)[None, :] == (t - vocab_start)[:, None]
        dz = dz + gl.double()[:, None] * (onehot.double() - p)
    if ge is not None:
        dz = dz - ge.double()[:, None] * p * (z - lse + ent.double()[:, None])
    dl = torch.where(valid, dz, 0.0) / temperature
    return dl @ w.double(), dl.T @ h.double(), dl.sum(0)


def check(name, got, ref, tol):
    assert got is not None, f"{name}: missing"
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got64 = got.double().cpu()
    ref = ref.cpu()
    assert torch.isfinite(got64).all(), f"{name}: non-finite output"
    assert torch.isfinite(ref).all(), f"{name}: non-finite reference"  # NaN > bound is False: it would pass
    bound = tol * (ref.abs().max().clamp_min(1e-30) if ref.numel() else 1.0) + 1e-6
    err = (got64 - ref).abs()
    if (err > bound).any():
        i = int(torch.argmax(err - bound))
        idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), err.shape))
        raise AssertionError(
            f"{name}: worst element {idx}: got {got64.flatten()[i].item():.8g}, "
            f"ref {ref.flatten()[i].item():.8g}, |err| {err.flatten()[i].item():.3g} > {bound.item():.3g}"
        )


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Logits sources (kernels/_config.py): tl.dot inside the kernels, the same tl.dot fed by TMA
# descriptors, or a cuBLAS fp32 product the kernels read. For cuBLAS the forward's product chunk is 64
# columns per token here, so vocabularies of 300 take several chunks; the backward's products are 1/8
# slices of each dl chunk. "tma" takes descriptors only on TMA-aligned rows (elsewhere it is "fused",
# test_tma_only_on_aligned_rows), so it runs on the aligned shapes.
LOGITS = ["fused", "tma", "cublas"]
SOURCE_SHAPES = [pytest.param(src, shape, id=f"{src}-{'x'.join(map(str, shape))}")
                 for src in LOGITS for shape in SHAPES if src != "tma" or shape[1] % 16 == 0]


def source_options(logits, n_tokens):
    return dict(logits=logits, chunk_elems=n_tokens * 64 if logits == "cublas" else None)


def check_grads(out, h, w, b, t, lse, ent, gl, ge, *, temperature, logits="fused", needs=(True, True, True),
                label=""):
    """(grad_hidden, grad_weight, grad_bias) of the backward against ref_backward. float32: within
    BWD_TOL of the largest. float16 and bfloat16, element by element, by their error analysis: u |ref| for
    the gradient's own rounding (u half an ulp, half the smallest subnormal below that), and
    `dot_product_allowance` for dz rounded to the dtype (`dz_rounding`) and float32's logits; on the cuBLAS
    source in bfloat16 without a bias, dl first holds T log p + (T lse - S), S = T lse rounded to bfloat16,
    rounded to nearest by the GEMM (the product written into it), so log p errs by u (|log p| + |lse - S / T|)
    too."""
    refs = ref_backward(h, w, b, t, lse, ent, gl, ge, temperature=temperature)
    half = h.dtype in (torch.float16, torch.bfloat16)
    if half:
        u = torch.finfo(h.dtype).eps / 2
        product_in_dl = logits == "cublas" and h.dtype == torch.bfloat16 and b is None
        offset = lse - (lse * temperature).to(h.dtype).float() / temperature
        allowances = dot_product_allowance(gl, ge, h, w, b, t, temperature, backend="triton", ignore_index=IGN,
                                           log_p_rounding=u if product_in_dl else 0.0, log_p_offset=offset)
    for i, (name, need, got, ref) in enumerate(zip(("hidden", "weight", "bias"), needs, out, refs)):
        if not need or (name == "bias" and b is None):
            assert got is None, f"{label}grad_{name} computed though not needed"
        elif half:
            assert got.dtype == h.dtype, f"{label}grad_{name}: dtype {got.dtype}"
            assert_rounded_once(got, ref, allowance=allowances[i], name=f"{label}grad_{name}")
        else:
            check(f"{label}grad_{name}", got, ref, BWD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("logits,shape", SOURCE_SHAPES)
def test_forward(shape, dtype, bias, logits):
    n, d, v = shape
    h, w, b, t = make_inputs(n, d, v, dtype, bias=bias)
    options = source_options(logits, n)
    lse, tl, ent = linear_logprobs_forward(h, w, b, t, temperature=0.7, ignore_index=IGN, with_entropy=True,
                                           **options)
    r_lse, r_tl, r_ent = ref_forward(h, w, b, t, temperature=0.7)
    for name, got, ref in (("lse", lse, r_lse), ("target_logit", tl, r_tl), ("entropy", ent, r_ent)):
        assert got.dtype == torch.float32
        check(name, got, ref, FWD_TOL[dtype])
    assert tl[0].item() == 0.0  # ignored row
    lse2, tl2, none = linear_logprobs_forward(h, w, b, t, temperature=0.7, ignore_index=IGN, with_entropy=False,
                                              **options)
    assert none is None
    torch.testing.assert_close(lse2, lse, rtol=0, atol=0)


@pytest.mark.parametrize("logits", LOGITS)
def test_forward_streams_several_vocabulary_tiles_per_split(logits):
    """V = 3000 under the default launch: 47 tiles of 64 columns in 32 splits (16 on the cuBLAS source), so a
    split's running max, sum-exp and entropy sum move from tile to tile, as at any real vocabulary. The
    shapes above (V <= 300) give every split one tile."""
    n, d, v = 9, 32, 3000
    h, w, b, t = make_inputs(n, d, v, torch.float32)
    got = linear_logprobs_forward(h, w, b, t, temperature=0.7, ignore_index=IGN, with_entropy=True, logits=logits)
    for name, g, ref in zip(("lse", "target_logit", "entropy"), got, ref_forward(h, w, b, t, temperature=0.7)):
        check(name, g, ref, FWD_TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("logits,shape", SOURCE_SHAPES)
def test_backward(shape, dtype, bias, logits):
    n, d, v = shape
    h, w, b, t = make_inputs(n, d, v, dtype, bias=bias)
    r_lse, _, r_ent = ref_forward(h, w, b, t, temperature=1.3)
    lse, ent = r_lse.float(), r_ent.float()
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    gh, gw, gb = linear_logprobs_backward(
        h, w, b, t, lse, ent, gl, ge, temperature=1.3, ignore_index=IGN, needs_grad=(True, True, True),
        logits=logits,
    )
    check_grads((gh, gw, gb), h, w, b, t, lse, ent, gl, ge, temperature=1.3, logits=logits)
    assert gh.dtype == dtype and gw.dtype == dtype and (gb is None or gb.dtype == dtype)


@pytest.mark.parametrize(
    "needs", [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 0, 1), (0, 0, 0)], ids=str
)
@pytest.mark.parametrize("grads", ["logp", "entropy"])
@pytest.mark.parametrize("n", [7, 0], ids=["7-tokens", "no-tokens"])  # no tokens: a micro-batch of prompts only
def test_needs_grad_subsets(needs, grads, n):
    d, v = 40, 300
    h, w, b, t = make_inputs(n, d, v, torch.float32)
    r_lse, _, r_ent = ref_forward(h, w, b, t, temperature=1.0)
    lse, ent = r_lse.float(), r_ent.float()
    gl = torch.randn(n, device=DEVICE) if grads == "logp" else None
    ge = torch.randn(n, device=DEVICE) if grads == "entropy" else None
    out = linear_logprobs_backward(
        h, w, b, t, lse, ent if ge is not None else None, gl, ge,
        temperature=1.0, ignore_index=IGN, needs_grad=tuple(bool(x) for x in needs),
    )
    check_grads(out, h, w, b, t, lse, ent, gl, ge, temperature=1.0, needs=needs)


@pytest.mark.parametrize("logits", LOGITS)
def test_vocab_shard(logits):
    """vocab_start != 0: targets outside the shard give target_logit 0 and no one-hot term."""
    n, d, v_total, v0, v1 = 33, 16, 300, 100, 237
    h, w_full, b_full, t = make_inputs(n, d, v_total, torch.float32, ignored=(0, 5))
    w, b = w_full[v0:v1], b_full[v0:v1]
    lse, tl, ent = linear_logprobs_forward(h, w, b, t, temperature=0.9, ignore_index=IGN, vocab_start=v0,
                                           with_entropy=True, **source_options(logits, n))
    r_lse, r_tl, r_ent = ref_forward(h, w, b, t, temperature=0.9, vocab_start=v0)
    check("lse", lse, r_lse, 2e-5)
    check("target_logit", tl, r_tl, 2e-5)
    check("entropy", ent, r_ent, 2e-5)
    inside = ((t >= v0) & (t < v1)).sum().item()
    assert 0 < inside < n - 2, "test needs targets both inside and outside the shard"
    # backward with the global (all-shard) lse / entropy
    g_lse, _, g_ent = ref_forward(h, w_full, b_full, t, temperature=0.9)
    glse, gent = g_lse.float(), g_ent.float()
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    out = linear_logprobs_backward(h, w, b, t, glse, gent, gl, ge, temperature=0.9, ignore_index=IGN, vocab_start=v0,
                                   logits=logits)
    refs = ref_backward(h, w, b, t, glse, gent, gl, ge, temperature=0.9, vocab_start=v0)
    for name, got, ref in zip(("hidden", "weight", "bias"), out, refs):
        check(f"grad_{name}", got, ref, 2e-5)


@pytest.mark.parametrize("logits", LOGITS)
def test_pipelined_tiles(logits, monkeypatch):
    """PIPELINE_TILES (a sweep candidate: one software pipeline across tiles) computes the same
    function: one forward split, so each program walks several vocabulary tiles, the last partial
    (V = 300); in the backward two programs (as if the GPU had 2 SMs) walk every other tile, so
    each takes several, on the GPU's 128 x 128 tiles as under the interpreter's small ones."""
    from rlplus_kernels.kernels import _config, linear_logprobs_bwd

    if not _config.pipelining_supported():
        pytest.skip(f"PIPELINE_TILES needs triton >= 3.3 (tl.range flatten), this is {triton.__version__}; "
                    "its refusal is test_pipelined_tiles_refused_where_triton_lacks_flatten's")
    monkeypatch.setattr(linear_logprobs_bwd, "sm_count", lambda device: 2)
    n, d, v = 33, 48, 300
    h, w, b, t = make_inputs(n, d, v, torch.float16)
    options = dict(source_options(logits, n), config=dict(PIPELINE_TILES=True))
    r_lse, r_tl, r_ent = ref_forward(h, w, b, t, temperature=0.7)
    got = linear_logprobs_forward(h, w, b, t, temperature=0.7, ignore_index=IGN, with_entropy=True,
                                  **dict(options, config=dict(options["config"], splits=1)))
    for name, g, ref in zip(("lse", "target_logit", "entropy"), got, (r_lse, r_tl, r_ent)):
        check(name, g, ref, FWD_TOL[torch.float16])
    lse, ent = r_lse.float(), r_ent.float()
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    # one dl chunk (the cuBLAS source's product slices then hold several tiles too)
    out = linear_logprobs_backward(h, w, b, t, lse, ent, gl, ge, temperature=0.7, ignore_index=IGN,
                                   **dict(options, chunk_elems=n * v))
    check_grads(out, h, w, b, t, lse, ent, gl, ge, temperature=0.7, logits=logits)


def test_pipelined_tiles_refused_where_triton_lacks_flatten(monkeypatch):
    """On a triton whose tl.range has no `flatten` (before 3.3) the option is refused by name before
    any compile, and the default launch goes on as before (that it compiles under triton 3.2 is the
    static check's, kernels/README.md)."""
    from rlplus_kernels.kernels import _config

    monkeypatch.setattr(_config, "pipelining_supported", lambda: False)
    h, w, b, t = make_inputs(7, 32, 37, torch.float16)
    with pytest.raises(ValueError, match="PIPELINE_TILES"):
        linear_logprobs_forward(h, w, b, t, temperature=1.0, ignore_index=IGN, with_entropy=True,
                                config=dict(PIPELINE_TILES=True))
    lse, _, _ = linear_logprobs_forward(h, w, b, t, temperature=1.0, ignore_index=IGN, with_entropy=True)
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("chunk_elems", [16 * 256, 33 * 256], ids=["tokens-and-vocab", "vocab-only"])
@pytest.mark.parametrize("needs", [(1, 1, 1), (1, 0, 0), (0, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("logits", LOGITS)
def test_backward_chunks(needs, dtype, logits, chunk_elems):
    """Chunks over tokens and vocabulary (fp32 cross-chunk accumulation) give the same result; with
    33 x 256 elements all tokens share one chunk and the vocabulary takes two, so float16's
    grad_weight rows leave cuBLAS per vocabulary chunk through their own fp32 product."""
    n, d, v = 33, 48, 300
    h, w, b, t = make_inputs(n, d, v, dtype)
    r_lse, _, r_ent = ref_forward(h, w, b, t, temperature=1.0)
    lse, ent = r_lse.float(), r_ent.float()
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    out = linear_logprobs_backward(
        h, w, b, t, lse, ent, gl, ge, temperature=1.0, ignore_index=IGN,
        needs_grad=tuple(bool(x) for x in needs), chunk_elems=chunk_elems, logits=logits,
    )
    check_grads(out, h, w, b, t, lse, ent, gl, ge, temperature=1.0, logits=logits, needs=needs)


@pytest.mark.parametrize("chunk_elems", [None, 16 * 256], ids=["one-chunk", "chunked"])
@pytest.mark.parametrize("upstream", [2.0**-14, 2.0**17], ids=["token-mean-of-16k", "large"])
@pytest.mark.parametrize("logits", LOGITS)
def test_float16_upstream_gradients_far_from_one(upstream, chunk_elems, logits):
    """float16 dl holds only 6e-8..65504: upstream gradients of a token-mean over 16k tokens (2^-14)
    would round most of it to subnormals or zero, large ones would overflow, unless dl is stored scaled."""
    n, d, v = 33, 16, 2000  # a vocabulary where most p are small, as in a real one
    # large: small operands and no bias (a sum of dl over tokens) keep the gradients within range
    h, w, b, t = make_inputs(n, d, v, torch.float16, bias=upstream < 1)
    if upstream > 1:
        h, w = h * 2.0**-5, w * 2.0**-5
    r_lse, _, r_ent = ref_forward(h, w, b, t, temperature=0.7)
    lse, ent = r_lse.float(), r_ent.float()
    gl, ge = torch.randn(n, device=DEVICE) * upstream, torch.randn(n, device=DEVICE) * upstream
    out = linear_logprobs_backward(h, w, b, t, lse, ent, gl, ge, temperature=0.7, ignore_index=IGN,
                                   chunk_elems=chunk_elems, logits=logits)
    check_grads(out, h, w, b, t, lse, ent, gl, ge, temperature=0.7, logits=logits)


def test_float16_dl_scale_is_the_power_of_two_that_brings_the_bound_to_2_to_the_12():
    """The scale itself, exactly: the gradients above hide a scale up to 16x too large (the float16 range past
    2^12) and any scale too small (float16 still holds 2^-14 / 2^12 of the largest dl at full precision), so a
    bound that lost its entropy term or an exponent off by bits passed them. Row bounds (|g_logp| + |g_ent|
    (1/e + H)) / T: (0.5 + 2 (1/e + 4)) / 0.5 = 18.5 (< 2^5: scale 2^7) and 3 / 0.5; the ignored row's are not
    counted, and a batch with no valid token gets 2^12."""
    from rlplus_kernels.kernels.linear_logprobs_bwd import FLOAT16_DL_EXPONENT, _float16_dl_scale

    targets = torch.tensor([0, 1, IGN], device=DEVICE)
    entropy = torch.tensor([4.0, 1.0, 0.0], device=DEVICE)
    grad_logp = torch.tensor([0.5, -3.0, 1e6], device=DEVICE)
    grad_entropy = torch.tensor([-2.0, 0.0, 1e6], device=DEVICE)
    scale, unscale = _float16_dl_scale(targets, IGN, entropy, grad_logp, grad_entropy, 0.5)
    assert FLOAT16_DL_EXPONENT == 12 and (scale.item(), unscale.item()) == (2.0**7, 2.0**-7)
    assert 2**11 <= scale.item() * (0.5 + 2 * (math.exp(-1) + 4)) / 0.5 < 2**12
    scale, _ = _float16_dl_scale(torch.full((3,), IGN, device=DEVICE), IGN, entropy, grad_logp, grad_entropy, 0.5)
    assert scale.item() == 2.0**12


@pytest.mark.parametrize("logits", LOGITS)
def test_float16_dl_scale_covers_an_entropy_only_upstream(logits):
    """An entropy bonus where every advantage is 0: only grad_entropy reaches the backward. Its term alone,
    |g_ent| (1/e + H) / T, must size the float16 dl scale: from the logp term (0) the scale would be 2^12 and
    the stored dl (up to 256 * 0.4 / 0.7 here) would overflow."""
    n, d, v = 33, 16, 500
    h, w, b, t = make_inputs(n, d, v, torch.float16, bias=False)
    r_lse, _, r_ent = ref_forward(h, w, b, t, temperature=0.7)
    lse, ent = r_lse.float(), r_ent.float()
    ge = torch.randn(n, device=DEVICE) * 256
    out = linear_logprobs_backward(h, w, b, t, lse, ent, None, ge, temperature=0.7, ignore_index=IGN, logits=logits)
    check_grads(out, h, w, b, t, lse, ent, None, ge, temperature=0.7, logits=logits)


@pytest.mark.parametrize("top", [40.0, 3008.0])
def test_in_place_bfloat16_products_at_a_large_lse(top):
    """The cuBLAS source's in-place bfloat16 dl holds T log p + (T lse - S), S = T lse rounded to bfloat16: at an lse
    of 3000 that residual reaches ulp/2 = 8 and its rounding moves log p by 2^-8 (|log p| + 8); check_grads allows
    it, and the gradients are the reference's within that (a review's counterexample to a bound without it)."""
    n, v = 8, 8
    logits = torch.full((n, v), top - 64.0)
    logits[:, 0] = top
    h = torch.cat([logits, torch.full((n, 1), 6.0), torch.full((n, 1), 0.015)], 1).to(torch.bfloat16).to(DEVICE)
    w = torch.cat([torch.eye(v), torch.ones(v, 2)], 1).to(torch.bfloat16).to(DEVICE)
    t = torch.randint(1, v, (n,), device=DEVICE)
    r_lse, _, r_ent = ref_forward(h, w, None, t, temperature=1.0)
    lse, ent = r_lse.float(), r_ent.float()
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    out = linear_logprobs_backward(h, w, None, t, lse, ent, gl, ge, temperature=1.0, ignore_index=IGN, logits="cublas")
    check_grads(out, h, w, None, t, lse, ent, gl, ge, temperature=1.0, logits="cublas")


@pytest.mark.parametrize("dtype,bias,in_dl", [(torch.bfloat16, False, True), (torch.float32, True, False),
                                              (torch.bfloat16, True, False), (torch.float16, False, False)], ids=str)
def test_cublas_backward_rounds_the_product_into_dl_only_where_that_costs_no_precision(monkeypatch, dtype, bias, in_dl):
    """The cuBLAS source's recompute writes T * logp (shifted per token by T * lse rounded to dl's
    dtype) straight into the dl chunk for bfloat16 without a bias only; float16 (range), bfloat16 with a
    bias (added after the rounding) and float32 (whose dl rounding would no longer hide the shift's:
    test_float32_gradients_from_the_forwards_own_lse_at_logits_in_the_thousands) read fp32 products. In
    half precision every logit is offset by +64: the product rounded to bfloat16 without the shift would be
    off by up to 64 * 2^-9, p by ~12 %, far beyond the tolerance."""
    from rlplus_kernels.kernels import linear_logprobs_bwd

    calls = {"addmm_rounded_once": 0, "mm_fp32": 0}

    def counting(name):
        original = getattr(linear_logprobs_bwd, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        return wrapper

    for name in calls:
        monkeypatch.setattr(linear_logprobs_bwd, name, counting(name))
    n, d, v = 33, 48, 300
    h, w, b, t = make_inputs(n, d, v, dtype, bias=bias)
    if dtype != torch.float32:
        h[:, 0], w[:, 0] = 8.0, 8.0  # exact: z = (64 + the rest) / 0.7
    r_lse, _, r_ent = ref_forward(h, w, b, t, temperature=0.7)
    assert dtype == torch.float32 or r_lse.min() > 64
    lse, ent = r_lse.float(), r_ent.float()
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    for chunk_elems in (None, 16 * 256):  # one chunk; token and vocabulary chunks
        out = linear_logprobs_backward(h, w, b, t, lse, ent, gl, ge, temperature=0.7, ignore_index=IGN,
                                       chunk_elems=chunk_elems, logits="cublas")
        check_grads(out, h, w, b, t, lse, ent, gl, ge, temperature=0.7, logits="cublas")
    assert (calls["addmm_rounded_once"] > 0, calls["mm_fp32"] > 0) == (in_dl, not in_dl), calls


@pytest.mark.parametrize("logits", LOGITS)
def test_float32_gradients_from_the_forwards_own_lse_at_logits_in_the_thousands(logits):
    """The backward reads the forward's float32 lse, rounded at the size of the logits (ulp 2^-11 at 4000),
    and must form the same z as the forward did so that the two roundings cancel in p = exp(z - lse). The
    cuBLAS source once shifted a float32 product by T lse in the GEMM, a rounding the forward never made:
    gradients 40x less accurate (4e-4 of the largest against 8e-6 fused) at logits up to ~8000, T = 0.6,
    with a bias. The tests above hand the backward the exact float64 lse, which hides that."""
    n, d, v = 33, 48, 300
    h, w, b, t = make_inputs(n, d, v, torch.float32, scale=1000.0)
    r_lse, _, r_ent = ref_forward(h, w, b, t, temperature=0.6)
    assert r_lse.abs().max() > 2000
    options = source_options(logits, n)
    lse, _, ent = linear_logprobs_forward(h, w, b, t, temperature=0.6, ignore_index=IGN, with_entropy=True, **options)
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    out = linear_logprobs_backward(h, w, b, t, lse, ent, gl, ge, temperature=0.6, ignore_index=IGN, **options)
    for name, got, ref in zip(("hidden", "weight", "bias"), out,
                              ref_backward(h, w, b, t, r_lse, r_ent, gl, ge, temperature=0.6)):
        check(f"grad_{name}", got, ref, BWD_TOL[torch.float32])


@pytest.mark.parametrize("logits", LOGITS)
def test_noncontiguous_inputs(logits):
    n, d, v = 33, 40, 300
    h = torch.randn(d, n, device=DEVICE).T / d**0.5  # column-major hidden
    w = torch.randn(v, 2 * d, device=DEVICE)[:, ::2]  # strided weight
    b = torch.randn(2 * v, device=DEVICE)[::2]
    t = torch.randint(0, v, (2 * n,), device=DEVICE)[::2]
    t[3] = IGN
    assert not (h.is_contiguous() or w.is_contiguous() or b.is_contiguous() or t.is_contiguous())
    lse, tl, ent = linear_logprobs_forward(h, w, b, t, temperature=1.0, ignore_index=IGN, with_entropy=True,
                                           **source_options(logits, n))
    r_lse, r_tl, r_ent = ref_forward(h, w, b, t, temperature=1.0)
    check("lse", lse, r_lse, 2e-5)
    check("target_logit", tl, r_tl, 2e-5)
    check("entropy", ent, r_ent, 2e-5)
    ent = r_ent.float()
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    out = linear_logprobs_backward(h, w, b, t, lse, ent, gl, ge, temperature=1.0, ignore_index=IGN, logits=logits)
    check_grads(out, h, w, b, t, lse, ent, gl, ge, temperature=1.0, logits=logits)


@pytest.mark.parametrize("logits", LOGITS)
def test_element_offsets_past_2_31(logits):
    """Offsets into hidden, weight and bias are int64 in every kernel. Here their last rows lie past element
    2^31 of one float16 storage (row stride 2^30 + 64), as the last weight rows do in a head of width 16384
    and more than 131072 rows, or hidden rows past 2^18 tokens of width 8192; int32 offsets would wrap to
    addresses outside the storage (the interpreter crashes, a GPU faults). The storage is ~4.3 GB of address
    space, of which only the touched pages become memory (Linux allocates lazily; the interpreter reads a CPU
    tensor in place)."""
    n, d, v, stride = 3, 32, 3, 2**30 + 64
    try:
        base = torch.empty(stride * 2 + 4 * d, dtype=torch.float16, device=DEVICE)
    except (RuntimeError, MemoryError):  # a host without overcommit, or a GPU without the memory
        pytest.skip("this host refuses 4.3 GB of address space for the strided storage")
    h, w, b = (base.as_strided(shape, (stride, 1)[:len(shape)], offset)
               for shape, offset in (((n, d), 0), ((v, d), 2 * d), ((v,), 3 * d)))
    for view, values in zip((h, w, b), make_inputs(n, d, v, torch.float16)):
        view.copy_(values)
    assert min(x.storage_offset() + (x.shape[0] - 1) * x.stride(0) for x in (h, w, b)) > 2**31
    t = torch.tensor([0, IGN, v - 1], device=DEVICE)  # the last hidden row's target is the last weight row
    got = linear_logprobs_forward(h, w, b, t, temperature=0.7, ignore_index=IGN, with_entropy=True,
                                  **source_options(logits, n))
    refs = ref_forward(h, w, b, t, temperature=0.7)
    for name, g, ref in zip(("lse", "target_logit", "entropy"), got, refs):
        check(name, g, ref, FWD_TOL[torch.float16])
    lse, ent = refs[0].float(), refs[2].float()
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    out = linear_logprobs_backward(h, w, b, t, lse, ent, gl, ge, temperature=0.7, ignore_index=IGN, logits=logits)
    check_grads(out, h, w, b, t, lse, ent, gl, ge, temperature=0.7, logits=logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("logits", LOGITS)
def test_huge_logits_finite(dtype, logits):
    n, d, v = 7, 16, 37
    h, w, b, t = make_inputs(n, d, v, dtype, scale=1e3 if dtype == torch.float16 else 1e5)
    lse, tl, ent = linear_logprobs_forward(h, w, b, t, temperature=0.5, ignore_index=IGN, with_entropy=True,
                                           **source_options(logits, n))
    r_lse, r_tl, r_ent = ref_forward(h, w, b, t, temperature=0.5)
    for name, got, ref in (("lse", lse, r_lse), ("target_logit", tl, r_tl), ("entropy", ent, r_ent)):
        check(name, got, ref, 2e-5)
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    ent = r_ent.float()
    out = linear_logprobs_backward(h, w, b, t, lse, ent, gl, ge, temperature=0.5, ignore_index=IGN, logits=logits)
    for g in out:
        assert torch.isfinite(g.float()).all()


@pytest.mark.parametrize("logits", LOGITS)
def test_a_recomputed_logit_above_the_forwards_lse_is_a_probability_of_one(logits):
    """Logits of ~1e9: the backward's recomputed logit (cuBLAS's product, another order of the sum) can pass
    the forward's lse by its rounding, eps |z| ~ 64, and e^(z - lse) then passed 1 by up to e^64 (to inf).
    With log p capped at 0, d log p_y / d logits sums to at most 2 in absolute value per row, so
    |grad_hidden[n, d]| <= 2 |g_n| max |W| / T; 1e-3 of slack for the other probabilities' rounding."""
    n, d, v = 7, 16, 37
    h, w, b, t = make_inputs(n, d, v, torch.float32, bias=False, scale=3e8)
    lse, _, _ = linear_logprobs_forward(h, w, b, t, temperature=1.0, ignore_index=IGN, with_entropy=False,
                                        **source_options(logits, n))
    gl = torch.randn(n, device=DEVICE)
    grad_hidden, _, _ = linear_logprobs_backward(h, w, b, t, lse, None, gl, None, temperature=1.0,
                                                 ignore_index=IGN, logits=logits)
    bound = 2 * (1 + 1e-3) * torch.where(t != IGN, gl.abs(), 0.0)[:, None] * w.abs().max()
    assert torch.isfinite(grad_hidden).all()
    assert (grad_hidden.abs() <= bound).all(), (grad_hidden.abs() / bound).max()


@pytest.mark.parametrize("logits", LOGITS)
@pytest.mark.parametrize("poisoned", ["hidden", "weight"])
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's numpy on NaN
def test_a_nan_logit_makes_the_lse_of_its_rows_nan(logits, poisoned):
    """A NaN in one hidden row, or in one weight row that no token targets: the lse and entropy of every
    row whose logits hold the NaN are NaN, as torch.logsumexp's, not those of the other logits (tl.maximum's
    default, max.f32 on a GPU, returns the operand that is not NaN); the other rows keep their values."""
    n, d, v = 7, 16, 37
    h, w, b, t = make_inputs(n, d, v, torch.float32, n_targets=30)
    clean = linear_logprobs_forward(h, w, b, t, temperature=1.0, ignore_index=IGN, with_entropy=True,
                                    **source_options(logits, n))
    if poisoned == "hidden":
        h[2, 5] = float("nan")
    else:
        w[33, 5] = float("nan")
    lse, target_logit, entropy = linear_logprobs_forward(h, w, b, t, temperature=1.0, ignore_index=IGN,
                                                        with_entropy=True, **source_options(logits, n))
    nan_rows = torch.arange(n, device=DEVICE) == 2 if poisoned == "hidden" else torch.ones(n, dtype=torch.bool,
                                                                                          device=DEVICE)
    assert torch.equal(lse.isnan(), nan_rows) and torch.equal(entropy.isnan(), nan_rows)
    torch.testing.assert_close(lse[~nan_rows], clean[0][~nan_rows], rtol=0, atol=0)
    torch.testing.assert_close(target_logit[~nan_rows], clean[1][~nan_rows], rtol=0, atol=0)


def test_an_interpreter_that_cannot_run_the_kernels_is_one_clear_error(monkeypatch):
    """triton 3.6's interpreter with numpy >= 2.4 fails inside every launch (a one-element array
    converted to int, at the loops that start at a program id); the launchers probe the interpreter
    once and name the versions instead."""
    from rlplus_kernels.kernels import _config

    if not triton_interpreting():
        pytest.skip("compiled kernels: there is no interpreter to probe")
    assert _config._interpreter_failure() is None  # this one runs them, as every other test shows
    monkeypatch.setattr(_config, "_interpreter_failure",
                        lambda: "TypeError: only 0-dimensional arrays can be converted to Python scalars")
    h, w, b, t = make_inputs(7, 16, 37, torch.float32)
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1: triton .* numpy .* needs numpy < 2.4"):
        linear_logprobs_forward(h, w, b, t, temperature=1.0, ignore_index=IGN, with_entropy=True)
    lse = torch.zeros(7, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1: triton .* numpy"):
        linear_logprobs_backward(h, w, b, t, lse, None, torch.ones(7, device=DEVICE), None, temperature=1.0,
                                 ignore_index=IGN)


def test_all_ignored():
    n, d, v = 7, 5, 37
    h, w, b, t = make_inputs(n, d, v, torch.float32, ignored=range(7))
    lse, tl, _ = linear_logprobs_forward(h, w, b, t, temperature=1.0, ignore_index=IGN, with_entropy=False)
    assert (tl == 0).all() and torch.isfinite(lse).all()
    gh, gw, gb = linear_logprobs_backward(h, w, b, t, lse, None, torch.randn(n, device=DEVICE), None,
                                          temperature=1.0, ignore_index=IGN)
    assert (gh == 0).all() and (gw == 0).all() and (gb == 0).all()


def test_launchers_name_what_they_refuse():
    """Direct calls of the launchers (the public API refuses these inputs earlier): float64, which has no
    tensor-core path, and an upstream gradient of the entropy without the forward's entropy."""
    h, w, b, t = make_inputs(7, 5, 37, torch.float32)
    lse, _, _ = linear_logprobs_forward(h, w, b, t, temperature=1.0, ignore_index=IGN, with_entropy=False)
    h64, w64, b64 = h.double(), w.double(), b.double()
    with pytest.raises(TypeError, match="^hidden: .* not float64"):
        linear_logprobs_forward(h64, w64, b64, t, temperature=1.0, ignore_index=IGN, with_entropy=False)
    with pytest.raises(TypeError, match="^hidden: .* not float64"):
        linear_logprobs_backward(h64, w64, b64, t, lse, None, torch.ones(7, device=DEVICE), None, temperature=1.0,
                                 ignore_index=IGN)
    with pytest.raises(ValueError, match="^entropy: needed when grad_entropy is given"):
        linear_logprobs_backward(h, w, b, t, lse, None, None, torch.ones(7, device=DEVICE), temperature=1.0,
                                 ignore_index=IGN)


# ----------------------------------------------------------------------------- custom op
def _ref_logp_entropy(h, w, b, t, temperature):
    z = ref_logits(h, w, b, temperature)
    lse = z.logsumexp(-1)
    valid = t != IGN
    logp = torch.where(valid, z.gather(1, t.clamp(min=0)[:, None])[:, 0] - lse, 0.0)
    ent = torch.where(valid, lse - (z.softmax(-1) * z).sum(-1), 0.0)
    return logp, ent


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_custom_op_autograd(compiled):
    from rlplus_kernels.backends.triton_op import triton_linear_logprobs

    n, d, v = 7, 5, 37
    h0, w0, b0, t = make_inputs(n, d, v, torch.float32, ignored=(2,))
    h, w, b = (x.clone().requires_grad_() for x in (h0, w0, b0))
    gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)

    def loss(h, w, b, t):
        logp, ent = triton_linear_logprobs(h, w, b, t, temperature=0.8, ignore_index=IGN, with_entropy=True)
        return (logp * gl).sum() + (ent * ge).sum(), logp, ent

    fn = torch.compile(loss, fullgraph=True) if compiled else loss
    val, logp, ent = fn(h, w, b, t)
    val.backward()
    hd, wd, bd = (x.double().clone().requires_grad_() for x in (h0, w0, b0))
    r_logp, r_ent = _ref_logp_entropy(hd, wd, bd, t, 0.8)
    ((r_logp * gl.double()).sum() + (r_ent * ge.double()).sum()).backward()
    check("logp", logp, r_logp.detach(), 2e-5)
    check("entropy", ent, r_ent.detach(), 2e-5)
    assert logp[2].item() == 0.0 and ent[2].item() == 0.0
    for name, x, r in (("hidden", h, hd), ("weight", w, wd), ("bias", b, bd)):
        check(f"grad_{name}", x.grad, r.grad, 2e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "frozen bias"])
def test_custom_op_frozen_head_and_no_entropy(monkeypatch, bias):
    """A frozen head (LoRA): the backward asks the kernels for grad_hidden only, so the grad_weight GEMM
    never runs (w.grad being None alone says nothing: autograd drops an unwanted gradient anyway)."""
    from rlplus_kernels import kernels
    from rlplus_kernels.backends.triton_op import triton_linear_logprobs

    asked = []
    backward = kernels.linear_logprobs_backward
    monkeypatch.setattr(kernels, "linear_logprobs_backward",
                        lambda *args, **kw: asked.append(kw["needs_grad"]) or backward(*args, **kw))
    n, d, v = 7, 5, 37
    h0, w, b, t = make_inputs(n, d, v, torch.float32, bias=bias)
    h = h0.clone().requires_grad_()
    logp, ent = triton_linear_logprobs(h, w, b, t, temperature=1.0, ignore_index=IGN, with_entropy=False)
    assert ent is None
    logp.sum().backward()
    assert asked == [(True, False, False)]
    hd = h0.double().clone().requires_grad_()
    r_logp, _ = _ref_logp_entropy(hd, w, b, t, 1.0)
    r_logp.sum().backward()
    check("grad_hidden", h.grad, hd.grad, 2e-5)
    assert w.grad is None


@pytest.mark.parametrize("form", ["one call", "product then add"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fp32_accumulation_of_products(dtype, form, monkeypatch):
    """The backward's cross-chunk sum acc32 += a @ b keeps products exact and sums them in fp32
    (a is transposed, like dl.t()), whether torch takes the one-call addmm with an fp32 accumulator
    or the helper falls back to an fp32 product per block of rows (3 blocks here) and an add; a
    refused one-call form leaves the accumulator as it was."""
    from rlplus_kernels.kernels import cublas

    if form == "product then add":
        monkeypatch.setitem(cublas._OUT_DTYPE_OK, ("addmm", dtype), False)
        monkeypatch.setattr(cublas, "_ACCUMULATE_ROWS", 32)
    k = 300
    a = torch.randn(k, 70).to(dtype).to(DEVICE).t()
    b = torch.randn(k, 40).to(dtype).to(DEVICE)
    start = torch.randn(70, 40, device=DEVICE)
    exact = start.double() + a.double() @ b.double()
    # fp32 products of half operands exist from torch 2.8 on CUDA; before, each is rounded once
    exact_products = not a.is_cuda or dtype == torch.float32 or cublas._half_mm_fp32(a, b) is not None
    eps = torch.finfo(torch.float32 if exact_products else dtype).eps
    allowance = (k * torch.finfo(torch.float32).eps + eps) * (start.double().abs() + a.double().abs() @ b.double().abs())

    def assert_accumulated(acc, how):
        err = (acc.double() - exact).abs()
        assert (err <= allowance).all(), f"{how}: error {err.max().item():.3g} beyond fp32 accumulation"

    acc = start.clone()
    cublas.mm_accumulate_fp32(acc, a, b)
    assert_accumulated(acc, f"mm_accumulate_fp32 ({form})")
    acc = start.clone()
    if dtype != torch.float32 and cublas._half_addmm_fp32(acc, a, b):
        assert_accumulated(acc, "addmm with out_dtype")
    else:
        assert torch.equal(acc, start), "a refused addmm changed the accumulator"


def test_out_dtype_refusals_are_remembered_and_errors_raised(monkeypatch):
    """A torch that refuses an out_dtype form is asked once per key; running out of memory or a CUDA
    error is not a refusal: it propagates and is not remembered."""
    from rlplus_kernels.kernels import cublas

    monkeypatch.setattr(cublas, "_OUT_DTYPE_OK", {})
    calls = []

    def refuse():
        calls.append(1)
        raise RuntimeError("out_dtype must be the same as input dtype or fp32 for fp16/bf16 inputs")

    assert cublas._where_accepted("k", refuse) is None
    assert cublas._where_accepted("k", refuse) is None
    assert len(calls) == 1
    assert cublas._where_accepted("ok", lambda: 7) == 7 and cublas._OUT_DTYPE_OK["ok"] is True
    for error in (torch.cuda.OutOfMemoryError("CUDA out of memory"), RuntimeError("CUDA error: an illegal memory access")):
        def fail(error=error):
            raise error
        with pytest.raises(type(error)):
            cublas._where_accepted("e", fail)
        assert "e" not in cublas._OUT_DTYPE_OK


def test_raw_op_pair_matches_launchers():
    from rlplus_kernels.backends import raw_ops

    n, d, v = 7, 5, 37
    h, w, b, t = make_inputs(n, d, v, torch.float32)
    lse, tl, ent = raw_ops.forward(h, w, b, t, temperature=1.0, ignore_index=IGN, vocab_start=3, with_entropy=True,
                                   backend="triton")
    r = linear_logprobs_forward(h, w, b, t, temperature=1.0, ignore_index=IGN, vocab_start=3, with_entropy=True)
    for a, c in zip((lse, tl, ent), r):
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    gl = torch.randn(n, device=DEVICE)
    out = raw_ops.backward(h, w, b, t, lse, None, gl, None, temperature=1.0, ignore_index=IGN, backend="triton",
                           vocab_start=3, needs_grad=(True, False, True))
    assert out[1] is None
    r = linear_logprobs_backward(h, w, b, t, lse, None, gl, None, temperature=1.0, ignore_index=IGN,
                                 vocab_start=3, needs_grad=(True, False, True))
    torch.testing.assert_close(out[0], r[0], rtol=0, atol=0)
    torch.testing.assert_close(out[2], r[2], rtol=0, atol=0)
    without_bias = raw_ops.backward(h, w, None, t, lse, None, gl, None, temperature=1.0, ignore_index=IGN,
                                    backend="triton")  # every gradient asked for: there is no bias to have one
    assert without_bias[0] is not None and without_bias[1] is not None and without_bias[2] is None


@pytest.mark.parametrize("source,entries", [
    ("cublas", dict(linear_logprobs_fwd="mm_fp32", linear_logprobs_bwd="mm_fp32")),
    ("tma", dict(linear_logprobs_fwd="operand_descriptors", linear_logprobs_bwd="operand_descriptors")),
], ids=["cublas", "tma"])
def test_rlplus_logits_env_selects_the_source_end_to_end(monkeypatch, source, entries):
    """RLPLUS_LOGITS reaches the kernels through rlplus_loss (custom ops) and changes nothing but where
    the logits come from (`entries`: the launcher helper of each module that only that source calls);
    an unknown value is refused with the variable's name."""
    from rlplus_kernels import rlplus_loss
    from rlplus_kernels.kernels import linear_logprobs_bwd, linear_logprobs_fwd

    n, d, v = 33, 48, 300
    h, w, b, t = make_inputs(n, d, v, torch.float32)
    adv = torch.randn(n, device=DEVICE)

    def run():
        leaves = [x.detach().clone().requires_grad_() for x in (h, w, b)]
        out = rlplus_loss(leaves[0], leaves[1], t, adv, bias=leaves[2], entropy_coef=0.01, backend="triton")
        return (out.loss.detach(), *torch.autograd.grad(out.loss, leaves))

    fused = run()
    calls = {module.__name__: 0 for module in (linear_logprobs_fwd, linear_logprobs_bwd)}

    def counting(module):
        original = getattr(module, entries[module.__name__.rsplit(".", 1)[1]])

        def wrapper(*args, **kwargs):
            calls[module.__name__] += 1
            return original(*args, **kwargs)
        return wrapper

    for module in (linear_logprobs_fwd, linear_logprobs_bwd):
        monkeypatch.setattr(module, entries[module.__name__.rsplit(".", 1)[1]], counting(module))
    monkeypatch.setenv("RLPLUS_LOGITS", source)
    other = run()
    # descriptors exist on sm_90 and under the interpreter; on other GPUs "tma" is the fused path
    reached = source != "tma" or descriptors_supported(torch.device(DEVICE))
    assert (all(calls.values()) if reached else not any(calls.values())), f"RLPLUS_LOGITS={source}: {entries} {calls}"
    for name, got, ref in zip(("loss", "grad_hidden", "grad_weight", "grad_bias"), other, fused):
        check(name, got, ref.double(), 2e-5)
    monkeypatch.setenv("RLPLUS_LOGITS", source.upper() + " ")
    with pytest.raises(ValueError, match="RLPLUS_LOGITS"):
        run()


def test_tma_only_on_aligned_rows(monkeypatch):
    """The "tma" source builds descriptors exactly for rows that pass `rows_aligned` (16-element row
    stride and width, unit inner stride) and do not overlap, where descriptors are supported; other
    rows take the pointer loads, with the same result."""
    from rlplus_kernels.kernels import _config, linear_logprobs_bwd, linear_logprobs_fwd

    built = []

    def recording(hidden, weight, cfg):
        built.append((tuple(hidden.shape), tuple(weight.shape)))
        return _config.operand_descriptors(hidden, weight, cfg)

    for module in (linear_logprobs_fwd, linear_logprobs_bwd):
        monkeypatch.setattr(module, "operand_descriptors", recording)
    supported = descriptors_supported(torch.device(DEVICE))
    n, v = 9, 70
    for d, layout, expect in ((32, "dense", True), (40, "dense", False), (32, "strided", False),
                              (32, "broadcast", False)):
        h, w, b, t = make_inputs(n, d, v, torch.float32)
        if layout == "strided":  # a column slice: unit inner stride, row stride d + 8 (not 16-element aligned)
            w = torch.randn(v, d + 8, device=DEVICE)[:, :d]
        elif layout == "broadcast":  # one hidden row for every token: row stride 0
            h = h[:1].expand(n, d)
        built.clear()
        lse, tl, ent = linear_logprobs_forward(h, w, b, t, temperature=1.0, ignore_index=IGN, with_entropy=True,
                                               logits="tma")
        gl = torch.randn(n, device=DEVICE)
        gh, gw, gb = linear_logprobs_backward(h, w, b, t, lse, None, gl, None, temperature=1.0, ignore_index=IGN,
                                              logits="tma")
        assert bool(built) == (expect and supported), (d, layout, built)
        r_lse, r_tl, r_ent = ref_forward(h, w, b, t, temperature=1.0)
        check("lse", lse, r_lse, 2e-5)
        check_grads((gh, gw, gb), h, w, b, t, lse, r_ent.float(), gl, None, temperature=1.0, logits="tma")


@pytest.mark.parametrize("logits", ["fused", "cublas"])
@pytest.mark.parametrize("dtype,bias", [(torch.float32, False), (torch.float16, True)],
                         ids=["fp32 (product in dl)", "fp16 bias (fp32 product slices)"])
def test_launched_row_strides_are_what_the_static_check_compiles(monkeypatch, logits, dtype, bias):
    """scripts/check_kernels.py compiles the kernels for 16-divisible row strides of the cuBLAS product
    and of the dlogits chunk; an odd one (V = 37, and its last chunk) launched an unchecked variant that
    spills on a GPU (98 spill stores in the product-reading forward). Every launch must get the checked kind."""
    from rlplus_kernels.kernels import linear_logprobs_bwd as bwd_module
    from rlplus_kernels.kernels import linear_logprobs_fwd as fwd_module

    seen = []

    def recording(module, name, strides):
        kernel = getattr(module, name)
        names = kernel.arg_names

        class Recorder:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    bound = dict(zip(names, args), **kwargs)
                    seen.extend((name, s, bound[s]) for s in strides if bound.get("prod_ptr") is not None
                                or s.startswith("stride_dl"))
                    return kernel[grid](*args, **kwargs)
                return launch
        monkeypatch.setattr(module, name, Recorder())

    recording(fwd_module, "_linear_logprobs_fwd_kernel", ["stride_prod_n"])
    recording(bwd_module, "_linear_logprobs_bwd_kernel",
              ["stride_dl_n", "stride_dl_v", "stride_prod_n", "stride_prod_v"])
    n, d, v = 21, 32, 37
    h, w, b, t = make_inputs(n, d, v, dtype, bias=bias)
    lse, _, _ = linear_logprobs_forward(h, w, b, t, temperature=1.0, ignore_index=IGN, with_entropy=False,
                                        logits=logits, chunk_elems=16 * 64)
    linear_logprobs_backward(h, w, b, t, lse, None, torch.randn(n, device=DEVICE), None, temperature=1.0,
                             ignore_index=IGN, needs_grad=(True, True, True), logits=logits, chunk_elems=16 * 24)
    assert any(name.endswith("bwd_kernel") for name, _, _ in seen)
    if logits == "cublas":
        assert any(s == "stride_prod_n" and name.endswith("fwd_kernel") for name, s, _ in seen)
    odd = [(name, s, value) for name, s, value in seen if value != 1 and value % 16]
    assert not odd, odd


@pytest.mark.parametrize("capability, family", [
    ((8, 0), "sm80"), ((8, 6), "other"), ((8, 9), "other"), ((9, 0), "sm90"),
    ((10, 0), "sm100"), ((10, 3), "sm100"), ((12, 0), "sm80"),
])
def test_each_gpu_launches_the_table_of_its_family(monkeypatch, capability, family):
    """A Blackwell (sm_100) launches its own tiles, which the static check compiles spill-free: the
    128x128 forward that sm_80's entry would give it spills there with a bias."""
    from rlplus_kernels.kernels import _config

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    _config._device_family.cache_clear()
    try:
        assert _config._device_family(0) == family
    finally:
        _config._device_family.cache_clear()
    forward, backward = (_config.table_config(family, False, kernel=k) for k in ("fwd", "bwd"))
    if family == "sm100":
        assert (forward.BLOCK_N, forward.BLOCK_V, forward.num_warps) == (128, 64, 8)
        assert (backward.BLOCK_N, backward.BLOCK_V, backward.num_warps) == (128, 128, 8)
        assert family in _config.TARGET_FAMILIES.values() and family not in _config.FAMILIES  # no autotune
    else:
        assert forward == backward


def test_which_tritons_and_gpus_take_the_pipelined_descriptor_and_autotuned_paths(monkeypatch):
    """PIPELINE_TILES on every triton from 3.3 (tl.range's `flatten`); TMA descriptors on sm_90 and under the
    interpreter (where CI tests them), not on sm_80 or sm_100; RLPLUS_AUTOTUNE=1 autotunes only half-precision
    aligned rows with D % 64 == 0 on sm_80 and sm_90."""
    from rlplus_kernels.kernels import _config

    assert _config.pipelining_supported() == (major_minor(triton.__version__) >= (3, 3))
    has_descriptors = _config.tensor_descriptor_class() is not None
    for family, supported in (("sm90", True), ("interpret", True), ("sm80", False), ("sm100", False)):
        monkeypatch.setattr(_config, "family_of", lambda device, family=family: family)
        assert _config.descriptors_supported(torch.device("cpu")) == (supported and has_descriptors), family
    gpu = torch.device("cuda")  # only its type is read
    monkeypatch.setenv("RLPLUS_AUTOTUNE", "1")
    for family in ("sm80", "sm90"):
        monkeypatch.setattr(_config, "family_of", lambda device, family=family: family)
        assert _config.autotune_applies(gpu, torch.bfloat16, True, 128), family
        for dtype, aligned, dim in ((torch.bfloat16, True, 48), (torch.float32, True, 128),
                                    (torch.bfloat16, False, 128)):
            assert not _config.autotune_applies(gpu, dtype, aligned, dim), (family, dtype, aligned, dim)
    monkeypatch.setattr(_config, "family_of", lambda device: "sm100")
    assert not _config.autotune_applies(gpu, torch.bfloat16, True, 128)
    monkeypatch.setenv("RLPLUS_AUTOTUNE", "0")
    monkeypatch.setattr(_config, "family_of", lambda device: "sm90")
    assert not _config.autotune_applies(gpu, torch.bfloat16, True, 128)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_padded_buffers_are_zeroed_with_32_element_rows_on_the_cpu_16_on_a_gpu(dtype):
    """The dlogits chunk and product buffers: on the CPU zeroed (whatever the allocator left) with row strides of
    whole 32 elements, which torch's bf16 GEMM reads past a row's end (oneDNN#5717); the poisoned-memory tests see
    that only for bf16 on an AMX CPU. A GPU keeps the 16-element strides the kernels are compiled for (only the
    device's type is read: no GPU needed)."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [_padded_row(cols, cpu) for cols in (1, 16, 17, 32, 33)] == [32, 32, 32, 32, 64]
    assert [_padded_row(cols, gpu) for cols in (1, 16, 17, 32, 33)] == [16, 16, 32, 32, 48]
    with PoisonedAllocations():
        storage = padded_storage(5, 17, device=cpu, dtype=dtype)
    assert storage.numel() == 5 * 32 and bool((storage == 0).all())
    view = padded_matrix(storage, 4, 17)
    assert view.shape == (4, 17) and view.stride() == (32, 1)


@pytest.mark.parametrize("value", ["1", "0", "", "true", "TRUE", "false", "on", "off", "yes", "no", "y", "2"])
def test_triton_interpret_is_read_as_the_installed_triton_reads_it(monkeypatch, value):
    """Whether the kernels are interpreted is triton's decision: TRITON_INTERPRET=false (or 2, off, no) once
    made the library take compiled kernels for interpreted ones, upcasting bf16 operands on a GPU."""
    monkeypatch.setenv("TRITON_INTERPRET", value)
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; before, runtime/jit.py compares with "1"
    assert triton_interpreting() == (knobs.runtime.interpret if knobs is not None else value == "1")


@pytest.mark.parametrize("value", ["true", "2", "yes", " 1"])
def test_rlplus_autotune_takes_0_or_1_and_names_itself_otherwise(monkeypatch, value):
    from rlplus_kernels.kernels import _config

    for switch, enabled in (("1", True), ("0", False), ("", False)):
        monkeypatch.setenv("RLPLUS_AUTOTUNE", switch)
        assert _config.autotune_enabled() is enabled, switch
    monkeypatch.setenv("RLPLUS_AUTOTUNE", value)
    with pytest.raises(ValueError, match=rf"RLPLUS_AUTOTUNE must be 0 or 1, got '{value}'"):
        _config.autotune_enabled()


def test_launch_choices_from_the_environment_torch_flags_and_operand_layouts(monkeypatch):
    """The fused tl.dot unless RLPLUS_LOGITS or `logits=` says otherwise; a chunk size passed to a launcher
    before RLPLUS_CHUNK_ELEMS; descriptors and wide loads only for rows of unit inner stride and a width and
    row stride of whole 16 elements; TF32 for float32 operands only where torch.matmul itself uses it."""
    from rlplus_kernels.kernels import _config

    monkeypatch.delenv("RLPLUS_LOGITS", raising=False)
    assert _config.logits_source() == "fused" and _config.logits_source("cublas") == "cublas"
    monkeypatch.setenv("RLPLUS_CHUNK_ELEMS", "4096")
    assert _config.chunk_budget(123) == 123 and _config.chunk_budget() == 4096
    storage = torch.empty(1024)
    assert _config.rows_aligned(storage[:256].view(8, 32))
    assert not _config.rows_aligned(storage[:384].view(8, 48)[:, :40])  # width 40
    assert not _config.rows_aligned(storage.as_strided((16, 16), (32, 2)))  # inner stride 2
    cuda = torch.device("cuda")  # only its type is read
    matmul, previous = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:  # by hand: under torch 2.11 monkeypatch does not see the old value and its teardown fails to delattr it
        for allow_tf32, expected in ((False, "ieee"), (True, "tf32")):
            matmul.allow_tf32 = allow_tf32
            assert _config.dot_precision(torch.float32, cuda) == expected
            assert _config.dot_precision(torch.float16, cuda) == "ieee"
            assert _config.dot_precision(torch.float32, torch.device("cpu")) == "ieee"
    finally:
        matmul.allow_tf32 = previous


@pytest.mark.parametrize("family", ["sm80", "sm90", "sm100"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_each_family_launch_tiles_compute_the_contract(monkeypatch, family, dtype):
    """The launchers with a GPU family's table tiles (sm_100: a 128x64 forward and a 128x128 backward),
    run by the interpreter: no launcher assumes the interpreter's tile or one tile for both kernels.
    D = 48 takes the BLOCK_D = 16 fallback; 130 tokens span two 128-row blocks."""
    from rlplus_kernels.kernels import _config

    if not triton_interpreting():
        pytest.skip("compiled kernels launch their own GPU's family only")
    monkeypatch.setattr(_config, "family_of", lambda device: family)
    if dtype != torch.float32:  # the table's BLOCK_D = 64 divides D = 64; TMA reads a tail as zeros
        assert [_config.pick_config(torch.device(DEVICE), dtype, dim=dim, descriptors=tma).BLOCK_D
                for dim, tma in ((64, False), (48, False), (48, True))] == [64, 16, 64]
    for n, d, v in [(130, 64, 200), (37, 48, 300)]:
        h, w, b, t = make_inputs(n, d, v, dtype, ignored=(3,))
        lse, target_logit, entropy = linear_logprobs_forward(h, w, b, t, temperature=0.7, ignore_index=IGN,
                                                            with_entropy=True)
        r_lse, r_tl, r_ent = ref_forward(h, w, b, t, temperature=0.7)
        for name, got, ref in (("lse", lse, r_lse), ("target_logit", target_logit, r_tl), ("entropy", entropy, r_ent)):
            check(f"{family} {name}", got, ref, FWD_TOL[dtype])
        ent = r_ent.float()
        gl, ge = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
        grads = linear_logprobs_backward(h, w, b, t, r_lse.float(), ent, gl, ge, temperature=0.7, ignore_index=IGN)
        check_grads(grads, h, w, b, t, r_lse.float(), ent, gl, ge, temperature=0.7, label=f"{family} ")


def _record_launches(monkeypatch, record):
    """record(kernel name, positional args, keyword args) at every kernel launch: under the interpreter a
    GridExecutor call (on each triton from 3.2 to 3.9), compiled a JITFunction.run."""
    launcher_class, method = ((triton.runtime.interpreter.GridExecutor, "__call__") if triton_interpreting()
                              else (triton.runtime.jit.JITFunction, "run"))
    real_run = getattr(launcher_class, method)

    def recorded_run(self, *args, **kwargs):
        record(self.fn.__name__, args, kwargs)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(launcher_class, method, recorded_run)


@pytest.mark.parametrize("schedule", ["two-pass", "single-pass"])
def test_every_kernel_launches_with_its_tensors_device_current(monkeypatch, schedule):
    """Triton launches on the current CUDA device and stream, torch ops on their tensors' device: a head on
    cuda:1 while cuda:0 was current handed Triton pointers of another device. Every launcher now makes its
    first tensor's device current (on CPU tensors a no-op context) around all its launches: each kernel
    launch of a training step (forward, backward, RL head; the single pass) happens inside one."""
    from contextlib import contextmanager

    from rlplus_kernels.kernels import _config

    current, launches = [], []
    real_context = _config.device_context

    @contextmanager
    def recorded_context(x):
        with real_context(x):
            current.append(x.device)
            yield
            current.pop()

    monkeypatch.setattr(_config, "device_context", recorded_context)
    _record_launches(monkeypatch, lambda name, args, kwargs: launches.append((name, current[-1] if current else None)))
    device = _one_training_step(monkeypatch, schedule, launches)
    assert [launch_device for _, launch_device in launches] == [device] * len(launches), launches


def _one_training_step(monkeypatch, schedule, launches):
    """A loss and its backward on the Triton backend (forward, backward and RL head kernels) under `schedule`;
    asserts that `launches` (filled by _record_launches) saw each of those kernels. Returns the tensors' device."""
    from rlplus_kernels import rlplus_loss

    monkeypatch.setenv("RLPLUS_SCHEDULE", schedule)
    h, w, _, t = make_inputs(7, 32, 37, torch.float32)
    h.requires_grad_(), w.requires_grad_()
    rlplus_loss(h, w, t, torch.randn(7, device=DEVICE), entropy_coef=0.1, backend="triton").loss.backward()
    kernels = {name for name, _ in launches}
    assert {"_linear_logprobs_fwd_kernel", "_linear_logprobs_bwd_kernel", "_rlplus_head_fwd_kernel"} <= kernels
    return h.device


@pytest.mark.parametrize("schedule", ["two-pass", "single-pass"])
def test_every_kernel_launch_asks_for_fused_multiply_adds(monkeypatch, schedule):
    """Every GPU measurement and test so far compiled the kernels with multiply-adds fused into FMAs, triton's
    default until 3.10, which turns it off unless a launch asks (3.9 warns at each compile that none did)."""
    launches = []
    _record_launches(monkeypatch, lambda name, args, kwargs: launches.append((name, kwargs.get("enable_fp_fusion"))))
    _one_training_step(monkeypatch, schedule, launches)
    assert [fused for _, fused in launches] == [True] * len(launches), launches


@pytest.mark.skipif(torch.cuda.device_count() < 2 or triton_interpreting(), reason="needs two CUDA devices")
@pytest.mark.parametrize("schedule", ["two-pass", "single-pass"])
def test_a_head_on_another_device_than_the_current_one(monkeypatch, schedule):
    """Tensors on cuda:1 while cuda:0 is current: the same loss and gradients as with cuda:1 current."""
    from rlplus_kernels import rlplus_loss

    monkeypatch.setenv("RLPLUS_SCHEDULE", schedule)
    h, w, b, t = make_inputs(33, 48, 300, torch.bfloat16)
    advantages = torch.randn(33)

    def step(device):
        inputs = [x.to(device).requires_grad_() for x in (h, w, b)]
        out = rlplus_loss(*inputs[:2], t.to(device), advantages.to(device), bias=inputs[2], entropy_coef=0.1,
                          backend="triton")
        out.loss.backward()
        return [out.loss.cpu()] + [x.grad.cpu() for x in inputs]

    with torch.cuda.device(1):
        expected = step("cuda:1")
    with torch.cuda.device(0):
        got = step("cuda:1")
    for g, e in zip(got, expected):  # the same device, shapes and kernels: bit for bit
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.skipif(DEVICE != "cpu", reason="the autotuner is replaced by one that chooses without timing, "
                                             "and launches are recorded by the interpreter's executor")
def test_autotuning_chooses_once_per_power_of_two_of_tokens(monkeypatch):
    """RLPLUS_AUTOTUNE=1: rollout batches change size every step, and triton's autotuner keys on the token count
    itself, so each new size timed every candidate again. The choice is now kept per N rounded up to a power of
    two (and V, D, entropy, bias, dtype, device): 100 tokens tune, 120 launch the kept candidate, 300 tune again,
    400 launch the candidate kept at 300. While a CUDA graph is captured, a new range is refused, naming why."""
    from rlplus_kernels.kernels import _config
    from rlplus_kernels.kernels import linear_logprobs_fwd as fwd

    candidates = [_config.KernelConfig(16, 128, 64, num_warps=1, num_stages=1),
                  _config.KernelConfig(32, 128, 64, num_warps=1, num_stages=1)]
    tuned_at, launches = [], []

    class ChoosesTheLast:  # the autotuner's interface: configs, [grid](*args, **kwargs), then best_config
        configs = [object() for _ in candidates]

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                tuned_at.append(args[11])  # N
                chosen = candidates[-1]
                meta = dict(BLOCK_N=chosen.BLOCK_N, BLOCK_V=chosen.BLOCK_V, BLOCK_D=chosen.BLOCK_D,
                            GROUP_N=chosen.GROUP_N, PIPELINE_TILES=chosen.PIPELINE_TILES)
                fwd._linear_logprobs_fwd_kernel[grid(meta)](*args, **kwargs, **meta, num_warps=chosen.num_warps,
                                                            num_stages=chosen.num_stages)
                self.best_config = self.configs[-1]
            return run

    def record(name, args, kwargs):
        if name == "_linear_logprobs_fwd_kernel":
            launches.append((args[11], kwargs["BLOCK_N"]))  # N, tokens a program

    monkeypatch.setattr(fwd, "_autotuned_kernel", lambda: (ChoosesTheLast(), candidates))
    monkeypatch.setattr(fwd, "autotune_applies", lambda *args: True)
    monkeypatch.setattr(fwd, "_TUNED", {})
    _record_launches(monkeypatch, record)
    for n in (100, 120, 300, 400):
        h, w, _, t = make_inputs(n, 64, 300, torch.float16, bias=False)
        lse, tl, ent = linear_logprobs_forward(h, w, None, t, temperature=0.9, ignore_index=IGN, with_entropy=True)
        for name, got, ref in zip(("lse", "target_logit", "entropy"), (lse, tl, ent),
                                  ref_forward(h, w, None, t, temperature=0.9)):
            check(f"{name} N={n}", got, ref, FWD_TOL[torch.float16])
    assert tuned_at == [100, 300]
    assert launches == [(100, 32), (120, 32), (300, 32), (400, 32)]  # the kept candidate, not the table's

    # while a CUDA graph is captured: a range tuned before launches its candidate; a new range, whose timing
    # would synchronise with the host, is refused before anything is timed or launched
    monkeypatch.setattr(fwd, "graph_capturing", lambda device: True)
    for n in (110, 600):
        h, w, _, t = make_inputs(n, 64, 300, torch.float16, bias=False)
        forward = lambda: linear_logprobs_forward(h, w, None, t, temperature=0.9,  # noqa: E731
                                                  ignore_index=IGN, with_entropy=True)
        if n == 110:
            check("lse N=110 under capture", forward()[0], ref_forward(h, w, None, t, temperature=0.9)[0],
                  FWD_TOL[torch.float16])
        else:
            with pytest.raises(RuntimeError, match=re.escape(
                    "RLPLUS_AUTOTUNE=1: this first call with 600 tokens (the range up to 1024) would time the "
                    "forward's candidates, which synchronises with the host and cannot happen while a CUDA graph "
                    "is captured. Make one call of each token range before the capture")):
                forward()
    assert tuned_at == [100, 300] and launches[4:] == [(110, 32)]


@pytest.mark.parametrize("source", ["fused", "tma", "cublas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False)], ids=["all", "frozen head"])
@pytest.mark.parametrize("chunk_elems", [None, 7 * 64], ids=["one chunk", "chunks"])
def test_the_launchers_read_no_memory_they_did_not_write(source, dtype, with_bias, needs, chunk_elems):
    """Forward and backward of every logits source with every buffer allocated uninitialised poisoned (NaN, then
    huge values: helpers.PoisonedAllocations) give bit for bit what they give without: nothing reads what nothing
    wrote. One chunk of the whole vocabulary of 300, whose padded rows torch's CPU bfloat16 GEMM reads past; or
    chunks of 7 x 64 elements: several token and vocabulary chunks and product slices, the last ones narrower."""
    torch.manual_seed(1)
    n, d, v = 33, 40, 300
    h, w, b, t = make_inputs(n, d, v, dtype, bias=with_bias)
    grad_logp, grad_entropy = torch.randn(n, device=DEVICE), torch.randn(n, device=DEVICE)
    chunks = dict(logits=source, chunk_elems=chunk_elems)

    def run():
        lse, target_logit, entropy = linear_logprobs_forward(h, w, b, t, temperature=0.7, ignore_index=IGN,
                                                             with_entropy=True, **chunks)
        grads = linear_logprobs_backward(h, w, b, t, lse, entropy, grad_logp, grad_entropy, temperature=0.7,
                                         ignore_index=IGN, needs_grad=needs, **chunks)
        return [lse, target_logit, entropy, *(g for g in grads if g is not None)]

    assert_reads_only_what_it_wrote(run)
