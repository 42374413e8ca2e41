"""Backward of the vocabulary-streaming op: gradients into hidden, weight and bias.

Exact computation (CONTRACT.md)::

    z  = (hidden.float() @ weight.float().T + bias) / temperature;  p = exp(z - lse)
    dz = g_logp * (onehot(y - vocab_start) - p) + g_ent * (-p * (z - lse + entropy))   (0 at ignored rows)
    dl = dz / temperature
    grad_hidden = dl @ weight;  grad_weight = dl.T @ hidden;  grad_bias = dl.sum(0)

Design: chunked recompute + cuBLAS. The chunk grid walks [tokens x vocabulary] in chunks of at
most ``chunk_elems`` elements; for each chunk a Triton kernel recomputes the logits tile by tile
(the same tl.dot tiling as the forward), forms dl in the input dtype and writes it to one reused
buffer, and two cuBLAS GEMMs consume it::

    for token chunk n, vocab chunk v:
        dl[n, v]       = _linear_logprobs_bwd_kernel(...)      # 2 N V D flops, one write of the chunk
        grad_hidden[n] += dl @ W[v]                            # only if hidden needs a gradient
        grad_weight[v] += dl.T @ h[n]                          # only if weight needs a gradient
        grad_bias[v]   += dl.sum(0)                            # only if bias needs a gradient

With the cuBLAS logits source (``RLPLUS_LOGITS=cublas``) the kernel reads z from a product cuBLAS
wrote instead of recomputing it with tl.dot (``FROM_PRODUCT``):

- bfloat16 without a bias: into the dl chunk itself. One cuBLAS call per chunk writes
  ``h[n] @ W[v]^T - S`` in dl's dtype, ``S = round(T * lse)`` per token (subtracted exactly in its
  fp32 epilogue: the chunk is laid out [V, N], so S is the GEMM's bias vector), and the kernel turns
  each element into dl in place, subtracting what is left, ``lse - S / T``. The value rounded is then
  ``T * log p``, small where p is not: p is off by at most ``p |log p| 2^-9 <= 2^-9 / e`` in bfloat16,
  the size of the rounding of dl itself (gradient error 1.1-1.7x the fp32-product form's at an lse
  of 14-37, 2.6x at 1000, where the rounding of S itself weighs; rounding z itself, as large as the
  logits, 5-40x more: ``benchmarks/sim_product_rounding.py``). Six bytes of traffic per element, no
  fp32 product.
- float16 (``T * log p`` may leave its range), bfloat16 with a bias (added after the rounding) and
  float32: fp32 products ``h[n] @ W[s]^T`` of column slices s of the chunk (ten bytes per element). In
  float32 the shift's rounding, at the size of T * lse, is not hidden by dl's own as in bfloat16, and the
  forward's lse was rounded from the unshifted z: at logits of ~8000 the gradients erred 40x more.

The chunk shape is chosen so that the gradient that needs no cross-chunk sum is written straight
by cuBLAS (single rounding); a gradient summed over several chunks goes through an fp32 buffer.
Extra memory: one dl chunk (default 2^26 elements) plus, when both gradients are needed and the
vocabulary is split, an fp32 [N, D] accumulator for grad_hidden.

float16 holds dl only between 6e-8 (2^-24) and 65504: a token-mean loss over 16k tokens has upstream
gradients near 6e-5, whose dl would mostly flush to zero, and large upstream gradients would overflow.
So in float16 the kernel stores ``scale * dl``, ``scale`` a power of two that brings the largest |dl|
the upstream gradients allow to 2^12 (``_float16_dl_scale``), and every gradient leaves cuBLAS in
fp32 and is multiplied by ``1 / scale`` before its single rounding. Both multiplications are exact,
and ``scale`` stays on the device, so the backward does not synchronise with the host.
"""

# No `from __future__ import annotations`: triton 3.0's interpreter finds constexpr parameters
# only by annotation objects, not by the string "tl.constexpr".
import math
from typing import Optional

import torch

import triton
import triton.language as tl

from ._config import (LAUNCH_OPTIONS, check_interpreter, chunk_budget, dot_precision, kernel_operand,
                      logits_source, on_tensor_device, operand_descriptors, padded_matrix, padded_storage,
                      pick_config, product_config, rows_aligned, sm_count, uses_descriptors)
from .cublas import addmm_rounded_once, mm_accumulate_fp32, mm_fp32
from .tl_utils import LOG_P_FLOOR, nan_minimum, source_logits_tile

PRODUCT_SLICES = 8  # cuBLAS logits source: fp32 products of 1/8 of a dl chunk (32 MiB at the default)
# float16 dl is stored scaled so that its largest possible |value| is below 2^12: far from 65504 even
# after a sum of the chunk's terms (the fp16 product of cuBLAS on torch without out_dtype), while
# 2^26 times smaller values still hold float16's full precision
FLOAT16_DL_EXPONENT = 12


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
        "HAS_GRAD_LOGP": lambda args: args["grad_logp_ptr"] is not None,
        "HAS_GRAD_ENT": lambda args: args["grad_ent_ptr"] is not None,
        "FROM_PRODUCT": lambda args: args["prod_ptr"] is not None,
        "USE_TMA": lambda args: args["hidden_desc"] is not None,
        "EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0,
    }
)
@triton.jit
def _linear_logprobs_bwd_kernel(
    # pointers
    hidden_ptr,  # [N, D] fp32/fp16/bf16 (this token chunk)
    weight_ptr,  # [V, D] same dtype (this vocabulary chunk)
    bias_ptr,  # [V] same dtype, or None
    targets_ptr,  # [N] int64, global ids
    lse_ptr,  # [N] fp32, global log-sum-exp
    ent_ptr,  # [N] fp32, global entropy (read only with HAS_GRAD_ENT)
    grad_logp_ptr,  # [N] fp32 upstream gradient of logp, or None
    grad_ent_ptr,  # [N] fp32 upstream gradient of the entropy, or None
    dl_ptr,  # [N, V] out, input dtype: d loss / d raw logits for this chunk
    prod_ptr,  # [N, V] hidden @ weight^T from cuBLAS (fp32, or dl_ptr itself), or None (then tl.dot recomputes it)
    hidden_desc,  # TMA descriptor of hidden, blocks [BLOCK_N, BLOCK_D], or None (then pointer loads)
    weight_desc,  # TMA descriptor of weight, blocks [BLOCK_V, BLOCK_D], or None
    # shapes
    N,
    V,
    D,
    # strides
    stride_hidden_n,
    stride_hidden_d,
    stride_weight_v,
    stride_weight_d,
    stride_bias_v,
    stride_targets_n,
    stride_dl_n,
    stride_dl_v,
    stride_prod_n,
    stride_prod_v,
    # runtime scalars
    temperature,
    ignore_index,
    col_start,  # global id of this chunk's first weight row
    # meta-parameters
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENT: tl.constexpr,
    FROM_PRODUCT: tl.constexpr,
    USE_TMA: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
    PIPELINE_TILES: tl.constexpr,
):
    """dlogits of one [N, V] chunk: recompute z, then dz / temperature in the input dtype.

    hidden_ptr [N, D], weight_ptr [V, D], bias_ptr [V] or None (input dtype, this chunk's rows);
    targets_ptr [N] int (global ids); lse_ptr, ent_ptr [N] fp32 (global); grad_logp_ptr,
    grad_ent_ptr [N] fp32 or None; dl_ptr [N, V] output (strides stride_dl_n, stride_dl_v);
    prod_ptr [N, V] or None (with it, hidden_ptr/weight_ptr are not read; it may be dl_ptr itself, each
    element read before the same program writes it); hidden_desc /
    weight_desc TMA descriptors of hidden_ptr / weight_ptr or None (with them, the pointers are not read).
    """
    num_tiles = tl.cdiv(N, BLOCK_N) * tl.cdiv(V, BLOCK_V)
    if PIPELINE_TILES:
        # one program per SM walks tiles pid, pid + programs, ... as one software pipeline: the
        # next tile's loads are in flight during this tile's epilogue and store
        for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=True):
            _dlogits_tile(
                tile, hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, ent_ptr, grad_logp_ptr,
                grad_ent_ptr, dl_ptr, prod_ptr, hidden_desc, weight_desc, N, V, D, stride_hidden_n,
                stride_hidden_d, stride_weight_v, stride_weight_d, stride_bias_v, stride_targets_n,
                stride_dl_n, stride_dl_v, stride_prod_n, stride_prod_v, temperature, ignore_index, col_start,
                DOT_PRECISION, HAS_BIAS, HAS_GRAD_LOGP, HAS_GRAD_ENT, FROM_PRODUCT, USE_TMA, EVEN_D, BLOCK_N,
                BLOCK_V, BLOCK_D, GROUP_N,
            )
    else:
        _dlogits_tile(
            tl.program_id(0), hidden_ptr, weight_ptr, bias_ptr, targets_ptr, lse_ptr, ent_ptr, grad_logp_ptr,
            grad_ent_ptr, dl_ptr, prod_ptr, hidden_desc, weight_desc, N, V, D, stride_hidden_n,
            stride_hidden_d, stride_weight_v, stride_weight_d, stride_bias_v, stride_targets_n, stride_dl_n,
            stride_dl_v, stride_prod_n, stride_prod_v, temperature, ignore_index, col_start, DOT_PRECISION,
            HAS_BIAS, HAS_GRAD_LOGP, HAS_GRAD_ENT, FROM_PRODUCT, USE_TMA, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D, GROUP_N,
        )


@triton.jit
def _dlogits_tile(
    tile,
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    ent_ptr,
    grad_logp_ptr,
    grad_ent_ptr,
    dl_ptr,
    prod_ptr,
    hidden_desc,
    weight_desc,
    N,
    V,
    D,
    stride_hidden_n,
    stride_hidden_d,
    stride_weight_v,
    stride_weight_d,
    stride_bias_v,
    stride_targets_n,
    stride_dl_n,
    stride_dl_v,
    stride_prod_n,
    stride_prod_v,
    temperature,
    ignore_index,
    col_start,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENT: tl.constexpr,
    FROM_PRODUCT: tl.constexpr,
    USE_TMA: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
):
    """One [BLOCK_N, BLOCK_V] tile of `_linear_logprobs_bwd_kernel` (same arguments), tile index `tile`."""
    # grouped ordering (Triton's matmul tutorial) for L2 reuse of both operands
    num_n = tl.cdiv(N, BLOCK_N)
    num_v = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (tile // per_group) * GROUP_N
    group_n = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (tile % per_group) % group_n
    pid_v = (tile % per_group) // group_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    offs_n64 = offs_n.to(tl.int64)
    offs_v64 = offs_v.to(tl.int64)

    z = source_logits_tile(hidden_ptr, weight_ptr, bias_ptr, prod_ptr, hidden_desc, weight_desc,
                           pid_n * BLOCK_N, pid_v * BLOCK_V, offs_n64, offs_v64, mask_n, mask_v,
                           D, stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d, stride_bias_v,
                           stride_prod_n, stride_prod_v, temperature, DOT_PRECISION, HAS_BIAS, EVEN_D, FROM_PRODUCT,
                           USE_TMA, BLOCK_N, BLOCK_V, BLOCK_D)

    tgt = tl.load(targets_ptr + offs_n64 * stride_targets_n, mask=mask_n, other=ignore_index)
    valid = tgt != ignore_index
    lse = tl.load(lse_ptr + offs_n64, mask=mask_n, other=0.0)
    logp = z - lse[:, None]
    if FROM_PRODUCT:
        # log p <= 0: a product cuBLAS formed in another shape than the forward's can pass its lse by eps |z|
        # (tl.dot sums over D in the forward's order; there the cap spilled, sm_90 PIPELINE_TILES)
        logp = nan_minimum(logp, 0.0)
    p = tl.exp(logp)
    dz = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    if HAS_GRAD_LOGP:
        g = tl.load(grad_logp_ptr + offs_n64, mask=mask_n, other=0.0)
        g = tl.where(valid, g, 0.0)
        hit = offs_v[None, :] == (tgt - col_start)[:, None]
        dz += g[:, None] * (tl.where(hit, 1.0, 0.0) - p)
    if HAS_GRAD_ENT:
        ge = tl.load(grad_ent_ptr + offs_n64, mask=mask_n, other=0.0)
        ge = tl.where(valid, ge, 0.0)
        ent = tl.load(ent_ptr + offs_n64, mask=mask_n, other=0.0)
        # log p floored: p log p is 0, not 0 * inf, at a logit of -inf (a row masked by its bias)
        dz -= ge[:, None] * (p * (tl.maximum(logp, LOG_P_FLOOR) + ent[:, None]))
    dl = dz / temperature
    dl_ptrs = dl_ptr + offs_n64[:, None] * stride_dl_n + offs_v64[None, :] * stride_dl_v
    tl.store(dl_ptrs, dl.to(dl_ptr.dtype.element_ty), mask=mask_n[:, None] & mask_v[None, :])


def launch_dlogits(hk, wk, bk, targets, lse, ent, grad_logp, grad_entropy, dl, prod, cfg, *, temperature,
                   ignore_index, col_start, precision, descriptors=False):
    """dl[:, :] = d loss / d logits of the rows of hk and vocabulary rows of wk (global ids from
    col_start), one launch of `_linear_logprobs_bwd_kernel`: logits by tl.dot, or read from `prod`
    (fp32, or dl itself). `ent` is read only with `grad_entropy`; [rows] tensors are fp32 and contiguous."""
    rows, cols = hk.shape[0], wk.shape[0]
    h_desc, w_desc = operand_descriptors(hk, wk, cfg) if descriptors else (None, None)
    tiles = triton.cdiv(rows, cfg.BLOCK_N) * triton.cdiv(cols, cfg.BLOCK_V)
    grid = (min(tiles, sm_count(hk.device)) if cfg.PIPELINE_TILES else tiles,)
    _linear_logprobs_bwd_kernel[grid](
        hk, wk, bk, targets, lse, ent, grad_logp, grad_entropy, dl, prod, h_desc, w_desc,
        rows, cols, hk.shape[1],
        hk.stride(0), hk.stride(1), wk.stride(0), wk.stride(1),
        bk.stride(0) if bk is not None else 0, targets.stride(0), dl.stride(0), dl.stride(1),
        prod.stride(0) if prod is not None else 0, prod.stride(1) if prod is not None else 1,
        float(temperature), int(ignore_index), int(col_start),
        DOT_PRECISION=precision,
        BLOCK_N=cfg.BLOCK_N, BLOCK_V=cfg.BLOCK_V, BLOCK_D=cfg.BLOCK_D, GROUP_N=cfg.GROUP_N,
        PIPELINE_TILES=cfg.PIPELINE_TILES,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **LAUNCH_OPTIONS,
    )


def _plan_chunks(n_tokens, n_vocab, need_vocab_side, budget, cfg):
    """(token chunk, vocab chunk) within ``budget`` elements; see the module docstring."""
    if not need_vocab_side:
        # only grad_hidden: whole vocabulary per chunk so grad_hidden rows need no fp32 sum
        cv = n_vocab
        cn = min(n_tokens, max(budget // max(cv, 1), cfg.BLOCK_N))
        if cn < n_tokens:
            cn = max(cfg.BLOCK_N, cn // cfg.BLOCK_N * cfg.BLOCK_N)
        return cn, cv
    # a vocabulary-side gradient: all tokens per chunk so grad_weight rows need no fp32 sum
    cn = n_tokens
    cv = min(n_vocab, budget // max(cn, 1))
    if cv < 4 * cfg.BLOCK_V and n_vocab > cv:
        cv = min(n_vocab, 4 * cfg.BLOCK_V)
        cn = min(n_tokens, max(cfg.BLOCK_N, budget // cv // cfg.BLOCK_N * cfg.BLOCK_N))
    elif cv < n_vocab:
        cv = max(cfg.BLOCK_V, cv // cfg.BLOCK_V * cfg.BLOCK_V)
    return cn, cv


def _float16_dl_scale(targets, ignore_index, entropy, grad_logp, grad_entropy, temperature):
    """(scale, 1 / scale): fp32 device scalars, a power of two, with |scale * dl| < 2^FLOAT16_DL_EXPONENT.

    |onehot - p| <= 1 and |p (log p + H)| <= p |log p| + p H <= 1/e + H bound each element of dl by
    (|g_logp| + |g_ent| (1/e + H)) / temperature on its token's row.
    """
    bound = torch.zeros_like(targets, dtype=torch.float32)
    if grad_logp is not None:
        bound += grad_logp.abs()
    if grad_entropy is not None:
        bound += grad_entropy.abs() * (math.exp(-1.0) + entropy.abs())
    bound = torch.where(targets != ignore_index, bound, 0.0).amax() / temperature
    _, exponent = torch.frexp(bound)  # bound < 2^exponent
    shift = (FLOAT16_DL_EXPONENT - exponent).clamp(-126, 126)  # scale and its inverse stay normal fp32
    one = torch.ones((), device=bound.device)
    return torch.ldexp(one, shift), torch.ldexp(one, -shift)


@on_tensor_device
def linear_logprobs_backward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: Optional[torch.Tensor],
    grad_logp: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    *,
    temperature: float,
    ignore_index: int,
    vocab_start: int = 0,
    needs_grad=(True, True, True),
    config: Optional[dict] = None,
    chunk_elems: Optional[int] = None,
    logits: Optional[str] = None,
):
    """CONTRACT.md backward: (grad_hidden | None, grad_weight | None, grad_bias | None), input dtype.

    ``config`` overrides the launch table; ``chunk_elems`` bounds the dl chunk (default 2^26
    elements, env ``RLPLUS_CHUNK_ELEMS``); ``logits`` picks the logits source ("fused", "tma" or "cublas",
    default env ``RLPLUS_LOGITS`` or fused). With cuBLAS each dl chunk takes its product in place
    (bfloat16 without a bias), or is filled in column slices of 1/PRODUCT_SLICES of it, each
    from an fp32 product of that slice (a quarter of the dl chunk's bytes in half precision), so the
    extra memory grows by that much only.
    """
    need_h, need_w, need_b = (bool(x) for x in needs_grad)
    need_b = need_b and bias is not None
    n_tokens, dim = hidden.shape
    n_vocab = weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    if dtype == torch.float64:
        raise TypeError("hidden: the triton backend takes float32, float16 or bfloat16, not float64")
    if grad_entropy is not None and entropy is None:
        raise ValueError("entropy: needed when grad_entropy is given")
    gh = torch.empty((n_tokens, dim), device=device, dtype=dtype) if need_h else None
    gw = torch.empty((n_vocab, dim), device=device, dtype=dtype) if need_w else None
    gb32 = torch.zeros((n_vocab,), device=device, dtype=torch.float32) if need_b else None
    if not (need_h or need_w or need_b):
        return None, None, None
    if (grad_logp is None and grad_entropy is None) or n_tokens == 0:
        for g in (gh, gw, gb32):
            if g is not None:
                g.zero_()
        return gh, gw, (gb32.to(dtype) if need_b else None)

    check_interpreter()
    h_k = kernel_operand(hidden)
    w_k = kernel_operand(weight)
    source = logits_source(logits)
    from_product = source == "cublas"
    # where rounding T * logp to dl's dtype costs nothing the dl rounding does not (module docstring):
    # not float16 (its range), nor bfloat16 with a bias, which would be added after the rounding, nor float32,
    # whose dl rounding is too fine to hide that of the shift (module docstring)
    product_in_dl = from_product and dtype == torch.bfloat16 and bias is None
    descriptors = uses_descriptors(source, device, h_k, w_k)
    cfg = (product_config(device, config) if from_product
           else pick_config(device, dtype, config, aligned=rows_aligned(h_k, w_k), dim=dim, kernel="bwd",
                            descriptors=descriptors))
    budget = chunk_budget(chunk_elems)
    cn, cv = _plan_chunks(n_tokens, n_vocab, need_w or need_b, budget, cfg)
    n_tok_chunks = triton.cdiv(n_tokens, cn)
    n_voc_chunks = triton.cdiv(n_vocab, cv)

    b_k = kernel_operand(bias) if bias is not None else None
    f32 = lambda x: None if x is None else x.to(torch.float32)  # noqa: E731  ([N] tensors only)
    lse, entropy, grad_logp, grad_entropy = f32(lse), f32(entropy), f32(grad_logp), f32(grad_entropy)
    lse, grad_logp = lse.contiguous(), (grad_logp.contiguous() if grad_logp is not None else None)
    if grad_entropy is not None:
        entropy, grad_entropy = entropy.contiguous(), grad_entropy.contiguous()
    ent_arg = entropy if grad_entropy is not None else lse  # placeholder pointer when unused
    if product_in_dl:
        # the GEMM subtracts T * lse rounded to dl's dtype (exactly, in its fp32 epilogue); the kernel the rest
        neg_shift = (lse * -temperature).to(dtype)
        lse = lse + neg_shift.float() / temperature
    unscale = None  # 1 / the scale of the stored dl (float16 only; see the module docstring)
    if dtype == torch.float16:
        scale, unscale = _float16_dl_scale(targets, ignore_index, entropy, grad_logp, grad_entropy, temperature)
        grad_logp = grad_logp * scale if grad_logp is not None else None
        grad_entropy = grad_entropy * scale if grad_entropy is not None else None

    def unscaled(acc32):
        return acc32 if unscale is None else acc32.mul_(unscale)

    # dl chunks are [rows, cols] ([cols, rows] seen transposed when it holds the product) with padded rows
    chunk_shape = (min(cn, n_tokens), min(cv, n_vocab))
    buf = padded_storage(*(chunk_shape[::-1] if product_in_dl else chunk_shape), device=device, dtype=dtype)
    gw32 = torch.zeros((n_vocab, dim), device=device, dtype=torch.float32) if (need_w and n_tok_chunks > 1) else None
    # scaled float16 grad_weight rows that need no cross-chunk sum still leave cuBLAS in fp32
    gw_chunk32 = (torch.empty(min(cv, n_vocab) * dim, device=device, dtype=torch.float32)
                  if (need_w and gw32 is None and unscale is not None) else None)
    precision = dot_precision(dtype, device)

    # the column slices of a dl chunk that one fp32 product covers (the whole chunk otherwise)
    fp32_products = from_product and not product_in_dl
    slice_cols = max(cfg.BLOCK_V, cv // PRODUCT_SLICES // cfg.BLOCK_V * cfg.BLOCK_V) if fp32_products else cv
    product = (padded_storage(min(cn, n_tokens), min(slice_cols, n_vocab), device=device, dtype=torch.float32)
               if fp32_products else None)

    def fill_dl(dl, n0, n1, c0, c1):
        """dl[:, :] = d loss / d logits of tokens n0:n1 and vocabulary rows c0:c1 of this shard."""
        rows, cols = n1 - n0, c1 - c0
        hk, wk = h_k[n0:n1], w_k[c0:c1]
        bk = b_k[c0:c1] if b_k is not None else None
        prod = None
        if product_in_dl:  # dl is a [cols, rows] buffer seen transposed: the GEMM's row term is per token
            addmm_rounded_once(neg_shift[n0:n1], wk, hk.t(), out=dl.t())
            prod = dl
        elif from_product:
            prod = mm_fp32(hk, wk.t(), out=padded_matrix(product, rows, cols))
        launch_dlogits(hk, wk, bk, targets[n0:n1], lse[n0:n1], ent_arg[n0:n1],
                       grad_logp[n0:n1] if grad_logp is not None else None,
                       grad_entropy[n0:n1] if grad_entropy is not None else None, dl, prod, cfg,
                       temperature=temperature, ignore_index=ignore_index, col_start=int(vocab_start) + c0,
                       precision=precision, descriptors=descriptors)

    for n0 in range(0, n_tokens, cn):
        n1 = min(n0 + cn, n_tokens)
        gh32 = (torch.zeros((n1 - n0, dim), device=device, dtype=torch.float32)
                if (need_h and (n_voc_chunks > 1 or unscale is not None)) else None)
        for v0 in range(0, n_vocab, cv):
            v1 = min(v0 + cv, n_vocab)
            rows, cols = n1 - n0, v1 - v0
            dl = padded_matrix(buf, cols, rows).t() if product_in_dl else padded_matrix(buf, rows, cols)
            for c0 in range(v0, v1, slice_cols):
                c1 = min(c0 + slice_cols, v1)
                fill_dl(dl[:, c0 - v0:c1 - v0], n0, n1, c0, c1)
            if need_h:
                if gh32 is None:
                    torch.mm(dl, weight[v0:v1], out=gh[n0:n1])
                else:
                    mm_accumulate_fp32(gh32, dl, weight[v0:v1])
            if need_w:
                if gw_chunk32 is not None:
                    gw_chunk = gw_chunk32[: (v1 - v0) * dim].view(v1 - v0, dim)
                    gw[v0:v1].copy_(unscaled(mm_fp32(dl.t(), hidden[n0:n1], out=gw_chunk)))
                elif gw32 is None:
                    torch.mm(dl.t(), hidden[n0:n1], out=gw[v0:v1])
                else:
                    mm_accumulate_fp32(gw32[v0:v1], dl.t(), hidden[n0:n1])
            if need_b:
                gb32[v0:v1] += dl.sum(0, dtype=torch.float32)
        if gh32 is not None:
            gh[n0:n1].copy_(unscaled(gh32))
    if gw32 is not None:
        gw.copy_(unscaled(gw32))
    return gh, gw, (unscaled(gb32).to(dtype) if need_b else None)
