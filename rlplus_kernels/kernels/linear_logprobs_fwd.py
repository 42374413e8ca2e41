"""Forward of the vocabulary-streaming op: log-sum-exp, target logit and entropy per token.

Exact computation (CONTRACT.md), never materialising ``z`` for all tokens::

    z            = (hidden.float() @ weight.float().T + bias) / temperature
    lse          = z.logsumexp(-1)
    target_logit = z[n, targets[n] - vocab_start] if that is inside this shard, else 0 (0 if ignored)
    entropy      = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)

Blocked algorithm (one program = BLOCK_N tokens x one vocabulary split)::

    m, s, t, tz = -inf, 0, 0, 0                     # running max, sum e^(z-m), sum e^(z-m)(z-m), z_y
    for v0 in split, step BLOCK_V:
        acc = sum_d  h[n, d-block] @ W[v-block, d-block]^T          (tl.dot, fp32 accumulate)
        z = (acc + b) / T;  m' = max(m, rowmax z);  a = e^(m - m')
        t = a (t + s (m - m')) + sum e^(z-m')(z-m');  s = a s + sum e^(z-m');  m = m'
        tz += z[target]
    write partials (m, s, t, tz)[split, n]

Splits are merged in torch on [splits, N] tensors (``merge_partials``). With the cuBLAS logits
source (``RLPLUS_LOGITS=cublas``) ``acc`` is read from an fp32 product ``h @ W[c]^T`` that cuBLAS
writes per vocabulary chunk c (``FROM_PRODUCT``), one launch per chunk, all splits merged once.
"""

# No `from __future__ import annotations`: triton 3.0's interpreter finds constexpr parameters
# only by annotation objects, not by the string "tl.constexpr".
from typing import Optional

import torch

import triton
import triton.language as tl

from .._environment import graph_capturing
from ._config import (
    AUTOTUNE_CANDIDATES,
    LAUNCH_OPTIONS,
    autotune_applies,
    check_interpreter,
    dot_precision,
    kernel_operand,
    logits_source,
    on_tensor_device,
    operand_descriptors,
    padded_matrix,
    padded_storage,
    pick_config,
    pipelining_supported,
    product_config,
    rows_aligned,
    sm_count,
    uses_descriptors,
)
from .cublas import mm_fp32
from .tl_utils import LOG_P_FLOOR, nan_maximum, source_logits_tile

# fp32 product of one vocabulary chunk on the cuBLAS logits source (256 MiB: 16k tokens x 4k columns)
DEFAULT_PRODUCT_ELEMS = 1 << 26


@triton.heuristics(
    {
        "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
        "FROM_PRODUCT": lambda args: args["prod_ptr"] is not None,
        "USE_TMA": lambda args: args["hidden_desc"] is not None,
        "EVEN_D": lambda args: args["D"] % args["BLOCK_D"] == 0,
    }
)
@triton.jit
def _linear_logprobs_fwd_kernel(
    # pointers
    hidden_ptr,  # [N, D] fp32/fp16/bf16
    weight_ptr,  # [V, D] same dtype (this shard's rows)
    bias_ptr,  # [V] same dtype, or None
    targets_ptr,  # [N] int64, global ids
    part_m_ptr,  # [SPLITS, N] fp32 out: running max
    part_s_ptr,  # [SPLITS, N] fp32 out: sum exp(z - m)
    part_t_ptr,  # [SPLITS, N] fp32 out: sum exp(z - m) * (z - m)   (WITH_ENTROPY only)
    part_tz_ptr,  # [SPLITS, N] fp32 out: target logit if inside this split, else 0
    prod_ptr,  # [N, V] fp32 hidden @ weight^T from cuBLAS, or None (then tl.dot computes it)
    hidden_desc,  # TMA descriptor of hidden, blocks [BLOCK_N, BLOCK_D], or None (then pointer loads)
    weight_desc,  # TMA descriptor of weight, blocks [BLOCK_V, BLOCK_D], or None
    # shapes
    N,
    V,
    D,
    V_PER_SPLIT,
    SPLITS,
    # strides
    stride_hidden_n,
    stride_hidden_d,
    stride_weight_v,
    stride_weight_d,
    stride_bias_v,
    stride_targets_n,
    stride_prod_n,
    # runtime scalars (never constexpr: a constexpr recompiles per value)
    temperature,
    ignore_index,
    vocab_start,
    # meta-parameters
    WITH_ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FROM_PRODUCT: tl.constexpr,
    USE_TMA: tl.constexpr,
    EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP_N: tl.constexpr,
    PIPELINE_TILES: tl.constexpr,
):
    """Per-(token, split) partials of the online softmax over one vocabulary split.

    hidden_ptr [N, D], weight_ptr [V, D], bias_ptr [V] or None (input dtype); targets_ptr [N]
    int (global ids); part_m_ptr / part_s_ptr / part_t_ptr / part_tz_ptr [SPLITS, N] fp32 outputs
    (running max, sum e^(z-m), sum e^(z-m)(z-m), target logit); prod_ptr [N, V] fp32 or None;
    hidden_desc / weight_desc TMA descriptors of hidden_ptr / weight_ptr or None. Program p covers BLOCK_N tokens
    and columns [k V_PER_SPLIT, (k+1) V_PER_SPLIT) of this shard.
    """
    # Grouped order: consecutive programs cover GROUP_N token blocks x all splits, so that the
    # hidden blocks of the programs in flight stay in L2 while the weight tiles stream through.
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_N * SPLITS
    group = pid // per_group
    first_n = group * GROUP_N
    group_n = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_n
    pid_s = (pid % per_group) // group_n

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n64 = offs_n.to(tl.int64)

    tgt = tl.load(targets_ptr + offs_n64 * stride_targets_n, mask=mask_n, other=ignore_index)
    # local column of the target; -1 (never matched) when ignored or outside this shard
    tgt_local = tl.where(tgt == ignore_index, -1, tgt - vocab_start)

    v_begin = pid_s * V_PER_SPLIT
    v_end = tl.minimum(v_begin + V_PER_SPLIT, V)

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_N], tl.float32)
    t_i = tl.zeros([BLOCK_N], tl.float32)
    tz_i = tl.zeros([BLOCK_N], tl.float32)
    # two loops, so that the default one never passes `flatten` (tl.range takes it from triton 3.3)
    if PIPELINE_TILES:
        for v0 in tl.range(v_begin, v_end, BLOCK_V, flatten=True):
            m_i, s_i, t_i, tz_i = _online_softmax_step(
                v0, v_end, m_i, s_i, t_i, tz_i, pid_n * BLOCK_N, offs_n64, mask_n, tgt_local,
                hidden_ptr, weight_ptr, bias_ptr, prod_ptr, hidden_desc, weight_desc, D, stride_hidden_n,
                stride_hidden_d, stride_weight_v, stride_weight_d, stride_bias_v, stride_prod_n, temperature,
                WITH_ENTROPY, DOT_PRECISION, HAS_BIAS, FROM_PRODUCT, USE_TMA, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D,
            )
    else:
        for v0 in range(v_begin, v_end, BLOCK_V):
            m_i, s_i, t_i, tz_i = _online_softmax_step(
                v0, v_end, m_i, s_i, t_i, tz_i, pid_n * BLOCK_N, offs_n64, mask_n, tgt_local,
                hidden_ptr, weight_ptr, bias_ptr, prod_ptr, hidden_desc, weight_desc, D, stride_hidden_n,
                stride_hidden_d, stride_weight_v, stride_weight_d, stride_bias_v, stride_prod_n, temperature,
                WITH_ENTROPY, DOT_PRECISION, HAS_BIAS, FROM_PRODUCT, USE_TMA, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D,
            )

    out = pid_s.to(tl.int64) * N + offs_n64
    tl.store(part_m_ptr + out, m_i, mask=mask_n)
    tl.store(part_s_ptr + out, s_i, mask=mask_n)
    tl.store(part_tz_ptr + out, tz_i, mask=mask_n)
    if WITH_ENTROPY:
        tl.store(part_t_ptr + out, t_i, mask=mask_n)


@triton.jit
def _online_softmax_step(
    v0, v_end, m_i, s_i, t_i, tz_i,  # this tile's first column, the split's end, the running state
    row0, offs_n64, mask_n, tgt_local,  # the program's token rows and their targets' local columns
    hidden_ptr, weight_ptr, bias_ptr, prod_ptr, hidden_desc, weight_desc,
    D, stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d, stride_bias_v, stride_prod_n,
    temperature,
    WITH_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr, HAS_BIAS: tl.constexpr, FROM_PRODUCT: tl.constexpr,
    USE_TMA: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One vocabulary tile of `_linear_logprobs_fwd_kernel`: its logits, then the running (max,
    sum e^(z-m), sum e^(z-m)(z-m), target logit) updated; returns the new state."""
    offs_v = v0 + tl.arange(0, BLOCK_V)
    mask_v = offs_v < v_end
    z = source_logits_tile(hidden_ptr, weight_ptr, bias_ptr, prod_ptr, hidden_desc, weight_desc,
                           row0, v0, offs_n64, offs_v.to(tl.int64), mask_n, mask_v,
                           D, stride_hidden_n, stride_hidden_d, stride_weight_v, stride_weight_d, stride_bias_v,
                           stride_prod_n, 1, temperature, DOT_PRECISION, HAS_BIAS, EVEN_D, FROM_PRODUCT, USE_TMA,
                           BLOCK_N, BLOCK_V, BLOCK_D)
    z = tl.where(mask_v[None, :], z, float("-inf"))
    # the target logit first: z is then dead once z - m is formed (one tile fewer live in registers)
    hit = (offs_v[None, :] == tgt_local[:, None]) & mask_v[None, :]
    tz_i += tl.sum(tl.where(hit, z, 0.0), 1)

    m_new = tl.maximum(m_i, tl.max(z, 1))
    # the shifts are taken from a finite max (-inf while every logit so far is -inf: a vocabulary
    # masked by its bias at T < 1) and floored at LOG_P_FLOOR, where e^shift is 0 anyway
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_ref)  # 0 on the first tile (m_i = -inf)
    # (a NaN logit makes the sum NaN; the max above skips it)
    zc = nan_maximum(z - m_ref[:, None], LOG_P_FLOOR)
    p = tl.exp(zc)  # 0 at masked columns
    if WITH_ENTROPY:
        # shift the running sum of e^(z-m)(z-m) to the new max; guarded where s_i is still 0
        delta = tl.where(s_i > 0, tl.maximum(m_i - m_ref, LOG_P_FLOOR), 0.0)
        t_i = alpha * (t_i + s_i * delta) + tl.sum(p * zc, 1)  # p = 0 at masked columns, zc finite
    s_i = s_i * alpha + tl.sum(p, 1)
    m_i = m_new
    return m_i, s_i, t_i, tz_i


_AUTOTUNED = None
# RLPLUS_AUTOTUNE=1: the candidate chosen per (N rounded up to a power of two, V, D, entropy, bias, dtype, device).
# The autotuner keys on N itself, and rollout batches change size every step: each new size would time every
# candidate again.
_TUNED: dict = {}


def _autotuned_kernel():
    """``RLPLUS_AUTOTUNE=1`` only: (the autotuner over `AUTOTUNE_CANDIDATES`, those candidates in its order)."""
    global _AUTOTUNED
    if _AUTOTUNED is None:
        candidates = [c for c in AUTOTUNE_CANDIDATES if pipelining_supported() or not c.PIPELINE_TILES]
        configs = [
            triton.Config({"BLOCK_N": c.BLOCK_N, "BLOCK_V": c.BLOCK_V, "BLOCK_D": c.BLOCK_D, "GROUP_N": c.GROUP_N,
                           "PIPELINE_TILES": c.PIPELINE_TILES}, num_warps=c.num_warps, num_stages=c.num_stages)
            for c in candidates
        ]
        tuner = triton.autotune(configs=configs, key=["N", "V", "D", "WITH_ENTROPY"])(_linear_logprobs_fwd_kernel)
        _AUTOTUNED = tuner, candidates
    return _AUTOTUNED


def choose_splits(n_tokens: int, n_vocab: int, block_n: int, block_v: int, device: torch.device,
                  min_splits: int = 16, waves: int = 8) -> tuple[int, int]:
    """Vocabulary splits so that a few thousand tokens still fill every SM several times over.

    Returns (splits, vocab columns per split); every split holds at least one column, so each
    partial max is finite. Extra splits cost only [splits, N] floats (the hidden block is
    re-read per vocabulary tile anyway).
    """
    n_blocks = triton.cdiv(n_tokens, block_n)
    v_tiles = triton.cdiv(n_vocab, block_v)
    want = max(min_splits, triton.cdiv(waves * sm_count(device), n_blocks))
    splits = max(1, min(v_tiles, want))
    per_split = triton.cdiv(v_tiles, splits) * block_v
    return triton.cdiv(n_vocab, per_split), per_split


def merge_partials(m, s, t, tz, with_entropy: bool):
    """Merge [splits, N] partials: lse = M + log sum_k s_k e^(m_k - M), and likewise for t.

    Returns (lse, target_logit, entropy | None). ``entropy`` is log S - T / S, a sum of two terms >= 0
    (T <= 0): no cancellation at large logits, where lse - sum p*z would lose ulp(lse).
    """
    big = m.max(0).values
    # relative to a finite max, as in the kernel: -inf where every logit of this shard is -inf (a
    # vocabulary-parallel shard masked by its bias), whose lse is then -inf and entropy 0, not NaN
    big = torch.where(big == float("-inf"), 0.0, big)
    shift = (m - big).clamp(min=LOG_P_FLOOR.value)  # floored as in the kernel: s * shift stays finite
    scale = torch.exp(shift)
    s_tot = (s * scale).sum(0)
    lse = big + torch.log(s_tot)
    target_logit = tz.sum(0)
    if not with_entropy:
        return lse, target_logit, None
    t_tot = ((t + s * shift) * scale).sum(0)
    entropy = torch.where(s_tot == 0, 0.0, torch.log(s_tot) - t_tot / s_tot)  # NaN stays NaN
    return lse, target_logit, entropy


def _launch(h, w, b, targets, parts, prod, per_split, splits, cfg, *, temperature, ignore_index, vocab_start,
            with_entropy, precision, descriptors=False, autotune=False):
    """One launch over the [N, w.shape[0]] logits (from tl.dot, or read from `prod`) into parts [k, splits, N]."""
    n_tokens, dim = h.shape
    part_t = parts[3] if with_entropy else parts[0]  # placeholder pointer when unused, never written
    h_desc, w_desc = operand_descriptors(h, w, cfg) if descriptors else (None, None)
    args = (
        h, w, b, targets, parts[0], parts[1], part_t, parts[2], prod, h_desc, w_desc,
        n_tokens, w.shape[0], dim, per_split, splits,
        h.stride(0), h.stride(1), w.stride(0), w.stride(1),
        b.stride(0) if b is not None else 0, targets.stride(0), prod.stride(0) if prod is not None else 0,
        float(temperature), int(ignore_index), int(vocab_start),
    )
    if autotune:
        key = (triton.next_power_of_2(n_tokens), w.shape[0], dim, with_entropy, b is not None, h.dtype, h.device)
        if key not in _TUNED:  # the autotuner times the candidates on this call and launches the fastest
            if graph_capturing(h.device):
                raise RuntimeError(
                    f"RLPLUS_AUTOTUNE=1: this first call with {n_tokens} tokens (the range up to {key[0]}) would "
                    "time the forward's candidates, which synchronises with the host and cannot happen while a "
                    "CUDA graph is captured. Make one call of each token range before the capture, or unset "
                    "RLPLUS_AUTOTUNE.")
            tuner, candidates = _autotuned_kernel()
            grid = lambda meta: (triton.cdiv(n_tokens, meta["BLOCK_N"]) * splits,)  # noqa: E731
            tuner[grid](*args, WITH_ENTROPY=with_entropy, DOT_PRECISION=precision, **LAUNCH_OPTIONS)
            _TUNED[key] = candidates[tuner.configs.index(tuner.best_config)]
            return
        cfg = _TUNED[key]
    grid = (triton.cdiv(n_tokens, cfg.BLOCK_N) * splits,)
    _linear_logprobs_fwd_kernel[grid](
        *args,
        WITH_ENTROPY=with_entropy,
        DOT_PRECISION=precision,
        BLOCK_N=cfg.BLOCK_N,
        BLOCK_V=cfg.BLOCK_V,
        BLOCK_D=cfg.BLOCK_D,
        GROUP_N=cfg.GROUP_N,
        PIPELINE_TILES=cfg.PIPELINE_TILES,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **LAUNCH_OPTIONS,
    )


def _parts(with_entropy, splits, n_tokens, device):
    return torch.empty((4 if with_entropy else 3, splits, n_tokens), device=device, dtype=torch.float32)


def _forward_from_products(h, w, b, targets, cfg, chunk_elems, **launch):
    """The cuBLAS logits source: per vocabulary chunk an fp32 product h @ W_c^T (at most chunk_elems
    elements), read by the kernel with FROM_PRODUCT; every chunk's splits go into one set of partials."""
    n_tokens, n_vocab = h.shape[0], w.shape[0]
    cols = min(n_vocab, max(cfg.BLOCK_V, chunk_elems // n_tokens // cfg.BLOCK_V * cfg.BLOCK_V))
    chunks = [(v0, min(v0 + cols, n_vocab)) for v0 in range(0, n_vocab, cols)]
    # fewer splits than the fused kernel: each chunk is its own launch, and partials cost 16 B per split and token
    layout = [choose_splits(n_tokens, v1 - v0, cfg.BLOCK_N, cfg.BLOCK_V, h.device, min_splits=1, waves=4)
              for v0, v1 in chunks]
    parts = _parts(launch["with_entropy"], sum(splits for splits, _ in layout), n_tokens, h.device)
    product = padded_storage(n_tokens, cols, device=h.device, dtype=torch.float32)
    vocab_start, first = launch.pop("vocab_start"), 0
    for (v0, v1), (splits, per_split) in zip(chunks, layout):
        prod = mm_fp32(h, w[v0:v1].t(), out=padded_matrix(product, n_tokens, v1 - v0))
        _launch(h, w[v0:v1], None if b is None else b[v0:v1], targets, parts[:, first:first + splits], prod,
                per_split, splits, cfg, vocab_start=vocab_start + v0, **launch)
        first += splits
    return parts


def forward_from_product(h, w, b, targets, prod, cfg, **launch):
    """Merged (lse, target_logit, entropy | None) of logits whose matmul part `prod` (fp32 [N, V], the
    product h @ w^T from cuBLAS) holds for all of w's rows: one launch, its splits merged."""
    splits, per_split = choose_splits(h.shape[0], w.shape[0], cfg.BLOCK_N, cfg.BLOCK_V, h.device,
                                      min_splits=1, waves=4)
    parts = _parts(launch["with_entropy"], splits, h.shape[0], h.device)
    _launch(h, w, b, targets, parts, prod, per_split, splits, cfg, **launch)
    return merge_partials(parts[0], parts[1], parts[3] if launch["with_entropy"] else None, parts[2],
                          launch["with_entropy"])


@on_tensor_device
def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int,
    vocab_start: int = 0,
    with_entropy: bool,
    config: Optional[dict] = None,
    logits: Optional[str] = None,
    chunk_elems: Optional[int] = None,
):
    """CONTRACT.md forward: (lse [N], target_logit [N], entropy [N] | None), float32; the kernel's splits merged.

    ``config`` overrides the launch table (BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages,
    GROUP_N, PIPELINE_TILES, splits); tests use it to run small tiles under the interpreter. ``logits`` picks
    the logits source ("fused", "tma" or "cublas", default env ``RLPLUS_LOGITS`` or fused); ``chunk_elems``
    bounds the cuBLAS path's fp32 product (default 2^26 elements).
    """
    n_tokens, dim = hidden.shape
    n_vocab = weight.shape[0]
    device = hidden.device
    if hidden.dtype == torch.float64:
        raise TypeError("hidden: the triton backend takes float32, float16 or bfloat16, not float64")
    source = logits_source(logits)
    out_shape = (n_tokens,)
    if n_tokens == 0:
        z = torch.zeros(out_shape, device=device, dtype=torch.float32)
        return z, z.clone(), (z.clone() if with_entropy else None)
    check_interpreter()
    h = kernel_operand(hidden)
    w = kernel_operand(weight)
    b = kernel_operand(bias) if bias is not None else None
    launch = dict(temperature=temperature, ignore_index=ignore_index, vocab_start=vocab_start,
                  with_entropy=with_entropy, precision=dot_precision(hidden.dtype, device))
    if source == "cublas":
        parts = _forward_from_products(h, w, b, targets, product_config(device, config),
                                       chunk_elems or DEFAULT_PRODUCT_ELEMS, **launch)
    else:
        descriptors = uses_descriptors(source, device, h, w)
        cfg = pick_config(device, hidden.dtype, config, aligned=rows_aligned(h, w), dim=dim, descriptors=descriptors)
        # descriptors fix the blocks; an explicit config is taken as given
        autotune = not descriptors and not config and autotune_applies(device, hidden.dtype, rows_aligned(h, w), dim)
        if config and "splits" in config:
            splits = max(1, min(int(config["splits"]), triton.cdiv(n_vocab, cfg.BLOCK_V)))
            per_split = triton.cdiv(triton.cdiv(n_vocab, cfg.BLOCK_V), splits) * cfg.BLOCK_V
            splits = triton.cdiv(n_vocab, per_split)
        else:
            # with autotuning BLOCK_V may change: a split length that is a multiple of 256 fits all
            splits, per_split = choose_splits(n_tokens, n_vocab, cfg.BLOCK_N,
                                              256 if autotune else cfg.BLOCK_V, device)
        parts = _parts(with_entropy, splits, n_tokens, device)
        _launch(h, w, b, targets, parts, None, per_split, splits, cfg, descriptors=descriptors, autotune=autotune,
                **launch)
    return merge_partials(parts[0], parts[1], parts[3] if with_entropy else None, parts[2], with_entropy)
