"""Pack RL-PLUS groups (k rollouts + external demonstrations per prompt) into one padded batch."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch

__all__ = ["GroupBatch", "build_group_batch"]

TokenSeq = Sequence[int]


@dataclass
class GroupBatch:
    """One padded batch of ``S`` sequences; every tensor is ``[S, T]`` or ``[S]``.

    ``loss_mask`` is true on completion tokens (never on prompt tokens or padding);
    ``external_mask`` marks the rows that are external demonstrations; ``advantages`` are
    per sequence (``group_advantages`` of ``rewards`` over ``group_ids``).
    """

    input_ids: torch.Tensor        # [S, T] long
    attention_mask: torch.Tensor   # [S, T] long
    loss_mask: torch.Tensor        # [S, T] bool
    external_mask: torch.Tensor    # [S] bool
    group_ids: torch.Tensor        # [S] long, index of the prompt
    rewards: torch.Tensor          # [S] float32
    advantages: torch.Tensor       # [S] float32

    def to(self, device) -> "GroupBatch":
        return GroupBatch(**{k: v.to(device) for k, v in asdict(self).items()})

    def model_inputs(self) -> dict:
        """The keyword arguments of :func:`rlplus_model_loss` (and ``RLPlusTrainer.step``)."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask,
                "loss_mask": self.loss_mask, "advantages": self.advantages,
                "external_mask": self.external_mask}


def _token_ids(name: str, seq) -> list[int]:
    """One sequence of token ids as a list of ints (a list, tuple, array or 1-D integer tensor)."""
    if isinstance(seq, torch.Tensor):
        if seq.dim() != 1 or seq.dtype.is_floating_point or seq.dtype.is_complex or seq.dtype == torch.bool:
            raise TypeError(f"{name} must be a 1-D integer tensor of token ids, got {seq.dtype} of shape "
                            f"{tuple(seq.shape)}")
    elif isinstance(seq, (str, bytes)) or not isinstance(seq, Iterable):
        raise TypeError(f"{name} must be a sequence of token ids, got {type(seq).__name__}")
    ids = seq.tolist() if isinstance(seq, torch.Tensor) else list(seq)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise TypeError(f"{name} must hold integer token ids, got {token!r}")
        if token < 0:
            raise ValueError(f"{name} must hold token ids >= 0, got {token}")
    return [int(token) for token in ids]


def _per_prompt(name: str, values, g: int) -> list:
    """``values[g]``, the list of one prompt's completions or rewards."""
    entry = values[g]
    if isinstance(entry, torch.Tensor):
        entry = entry.tolist()
    if isinstance(entry, (str, bytes)) or not isinstance(entry, Iterable):
        raise TypeError(f"{name}[{g}] must be a list, one entry per completion of prompt {g}, "
                        f"got {type(entry).__name__}")
    return list(entry)


def build_group_batch(prompts: Sequence[TokenSeq], completions: Sequence[Sequence[TokenSeq]],
                      rewards: Sequence[Sequence[float]] | torch.Tensor, *,
                      external_completions: Sequence[Sequence[TokenSeq]] | None = None,
                      external_rewards: Sequence[Sequence[float]] | None = None,
                      pad_token_id: int = 0, padding_side: str = "right",
                      normalize_std: bool = False, device=None) -> GroupBatch:
    """Pack, per prompt, its on-policy rollouts and external demonstrations into one batch.

    Args:
        prompts: ``P`` prompts, token ids.
        completions: per prompt, its ``k`` on-policy rollouts (completion token ids only,
            without the prompt; include the EOS token if it should be trained on).
        rewards: per prompt, the ``k`` rollout rewards (``[P][k]`` or a ``[P, k]`` tensor).
        external_completions: per prompt, its external demonstration(s) (completion ids).
        external_rewards: their rewards; default 1.0 (demonstrations from a solver are correct).
        padding_side: ``"right"`` (default) or ``"left"``; position ids follow the mask either way.
        normalize_std: divide advantages by the group std (GRPO); the official RL-PLUS recipe
            only subtracts the group mean (False).

    The advantage of every member of a group, demonstrations included, is its reward minus the
    group's mean reward (SPEC: external demonstrations are members of their prompt's group).
    Rows are ordered prompt by prompt: the rollouts, then the demonstrations.
    """
    from rlplus_kernels import group_advantages

    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral) or pad_token_id < 0:
        raise TypeError(f"pad_token_id must be a token id (an int >= 0), got {pad_token_id!r}")
    num_prompts = len(prompts)
    if len(completions) != num_prompts:
        raise ValueError(f"completions must hold one list per prompt ({num_prompts}), got {len(completions)}")
    if isinstance(rewards, torch.Tensor):
        rewards = rewards.tolist()
    if len(rewards) != num_prompts:
        raise ValueError(f"rewards must hold one list per prompt ({num_prompts}), got {len(rewards)}")
    if external_completions is not None and len(external_completions) != num_prompts:
        raise ValueError(f"external_completions must hold one list per prompt ({num_prompts}), "
                         f"got {len(external_completions)}")
    if external_rewards is not None and external_completions is None:
        raise ValueError("external_rewards given without external_completions")
    if external_rewards is not None and len(external_rewards) != num_prompts:
        raise ValueError(f"external_rewards must hold one list per prompt ({num_prompts}), got {len(external_rewards)}")

    rows: list[tuple[list[int], list[int], bool, int, float]] = []
    for g, prompt in enumerate(prompts):
        prompt = _token_ids(f"prompts[{g}]", prompt)
        comps, comp_r = _per_prompt("completions", completions, g), _per_prompt("rewards", rewards, g)
        if len(comps) != len(comp_r):
            raise ValueError(f"prompt {g}: {len(comps)} completions but {len(comp_r)} rewards")
        for i, (comp, r) in enumerate(zip(comps, comp_r)):
            rows.append((prompt, _token_ids(f"completions[{g}][{i}]", comp), False, g, float(r)))
        if external_completions is not None:
            ext = _per_prompt("external_completions", external_completions, g)
            ext_r = ([1.0] * len(ext) if external_rewards is None
                     else _per_prompt("external_rewards", external_rewards, g))
            if len(ext_r) != len(ext):
                raise ValueError(f"prompt {g}: {len(ext)} external completions but {len(ext_r)} rewards")
            for i, (comp, r) in enumerate(zip(ext, ext_r)):
                rows.append((prompt, _token_ids(f"external_completions[{g}][{i}]", comp), True, g, float(r)))
    if not rows:
        raise ValueError("build_group_batch: no sequences")

    seq_len = max(len(p) + len(c) for p, c, *_ in rows)
    num = len(rows)
    input_ids = torch.full((num, seq_len), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((num, seq_len), dtype=torch.long)
    loss_mask = torch.zeros((num, seq_len), dtype=torch.bool)
    for i, (prompt, comp, *_rest) in enumerate(rows):
        n = len(prompt) + len(comp)
        start = 0 if padding_side == "right" else seq_len - n
        input_ids[i, start:start + n] = torch.tensor(prompt + comp, dtype=torch.long)
        attention_mask[i, start:start + n] = 1
        loss_mask[i, start + len(prompt):start + n] = True
    external_mask = torch.tensor([r[2] for r in rows], dtype=torch.bool)
    group_ids = torch.tensor([r[3] for r in rows], dtype=torch.long)
    reward_t = torch.tensor([r[4] for r in rows], dtype=torch.float32)
    advantages = group_advantages(reward_t, group_ids, normalize_std=normalize_std).to(torch.float32)
    batch = GroupBatch(input_ids, attention_mask, loss_mask, external_mask, group_ids, reward_t, advantages)
    return batch.to(device) if device is not None else batch
