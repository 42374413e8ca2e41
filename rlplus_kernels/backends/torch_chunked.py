"""backend="torch": the vocabulary-streaming op of CONTRACT.md in plain PyTorch.

Blocked algorithm (vocabulary outer, tokens inner, so that a weight chunk is upcast once and the
grad_weight accumulator is one chunk):

    for each vocabulary chunk W_c (chunk_vocab rows):
        for each token chunk h_t (chunk_tokens rows):
            z = (h_t @ W_c^T + b_c) / T                      # the only [tokens, vocab]-shaped tensor
            forward:  online max m, sum-exp s, sum exp(z - m) * (z - m), target logit
            backward: dz = g_logp * (onehot - p) + g_ent * (-p * (log p + H)),  p = exp(z - lse)
                      grad_hidden[t] += dz @ W_c ;  grad_weight[c] += dz^T @ h_t ;  grad_bias[c] += sum dz

Half-precision inputs are upcast chunk by chunk: the logits are accumulated in float32 (float64
for float64 inputs), never rounded to the input dtype.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .common import LOG_P_FLOOR, compute_dtype

DEFAULT_CHUNK_TOKENS = 2048
DEFAULT_CHUNK_VOCAB = 4096


def _chunks(total: int, size: int):
    # size is min(chunk, total): 0 for an empty batch, which has no chunk at all
    for start in range(0, total, max(size, 1)):
        yield start, min(start + size, total)


class _ChunkBuffer:
    """One [chunk_tokens, chunk_vocab] scratch tensor reused by every chunk.

    A fresh chunk-sized allocation per chunk costs page faults on the CPU that add up to more than
    the elementwise work itself; edge chunks take a contiguous prefix of the same storage.
    """

    def __init__(self, rows, cols, like, dtype):
        self.storage = like.new_empty(rows * cols, dtype=dtype)

    def take(self, rows, cols):
        return self.storage[: rows * cols].view(rows, cols)


def _logits_chunk(out, hidden_c, weight_c, bias_c, temperature):
    """out = (hidden_c @ weight_c^T + bias_c) / temperature, written into `out`."""
    z = torch.mm(hidden_c, weight_c.T, out=out)
    if bias_c is not None:
        z += bias_c
    if temperature != 1.0:
        z /= temperature
    return z


def _target_columns(local_targets, in_shard, v0, v1):
    """(column of each row's target inside the vocabulary chunk [v0, v1), whether it is there)."""
    hit = in_shard & (local_targets >= v0) & (local_targets < v1)
    return (local_targets - v0).clamp(0, v1 - v0 - 1), hit


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int,
    vocab_start: int = 0,
    with_entropy: bool,
    chunk_tokens: Optional[int] = None,
    chunk_vocab: Optional[int] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(lse, target_logit, entropy | None) over this weight shard, as in CONTRACT.md."""
    dtype = compute_dtype(hidden.dtype)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    chunk_tokens = min(chunk_tokens or DEFAULT_CHUNK_TOKENS, n_tokens)
    chunk_vocab = min(chunk_vocab or DEFAULT_CHUNK_VOCAB, vocab)
    local_targets = targets - vocab_start  # ignored rows fall outside [0, V) unless ignore_index does not
    in_shard = (targets != ignore_index) & (local_targets >= 0) & (local_targets < vocab)

    running_max = hidden.new_full((n_tokens,), float("-inf"), dtype=dtype)
    sum_exp = hidden.new_zeros(n_tokens, dtype=dtype)
    # sum_v exp(z_v - running_max) * (z_v - running_max), moved along whenever the running max moves
    sum_exp_shifted = hidden.new_zeros(n_tokens, dtype=dtype) if with_entropy else None
    target_logit = hidden.new_zeros(n_tokens, dtype=dtype)
    logits_buffer = _ChunkBuffer(chunk_tokens, chunk_vocab, hidden, dtype)
    exp_buffer = _ChunkBuffer(chunk_tokens, chunk_vocab, hidden, dtype) if with_entropy else None

    for v0, v1 in _chunks(vocab, chunk_vocab):
        weight_c = weight[v0:v1].to(dtype)
        bias_c = None if bias is None else bias[v0:v1].to(dtype)
        for t0, t1 in _chunks(n_tokens, chunk_tokens):
            z = _logits_chunk(logits_buffer.take(t1 - t0, v1 - v0), hidden[t0:t1].to(dtype), weight_c, bias_c,
                              temperature)
            column, hit = _target_columns(local_targets[t0:t1], in_shard[t0:t1], v0, v1)
            picked = z.gather(1, column[:, None]).squeeze(1)
            target_logit[t0:t1] += torch.where(hit, picked, torch.zeros_like(picked))

            old_max = running_max[t0:t1]
            new_max = torch.maximum(old_max, z.amax(dim=1))
            # shifts from a finite max (-inf while every logit so far is -inf: a vocabulary masked by
            # its bias), floored where their exp is 0 anyway, so that no 0 * inf appears (as in the kernel)
            reference_max = torch.where(new_max == float("-inf"), 0.0, new_max)
            shift = (old_max - reference_max).clamp_(min=LOG_P_FLOOR)
            rescale = torch.exp(shift)
            z_shifted = z.sub_(reference_max[:, None]).clamp_(min=LOG_P_FLOOR)
            if with_entropy:
                exp_z = torch.exp(z_shifted, out=exp_buffer.take(t1 - t0, v1 - v0))
                chunk_sum = exp_z.sum(dim=1)
                shifted_dot = torch.linalg.vecdot(exp_z, z_shifted)
                previous = sum_exp_shifted[t0:t1] + sum_exp[t0:t1] * shift  # relative to the new max
                sum_exp_shifted[t0:t1] = previous * rescale + shifted_dot
            else:
                chunk_sum = z_shifted.exp_().sum(dim=1)
            sum_exp[t0:t1] = sum_exp[t0:t1] * rescale + chunk_sum
            running_max[t0:t1] = new_max

    lse = running_max + torch.log(sum_exp)
    # log s - sum_exp_shifted / s: two terms >= 0, where lse - sum p*z would cancel to ulp(lse) at large logits.
    # A shard whose every logit is -inf (vocabulary parallelism, masked by its bias): lse -inf, entropy 0.
    entropy = (torch.where(sum_exp == 0, 0.0, torch.log(sum_exp) - sum_exp_shifted / sum_exp)
               if with_entropy else None)
    return lse, target_logit, entropy


def backward(
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
    needs_grad: Tuple[bool, bool, bool],
    chunk_tokens: Optional[int] = None,
    chunk_vocab: Optional[int] = None,
):
    """(grad_hidden, grad_weight, grad_bias), None where not needed, as in CONTRACT.md."""
    need_hidden, need_weight, need_bias = needs_grad
    need_bias = need_bias and bias is not None
    if not (need_hidden or need_weight or need_bias) or (grad_logp is None and grad_entropy is None):
        return None, None, None
    dtype = compute_dtype(hidden.dtype)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    chunk_tokens = min(chunk_tokens or DEFAULT_CHUNK_TOKENS, n_tokens)
    chunk_vocab = min(chunk_vocab or DEFAULT_CHUNK_VOCAB, vocab)
    active = targets != ignore_index

    # Fold 1/temperature and the ignored rows into the upstream gradients once, not per chunk.
    def prepared(grad):
        if grad is None:
            return None
        return torch.where(active, grad.to(dtype), torch.zeros((), dtype=dtype, device=grad.device)) / temperature

    g_logp = prepared(grad_logp)
    g_ent = prepared(grad_entropy)
    neg_g_logp = None if g_logp is None else -g_logp
    local_targets = targets - vocab_start
    in_shard = active & (local_targets >= 0) & (local_targets < vocab)
    neg_lse = -lse.to(dtype)
    entropy = None if g_ent is None else entropy.to(dtype)

    grad_hidden = hidden.new_zeros(hidden.shape, dtype=dtype) if need_hidden else None
    grad_weight = weight.new_empty(weight.shape) if need_weight else None  # row-major, as the op's fake says
    grad_bias = bias.new_empty(bias.shape) if need_bias else None
    logits_buffer = _ChunkBuffer(chunk_tokens, chunk_vocab, hidden, dtype)
    prob_buffer = _ChunkBuffer(chunk_tokens, chunk_vocab, hidden, dtype) if g_ent is not None else None

    for v0, v1 in _chunks(vocab, chunk_vocab):
        weight_c = weight[v0:v1].to(dtype)
        bias_c = None if bias is None else bias[v0:v1].to(dtype)
        grad_weight_c = hidden.new_zeros((v1 - v0, hidden.shape[1]), dtype=dtype) if need_weight else None
        grad_bias_c = hidden.new_zeros(v1 - v0, dtype=dtype) if need_bias else None
        for t0, t1 in _chunks(n_tokens, chunk_tokens):
            hidden_c = hidden[t0:t1].to(dtype)
            log_p = _logits_chunk(logits_buffer.take(t1 - t0, v1 - v0), hidden_c, weight_c, bias_c, temperature)
            log_p.add_(neg_lse[t0:t1, None]).clamp_(min=LOG_P_FLOOR)  # p * log p: 0, not NaN, at a -inf logit
            if g_ent is None:
                dz = log_p.exp_().mul_(neg_g_logp[t0:t1, None])  # -g_logp * p, in place
            else:
                p = torch.exp(log_p, out=prob_buffer.take(t1 - t0, v1 - v0))
                # dz = -(p (log p + H) g_ent + p g_logp), computed in log_p's storage; p first, as the Triton
                # kernel does: a huge g_ent times the floored log p would overflow where p is 0 (inf * 0 = NaN)
                dz = log_p.add_(entropy[t0:t1, None]).mul_(p).mul_(g_ent[t0:t1, None])
                if g_logp is not None:
                    dz.addcmul_(p, g_logp[t0:t1, None])
                dz.neg_()
            if g_logp is not None:
                column, hit = _target_columns(local_targets[t0:t1], in_shard[t0:t1], v0, v1)
                onehot_grad = torch.where(hit, g_logp[t0:t1], torch.zeros_like(g_logp[t0:t1]))
                dz.scatter_add_(1, column[:, None], onehot_grad[:, None])
            if need_hidden:
                grad_hidden[t0:t1].addmm_(dz, weight_c)
            if need_weight:
                grad_weight_c.addmm_(dz.T, hidden_c)
            if need_bias:
                grad_bias_c += dz.sum(dim=0)
        if need_weight:
            grad_weight[v0:v1] = grad_weight_c
        if need_bias:
            grad_bias[v0:v1] = grad_bias_c

    if need_hidden:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight, grad_bias
