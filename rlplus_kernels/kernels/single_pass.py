"""The RL-PLUS loss and its gradients in one pass over the logits: three GEMMs instead of four.

The default (two-pass) schedule forms every logit twice, for the forward's log-sum-exp and for the
backward's recompute. But the RL head is per token: d loss / d log p_t and d loss / d H_t depend only
on token t's log p, entropy and inputs, and on aggregation weights known before any logit. So once a
chunk of tokens has the logits of the whole vocabulary, its gradients can be formed at once::

    for each chunk of c tokens (dl [c, V] <= 2 chunk_elems elements):
        for each slice of s of its tokens (fp32 P [s, V] <= chunk_elems / 2 elements):
            P = h_s @ W^T                                   cuBLAS, fp32
            lse, z_y, H          <- forward kernel reading P (FROM_PRODUCT), splits merged
            loss_t, d loss/d logp_t  <- the head kernel;    d loss/d H_t = -entropy_coef a_t
            dl[s] = d loss / d logits  <- backward kernel reading P (FROM_PRODUCT), input dtype
        grad_hidden[c]  = dl @ W                            cuBLAS, written once
        grad_weight    (+)= dl^T @ h_c                      cuBLAS, summed over token chunks in place
        grad_bias       += dl.sum(0)                        fp32

The gradients are those of the loss itself (upstream gradient 1); the autograd op
(backends/single_pass_op.py) scales them by the upstream gradient in its backward.

What it costs against the two-pass schedule: grad_weight is summed over the token chunks in its own
dtype (cuBLAS accumulates each chunk's product in fp32 and rounds the running sum once per chunk:
N / c roundings where the two-pass schedule rounds once); the gradients exist from the forward on;
it serves the scalar loss only (not arbitrary upstream gradients of log-probs). float16 is left to the
two-pass schedule (its dl is stored scaled by a bound of the upstream gradients, which would differ
per chunk), and so is a vocabulary-parallel head (its log-sum-exp needs every rank's shard first).
Memory: a slice's fp32 product and a chunk's dl, 6 bytes (bf16) or 10 (fp32) per element of chunk_elems.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..backends import SINGLE_PASS_DTYPES
from ..backends.common import finish_logprobs
from ._config import (check_interpreter, chunk_budget, dot_precision, kernel_operand, on_tensor_device,
                      padded_matrix, padded_storage, product_config)
from .cublas import mm_fp32
from .linear_logprobs_bwd import launch_dlogits
from .linear_logprobs_fwd import forward_from_product
from .rlplus_head import STAT_NAMES, rlplus_head_forward

# bf16 grad_weight is rounded once per token chunk: its error grows as sqrt(chunks) (2.2x one rounding
# at 16, 3.6x at 64). Past this many chunks the chunks grow instead: the error stays bounded and memory a
# fraction of naive's (dl: 2 N V / 64 bytes in bf16, ~0.2 % of naive's ~18 N V).
MAX_TOKEN_CHUNKS = 64


def _whole_blocks(rows: int, block: int) -> int:
    return -(-rows // block) * block


def plan_chunks(n_tokens: int, n_vocab: int, budget: int, block_n: int) -> tuple:
    """(rows of a token chunk, rows of its product slices): a slice's fp32 product holds at most budget / 2
    elements and a chunk's dl at most 2 budget (6 bytes per budget element in bf16: at most 384 MiB at the
    default 2^26); a chunk is whole slices, a slice whole blocks of block_n rows
    (at least one), and chunks number at most MAX_TOKEN_CHUNKS. Both at most N."""
    slice_rows = max(block_n, budget // 2 // max(n_vocab, 1) // block_n * block_n)
    chunk_rows = max(slice_rows, 2 * budget // max(n_vocab, 1) // slice_rows * slice_rows,
                     _whole_blocks(-(-n_tokens // MAX_TOKEN_CHUNKS), slice_rows))
    return min(n_tokens, chunk_rows), min(n_tokens, slice_rows)


@on_tensor_device
def rlplus_loss_single_pass(hidden, weight, bias, targets, advantages, old_logprobs, external,
                            behavior_logprobs, ref_logprobs, agg_weight, coefs, *, temperature: float,
                            ignore_index: int, with_entropy: bool, entropy_term: bool,
                            needs_grad=(True, True, True), chunk_elems: Optional[int] = None):
    """(loss, logp, entropy | None, stats [5, N], grad_hidden | None, grad_weight | None, grad_bias | None).

    loss = sum_t weighted_loss_t (the head kernel's, float32); logp, entropy [N] float32, 0 at ignored
    rows; gradients in the input dtype, of the loss itself, computed for `needs_grad` (hidden, weight,
    bias). Per-token inputs and `coefs` (the head's float hyper-parameters) as `rlplus_head_forward` takes
    them; `entropy_term`: the loss has one (entropy_coef != 0). `chunk_elems` sizes the chunks and
    slices (`plan_chunks`; default 2^26, env ``RLPLUS_CHUNK_ELEMS``).
    """
    n_tokens, dim = hidden.shape
    n_vocab = weight.shape[0]
    dtype, device = hidden.dtype, hidden.device
    if dtype not in SINGLE_PASS_DTYPES:
        raise TypeError(f"hidden: the single-pass schedule takes float32 or bfloat16, not {dtype}")
    need_h, need_w, need_b = (bool(x) for x in needs_grad)
    need_b = need_b and bias is not None
    with_entropy = with_entropy or entropy_term
    f32 = dict(device=device, dtype=torch.float32)
    logp = torch.zeros(n_tokens, **f32)
    entropy = torch.zeros(n_tokens, **f32) if with_entropy else None
    weighted_loss = torch.zeros(n_tokens, **f32)
    stats = torch.zeros(len(STAT_NAMES), n_tokens, **f32)
    gh = torch.empty((n_tokens, dim), device=device, dtype=dtype) if need_h else None
    gw = torch.empty((n_vocab, dim), device=device, dtype=dtype) if need_w else None
    gb32 = torch.zeros(n_vocab, **f32) if need_b else None
    if n_tokens == 0:
        for g in (gh, gw):
            if g is not None:
                g.zero_()
        return (weighted_loss.sum(), logp, entropy, stats, gh, gw,
                gb32.to(dtype) if gb32 is not None else None)

    check_interpreter()
    h_k, w_k = kernel_operand(hidden), kernel_operand(weight)
    b_k = kernel_operand(bias) if bias is not None else None
    cfg = product_config(device)
    launch = dict(temperature=temperature, ignore_index=ignore_index, precision=dot_precision(dtype, device))
    budget = chunk_budget(chunk_elems)
    chunk_rows, slice_rows = plan_chunks(n_tokens, n_vocab, budget, cfg.BLOCK_N)
    product = padded_storage(slice_rows, n_vocab, **f32)
    dl_buf = padded_storage(chunk_rows, n_vocab, device=device, dtype=dtype)
    need_any = need_h or need_w or need_b
    per_token = lambda x, n0, n1: None if x is None else x[n0:n1]  # noqa: E731

    for c0 in range(0, n_tokens, chunk_rows):
        c1 = min(c0 + chunk_rows, n_tokens)
        dl = padded_matrix(dl_buf, c1 - c0, n_vocab)
        for n0 in range(c0, c1, slice_rows):  # the log-probs, head and dl of one product slice
            n1 = min(n0 + slice_rows, c1)
            h_s, t_s = h_k[n0:n1], targets[n0:n1]
            prod = mm_fp32(h_s, w_k.t(), out=padded_matrix(product, n1 - n0, n_vocab))
            lse, target_logit, ent = forward_from_product(h_s, w_k, b_k, t_s, prod, cfg, vocab_start=0,
                                                             with_entropy=with_entropy, **launch)
            logp_s, ent_s = finish_logprobs(lse, target_logit, ent, t_s, ignore_index)
            logp[n0:n1] = logp_s
            if with_entropy:
                entropy[n0:n1] = ent_s
            loss_s, dloss_dlogp, stats_s = rlplus_head_forward(
                logp_s, entropy[n0:n1] if entropy_term else None, advantages[n0:n1],
                *(per_token(x, n0, n1) for x in (old_logprobs, external, behavior_logprobs, ref_logprobs)),
                agg_weight[n0:n1], coefs)
            weighted_loss[n0:n1], stats[:, n0:n1] = loss_s, stats_s
            if need_any:
                # the float32 coefficient the head kernel read (the two-pass head's backward takes the same)
                grad_entropy = agg_weight[n0:n1] * -coefs[1] if entropy_term else None
                launch_dlogits(h_s, w_k, b_k, t_s, lse, ent if grad_entropy is not None else lse, dloss_dlogp,
                               grad_entropy, dl[n0 - c0:n1 - c0], prod, cfg, col_start=0, **launch)
        if need_h:
            torch.mm(dl, weight, out=gh[c0:c1])
        if need_w:  # the first chunk writes, the others add in place (cuBLAS beta = 1, no copy of gw)
            if c0 == 0:
                torch.mm(dl.t(), hidden[c0:c1], out=gw)
            else:
                gw.addmm_(dl.t(), hidden[c0:c1])
        if need_b:
            gb32 += dl.sum(0, dtype=torch.float32)
    return (weighted_loss.sum(), logp, entropy, stats, gh, gw, gb32.to(dtype) if gb32 is not None else None)
