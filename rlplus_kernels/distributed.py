"""The loss beyond one device: a vocabulary-parallel LM head, and normalizers for data parallelism.

Vocabulary (tensor) parallelism: rank r of `group` (P ranks) holds the V_r rows
[V_0 + ... + V_{r-1}, V_0 + ... + V_r) of the LM head, V = V_0 + ... + V_{P-1}: Megatron's equal
shards, or the uneven ones of `torch.chunk` and DTensor's `Shard(0)`. `hidden`, the global `targets`
and every per-token tensor are the same on all ranks. Each rank runs its backend's raw forward on its
shard (CONTRACT.md, `vocab_start` = its first row's global id) and merges the per-token partials exactly:

    M       = max_r lse_r                                      all_reduce(MAX),  [N]
    S       = sum_r exp(lse_r - M)                             \\
    y       = sum_r target_logit_r  (one rank owns y_t)         > one all_reduce(SUM) of a [3, N] stack
    U       = sum_r exp(lse_r - M) * (H_r + M - lse_r)         /  ([2, N] without entropy)
    lse     = M + log S
    entropy = U / S + log S         (H_r: shard r's entropy; every term >= 0, so nothing cancels, and
                                     only each float32 lse_r's rounding, weighted by its shard's mass, remains)

`backends.autograd.LinearLogprobsFunction` does this around any backend's raw pair. The backward
runs the raw backward on the shard with the GLOBAL lse and entropy, which yields this
shard's grad_weight / grad_bias exactly and its share of grad_hidden; one all_reduce(SUM) of
grad_hidden ([N, D]) completes it. No tensor of vocabulary size is communicated.

Data parallelism and gradient accumulation need no new op, only the right `normalizer`: the
global count of valid tokens (or sequences, for the seq modes) over all ranks and micro-batches of
the optimiser step, so that the sum of the per-rank, per-micro-batch losses is the big batch's loss.
`global_normalizer` computes it with one all_reduce.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import torch
import torch.distributed as dist

from ._environment import graph_capturing
from .backends.common import device_scalars
from .config import LOSS_AGG_MODES, SEQ_AGG_MODES
from .head import segment_sum, sequence_layout
from .validation import check_cu_seqlens, refuse_if

MaskOrMasks = Union[torch.Tensor, Sequence[torch.Tensor]]


def _require_initialised(argument: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"{argument} was given but torch.distributed is not initialised: "
                         "call torch.distributed.init_process_group first")


class VocabShard(NamedTuple):
    """This rank's part of a vocabulary-parallel LM head."""
    group: Any  # the torch.distributed process group of the vocabulary split
    start: int  # global id of the shard's first row (CONTRACT.md's vocab_start)
    vocab_size: int  # V, all shards together


# What the ranks of a vocabulary-parallel call exchange besides their shard sizes: whether a rank refused its
# inputs, and the layout that every rank must share (a rank that differed would wait in a later collective
# of another size or dtype, for ever), with a fingerprint of the targets (different targets would give a
# wrong loss, or a range error on one rank only), and the hyper-parameters (with another temperature a rank's
# shard would enter the log-sum-exp scaled otherwise; with another head, say a KL coefficient that a
# controller set from this rank's own statistics, its part of grad_hidden would be of another loss)
FLOAT_FIELDS = ("temperature", "kl_coef", "entropy_coef", "clip_eps_low", "clip_eps_high", "dual_clip", "gamma",
                "mis_clip_max")  # compared bit for bit, None as inf (which no hyper-parameter may be)
LAYOUT_FIELDS = ("hidden rows (N)", "hidden size (D)", "dtype", "with_entropy", "whether hidden needs a gradient",
                 "ignore_index", "loss_agg", "targets' sum", "targets' sum of squares", *FLOAT_FIELDS)
_LAYOUT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def vocab_layout(hidden: torch.Tensor, targets: torch.Tensor, config) -> torch.Tensor:
    """This rank's values of LAYOUT_FIELDS (`config`: its RLPlusConfig): int64 [len(LAYOUT_FIELDS)] on targets'
    device, no host sync; the floats as their float64 bits (`backends.common.device_scalars`). The first step of a
    vocabulary-parallel call, which a CUDA graph cannot capture: the exchange reads every rank's shard size."""
    if graph_capturing(targets.device):
        raise ValueError("vocab_parallel_group: the ranks' exchange of shard sizes reads them on the host, which "
                         "cannot happen while a CUDA graph is captured; run vocabulary-parallel calls outside "
                         "the graph")
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    shape = torch.tensor([hidden.numel() // hidden.shape[-1], hidden.shape[-1], _LAYOUT_DTYPES.index(hidden.dtype),
                          int(config.with_entropy), int(needs_grad), config.ignore_index,
                          LOSS_AGG_MODES.index(config.loss_agg)], dtype=torch.int64, device=targets.device)
    floats = device_scalars(targets, [math.inf if getattr(config, name) is None else getattr(config, name)
                                      for name in FLOAT_FIELDS], torch.float64).view(torch.int64)
    return torch.cat([shape, targets.sum().reshape(1), (targets * targets).sum().reshape(1), floats])


def _exchange(group, shard_rows: int, refused: bool, layout: torch.Tensor) -> torch.Tensor:
    """[P, 2 + len(LAYOUT_FIELDS)] int64 of every rank's (shard rows, refused, layout): one all_reduce."""
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("vocab_parallel_group does not contain this process")
    # In eager, on a device the group's backend takes (NCCL: CUDA tensors only) whatever the inputs' device,
    # which a refusing rank may have wrong: every rank runs this all_reduce on the same kind of device. A
    # compiled call (no refusal is exchanged there) takes the layout's: torch 2.6's dynamo cannot trace
    # dist.get_backend.
    if torch.compiler.is_compiling():
        device = layout.device
    else:
        nccl = "nccl" in str(dist.get_backend(group))
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    table = torch.zeros(dist.get_world_size(group), 2 + len(LAYOUT_FIELDS), dtype=torch.int64, device=device)
    table[rank, :2] = torch.tensor([shard_rows, int(refused)], dtype=torch.int64)
    table[rank, 2:] = layout.to(device)
    dist.all_reduce(table, op=dist.ReduceOp.SUM, group=group)
    return table


def vocab_shard(shard_rows: int, group, layout: torch.Tensor) -> VocabShard:
    """The layout of contiguous shards in rank order, of any sizes; one all_reduce of P x 19 integers, one host
    sync. It also carries each rank's `layout` (`vocab_layout`) and whether it refused its inputs
    (`checked_on_every_rank`): a refusal or a differing layout on any rank raises on every rank.

    Exchanging the sizes is what makes uneven shards right: assuming equal ones would give every rank
    after an uneven one the wrong target ids, silently.
    """
    _require_initialised("vocab_parallel_group")
    table = _exchange(group, shard_rows, False, layout)
    rule = "vocab_parallel_group: a rank refused its inputs (its own error says why)"
    refuse_if((table[:, 1] != 0).any(), rule,
              lambda: f"{rule}: rank(s) {table[:, 1].nonzero().flatten().tolist()}; every rank raises, where the "
                      "others would wait for it")
    differs = (table[:, 2:] != table[0, 2:]).any(0)
    rule = f"vocab_parallel_group: every rank must pass the same {', '.join(LAYOUT_FIELDS)}"

    def differences() -> str:
        def values(i: int) -> list:
            column, field = table[:, 2 + i], LAYOUT_FIELDS[i]
            if field == "dtype":
                return [_LAYOUT_DTYPES[v] for v in column.tolist()]
            if field == "loss_agg":
                return [LOSS_AGG_MODES[v] for v in column.tolist()]
            if field in FLOAT_FIELDS:
                return [None if v == math.inf else v for v in column.cpu().view(torch.float64).tolist()]
            return column.tolist()
        return "; ".join(f"{LAYOUT_FIELDS[i]} per rank: {values(i)}" for i in differs.nonzero().flatten().tolist())

    refuse_if(differs.any(), rule, lambda: f"{rule}, got {differences()}")
    sizes = table[:, 0].tolist()  # each at least 1: a rank without rows refused its weight
    rank = dist.get_rank(group)
    return VocabShard(group=group, start=sum(sizes[:rank]), vocab_size=sum(sizes))


def checked_on_every_rank(group, checks, *args, **kwargs):
    """`checks(*args, **kwargs)`: one rank's checks of its inputs to a vocabulary-parallel call (`group`; None:
    a single shard). A refusal (an Exception) takes part, flagged, in the exchange that `vocab_shard` makes,
    before it is raised: the other ranks then raise too, where they would wait for this one in that exchange.

    A plain call, not a context manager: torch 2.6's dynamo cannot trace a contextlib one. Eager only: inside
    torch.compile a refusal raises while the graph is traced, so nothing can be exchanged, and while a CUDA graph is
    captured the exchange cannot run (every rank then refuses the call, `vocab_layout`).
    """
    if (group is None or torch.compiler.is_compiling()
            or (torch.cuda.is_available() and graph_capturing(torch.device("cuda")))):
        return checks(*args, **kwargs)
    try:
        return checks(*args, **kwargs)
    except Exception as error:
        if dist.is_available() and dist.is_initialized():
            try:
                _exchange(group, 0, True, torch.zeros(len(LAYOUT_FIELDS), dtype=torch.int64))
            except Exception as failure:  # this rank's refusal stays the error raised; the failure is noted
                if hasattr(error, "add_note"):  # Python >= 3.11
                    error.add_note(f"vocab_parallel_group: the other ranks could not be told ({failure!r}); "
                                   "they may wait for this one in a collective")
        raise


def merge_vocab_partials(lse: torch.Tensor, target_logit: torch.Tensor, entropy: Optional[torch.Tensor], group):
    """The global (lse, target_logit, entropy | None) from this rank's shard partials; 2 all-reduces."""
    global_max = lse.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    # This shard's sum-exp relative to the global max: in (0, 1], 1 on the shard that holds the max.
    shard_sum_exp = torch.exp(lse - global_max)
    parts = [shard_sum_exp, target_logit]
    if entropy is not None:  # a shard without mass (every logit -inf) adds nothing, whatever its entropy
        weighted = shard_sum_exp * (entropy + (global_max - lse))
        parts.append(torch.where(shard_sum_exp == 0, 0.0, weighted))  # a NaN stays NaN
    stacked = torch.stack(parts)
    dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=group)
    log_sum_exp = torch.log(stacked[0])
    merged_entropy = None if entropy is None else stacked[2] / stacked[0] + log_sum_exp
    return global_max + log_sum_exp, stacked[1], merged_entropy


# ------------------------------------------------------------------------------------ data parallel
def _as_list(x) -> list:
    return [x] if isinstance(x, torch.Tensor) or x is None else list(x)


def _masks(valid) -> list:
    """`valid` as a non-empty list of tensors (one per micro-batch)."""
    masks = _as_list(valid) if isinstance(valid, (torch.Tensor, list, tuple)) else []
    if not masks or not all(isinstance(m, torch.Tensor) for m in masks):
        raise ValueError("valid must be a mask tensor or a non-empty list of them, one per micro-batch")
    return masks


def _all_reduce_count(count: torch.Tensor, group) -> torch.Tensor:
    """Sum of `count` over `group`; over nothing when torch.distributed is not initialised and no group is given."""
    if group is not None:
        _require_initialised("group")
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count


def global_token_count(valid: MaskOrMasks, group=None) -> torch.Tensor:
    """Number of valid tokens over all ranks of `group` and all micro-batches given; 0-dim int64, one all_reduce.

    `valid` is the mask of tokens that enter the loss (`loss_mask & (targets != ignore_index)`), or a list
    of them, one per micro-batch of the optimiser step. `group` is the data-parallel group (default: the
    default process group when torch.distributed is initialised, else no communication). Pass the result
    as `normalizer` with `loss_agg="token-mean"`.
    """
    masks = _masks(valid)
    count = sum((m != 0).sum() for m in masks).to(torch.int64)
    return _all_reduce_count(count.reshape(()), group)


def global_sequence_count(valid: MaskOrMasks, *, cu_seqlens=None, nonempty_only: bool = True,
                          group=None) -> torch.Tensor:
    """Number of sequences over all ranks of `group` and all micro-batches given; 0-dim int64, one all_reduce.

    `valid` as in `global_token_count`, `[B, T]` (or packed `[N]` with `cu_seqlens`), or lists of them.
    `nonempty_only` counts only the sequences with a valid token (the count of `seq-mean-token-mean`);
    otherwise all of them (`seq-mean-token-sum`).
    """
    masks, cus = _masks(valid), _as_list(cu_seqlens)
    if len(cus) == 1 and len(masks) > 1:
        cus = cus * len(masks)
    if len(cus) != len(masks):
        raise ValueError(f"cu_seqlens must be None or give one tensor per mask, got {len(cus)} for {len(masks)}")
    count = torch.zeros((), dtype=torch.int64, device=masks[0].device)
    for mask, cu in zip(masks, cus):
        check_cu_seqlens(cu, mask, "valid")
        sequence_ids, num_sequences = sequence_layout(mask, cu)
        if sequence_ids is None:
            raise ValueError(f"valid must be [B, T] (or [N] with cu_seqlens), got shape {tuple(mask.shape)}")
        if nonempty_only:
            per_sequence = segment_sum((mask != 0).reshape(-1).to(torch.int64), sequence_ids, num_sequences)
            count = count + (per_sequence > 0).sum()
        else:
            count = count + num_sequences
    return _all_reduce_count(count, group)


def global_normalizer(loss_agg: str, valid: MaskOrMasks, *, cu_seqlens=None, group=None) -> torch.Tensor:
    """The `normalizer` that makes per-rank / per-micro-batch losses add up to the big batch's loss.

    token-mean: the global valid-token count; seq-mean-token-mean: the global count of sequences with a
    valid token; seq-mean-token-sum: the global sequence count. (`sum` divides by a constant already.)
    Under DDP/FSDP/DeepSpeed, which average gradients over ranks, see docs/distributed.md.
    """
    if loss_agg == "token-mean":
        return global_token_count(valid, group)
    if loss_agg in SEQ_AGG_MODES:
        return global_sequence_count(valid, cu_seqlens=cu_seqlens, group=group,
                                     nonempty_only=loss_agg == "seq-mean-token-mean")
    if loss_agg == "sum":
        raise ValueError("loss_agg='sum' has no global count: it divides by a constant normalizer (or none), which "
                         "is the same on every rank and needs no communication")
    raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {loss_agg!r}")
