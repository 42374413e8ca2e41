"""Small @triton.jit helpers shared by the forward and backward kernels (inlined by Triton)."""

import triton
import triton.language as tl

from ..backends import common

LOG_P_FLOOR = tl.constexpr(common.LOG_P_FLOOR)


# NaN in, NaN out, as torch.maximum / minimum / clamp: tl.maximum's default returns the other operand
# of a NaN (PTX max.f32), which made a NaN logit, advantage or log-prob a finite loss
@triton.jit
def nan_maximum(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_minimum(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def logits_tile(
    hidden_ptr, weight_ptr, bias_ptr,  # [N, D], [V, D], [V] or None (input dtype)
    offs_n64, offs_v64, mask_n, mask_v,  # this tile's token rows and vocabulary columns
    D, stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d, stride_bias_v,
    temperature,
    DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """z = (hidden[offs_n] @ weight[offs_v]^T + bias[offs_v]) / temperature, [BLOCK_N, BLOCK_V] fp32."""
    offs_d = tl.arange(0, BLOCK_D)
    h_ptrs = hidden_ptr + offs_n64[:, None] * stride_hidden_n + offs_d[None, :].to(tl.int64) * stride_hidden_d
    w_ptrs = weight_ptr + offs_v64[:, None] * stride_weight_v + offs_d[None, :].to(tl.int64) * stride_weight_d
    h_step = tl.full([], BLOCK_D, tl.int64) * stride_hidden_d
    w_step = tl.full([], BLOCK_D, tl.int64) * stride_weight_d
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    # full BLOCK_D steps unmasked along D (keeps the loop software-pipelined), then one masked tail
    for d0 in range(0, D - D % BLOCK_D, BLOCK_D):
        h = tl.load(h_ptrs, mask=mask_n[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=mask_v[:, None], other=0.0)
        # we accumulate into fp32 whatever the operand dtype
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
        h_ptrs += h_step
        w_ptrs += w_step
    if not EVEN_D:
        mask_d = (D - D % BLOCK_D + offs_d) < D
        h = tl.load(h_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_v[:, None] & mask_d[None, :], other=0.0)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return _bias_and_temperature(acc, bias_ptr, stride_bias_v, offs_v64, mask_v, temperature, HAS_BIAS)


@triton.jit
def descriptor_logits_tile(
    hidden_desc, weight_desc, bias_ptr,  # TMA descriptors of [N, D] / [V, D] with blocks [BLOCK_N, BLOCK_D] /
    # [BLOCK_V, BLOCK_D]; [V] or None (input dtype)
    row0, col0, offs_v64, mask_v,  # this tile's first token row and vocabulary column
    D, stride_bias_v,
    temperature,
    DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """`logits_tile` with the operands fetched by TMA (sm_90): no per-element addresses, which in the
    pointer form hold a quarter of the registers, and no masks: rows and columns past the end of a
    descriptor read as 0, the D tail included."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        h = hidden_desc.load([row0, d0])
        w = weight_desc.load([col0, d0])
        acc = tl.dot(h, tl.trans(w), acc, input_precision=DOT_PRECISION)
    return _bias_and_temperature(acc, bias_ptr, stride_bias_v, offs_v64, mask_v, temperature, HAS_BIAS)


@triton.jit
def product_tile(
    prod_ptr, stride_prod_n, stride_prod_v,  # [rows, cols]: hidden @ weight^T of this chunk, computed by cuBLAS
    bias_ptr, stride_bias_v,  # [cols] or None (input dtype)
    offs_n64, offs_v64, mask_n, mask_v,
    temperature,
    HAS_BIAS: tl.constexpr,
):
    """`logits_tile` when the product is already in memory: (prod[offs_n, offs_v] + bias) / temperature."""
    acc = tl.load(prod_ptr + offs_n64[:, None] * stride_prod_n + offs_v64[None, :] * stride_prod_v,
                  mask=mask_n[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
    return _bias_and_temperature(acc, bias_ptr, stride_bias_v, offs_v64, mask_v, temperature, HAS_BIAS)


@triton.jit
def source_logits_tile(
    hidden_ptr, weight_ptr, bias_ptr, prod_ptr, hidden_desc, weight_desc,  # as in the kernels' signatures
    row0, col0, offs_n64, offs_v64, mask_n, mask_v,  # this tile's first row and column, its rows and columns
    D, stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d, stride_bias_v, stride_prod_n,
    stride_prod_v, temperature,
    DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_D: tl.constexpr,
    FROM_PRODUCT: tl.constexpr, USE_TMA: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The logits tile from the launch's logits source: tl.dot fed by TMA descriptors (USE_TMA), a
    cuBLAS product in memory (FROM_PRODUCT), or tl.dot fed by pointer loads."""
    if USE_TMA:
        z = descriptor_logits_tile(hidden_desc, weight_desc, bias_ptr, row0, col0, offs_v64, mask_v, D, stride_bias_v,
                                   temperature, DOT_PRECISION, HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_D)
    elif FROM_PRODUCT:
        z = product_tile(prod_ptr, stride_prod_n, stride_prod_v, bias_ptr, stride_bias_v, offs_n64, offs_v64,
                         mask_n, mask_v, temperature, HAS_BIAS)
    else:
        z = logits_tile(hidden_ptr, weight_ptr, bias_ptr, offs_n64, offs_v64, mask_n, mask_v,
                        D, stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d, stride_bias_v,
                        temperature, DOT_PRECISION, HAS_BIAS, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
    return z


@triton.jit
def _bias_and_temperature(acc, bias_ptr, stride_bias_v, offs_v64, mask_v, temperature, HAS_BIAS: tl.constexpr):
    """(acc + bias[offs_v]) / temperature: the end of every logits tile, whatever computed acc."""
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_v64 * stride_bias_v, mask=mask_v, other=0.0)
        acc += b.to(tl.float32)[None, :]
    return acc / temperature
