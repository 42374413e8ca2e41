"""Group-relative advantages (GRPO; RL-PLUS puts each external demonstration in its prompt's group)."""

from __future__ import annotations

import torch

from .backends.common import widest_float
from .validation import check_number, plain_number, shape_text


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, normalize_std: bool = False,
                     eps: float = 1e-6) -> torch.Tensor:
    """R_i - mean of R over i's group, divided by (std of the group + eps) when `normalize_std`.

    `rewards` [S] float, `group_ids` [S] int (any labels). The std is the unbiased one, as in GRPO's
    reference code; a group of one member has advantage 0.
    """
    if not isinstance(rewards, torch.Tensor):
        raise TypeError(f"rewards must be a 1-D floating-point tensor [S], got {type(rewards).__name__}")
    if not rewards.dtype.is_floating_point or rewards.dim() != 1:
        raise TypeError(f"rewards must be a 1-D floating-point tensor [S], got {rewards.dtype} of shape "
                        f"{shape_text(rewards.shape)}")
    if (not isinstance(group_ids, torch.Tensor) or group_ids.dtype.is_floating_point or group_ids.dtype.is_complex
            or group_ids.dtype == torch.bool or group_ids.shape != rewards.shape):
        raise TypeError(f"group_ids must be an integer tensor of rewards' shape {tuple(rewards.shape)}")
    normalize_std = plain_number("normalize_std", normalize_std)  # np.bool_ from a config file
    if not isinstance(normalize_std, bool):
        raise TypeError(f"normalize_std must be True or False, got {normalize_std!r}")
    if check_number("eps", eps) < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if group_ids.device != rewards.device:
        raise ValueError(f"group_ids is on {group_ids.device} but rewards is on {rewards.device}")
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    # counts, sums and squares in float64 (float32 where the device has no float64, as MPS), returned in the
    # rewards' dtype: bfloat16 stops counting at 256, and float32 rewards of 2e19 have squares past its range
    values = rewards.to(widest_float(rewards.device))
    count = torch.zeros(num_groups, dtype=values.dtype, device=rewards.device).index_add_(
        0, group, torch.ones_like(values))
    mean = torch.zeros_like(count).index_add_(0, group, values) / count
    centred = values - mean[group]
    if normalize_std:
        sq = torch.zeros_like(count).index_add_(0, group, centred * centred)
        centred = centred / (torch.sqrt(sq / (count - 1).clamp(min=1))[group] + eps)
    # A group without spread (one member, equal rewards) has advantage 0: its mean can be off by an ulp
    # (seven rewards of 0.1), which the std would blow up to +-0.9, or 0 / 0 at eps 0. A NaN stays NaN.
    highest, lowest = (torch.zeros_like(count).scatter_reduce(0, group, values, reduce, include_self=False)
                       for reduce in ("amax", "amin"))
    no_spread = (highest == lowest)[group]
    return torch.where(no_spread, 0.0, centred).to(rewards.dtype)
