"""A minimal RL-PLUS training step for a Hugging Face causal LM."""

from __future__ import annotations

import math
import numbers
import time
from typing import Any, Mapping

import torch
from torch import nn

from .batch import GroupBatch
from .loss import check_hyper_parameters, check_model_inputs, loss_of_checked_batch, target_mask
from .model_head import check_plain_linear_head, disable_dropout as _disable_dropout, verify_head

__all__ = ["RLPlusTrainer"]

_BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask", "advantages", "old_logprobs",
               "external_mask", "behavior_logprobs", "ref_logprobs", "position_ids")
# also taken by step: rewards (reported), group_ids (a GroupBatch field, as in dataclasses.asdict(batch))
_REPORTED_KEYS = ("rewards", "group_ids")
# metric -> which token count weighs it when micro-batch means are combined
_ON_POLICY_METRICS = ("clip_frac", "ratio_mean")
_EXTERNAL_METRICS = ("mis_ratio_mean", "explore_coef_mean")
_COUNT_METRICS = ("num_tokens", "num_external_tokens")


def _positive_number(x) -> bool:
    """A number (a Python, numpy or 0-dim torch one; not a bool or a string) above 0."""
    try:
        return not isinstance(x, (bool, str)) and float(x) > 0
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of more than one element
        return False


def _metric_weight(key: str, metrics: Mapping[str, torch.Tensor]):
    """Which token count weighs a micro-batch's metric when the means are combined."""
    if key in _COUNT_METRICS:
        return 1.0
    n_tok = metrics["num_tokens"].double()
    n_ext = metrics["num_external_tokens"].double()
    return n_tok - n_ext if key in _ON_POLICY_METRICS else n_ext if key in _EXTERNAL_METRICS else n_tok


def _official_recipe() -> dict:
    from rlplus_kernels import OFFICIAL_RECIPE
    return dict(OFFICIAL_RECIPE)


class RLPlusTrainer:
    """Holds a model, its optimizer and the RL-PLUS hyper-parameters; ``step(batch)`` trains.

    Args:
        model: a ``transformers`` causal LM with a plain linear LM head (checked once,
            numerically, unless ``verify_model_head=False``).
        optimizer: any ``torch.optim`` optimizer over the model's parameters.
        max_grad_norm: clip the global gradient norm to this (None: no clipping, the norm is
            still reported).
        micro_batch_size: sequences per forward/backward (gradient accumulation); None: the
            whole batch at once. The objective does not depend on it: the aggregation's
            normalizer is computed over the whole batch (see :meth:`global_normalizer`).
        preset: the base hyper-parameters, ``rlplus_kernels.OFFICIAL_RECIPE`` by default; pass
            ``{}`` for ``rlplus_loss``'s own defaults.
        lr_scheduler: stepped after every optimizer step when given.
        disable_dropout: set the model's dropout probabilities to 0 (default), so that the
            training forward computes the policy that :func:`score_logprobs` scores (in eval mode)
            and the importance ratio is 1 at unchanged parameters; with dropout it is noisy.
        skip_nonfinite_steps: when the loss or the gradient norm is NaN or infinite (a NaN advantage,
            log-prob or activation), leave the parameters, the optimizer and the scheduler as they are
            and report ``skipped_step = 1`` (default); False applies the step, NaN and all.
        **hyper: override entries of the preset (temperature, clip bounds, gamma, loss_agg,
            normalizer, entropy_coef, kl_coef, backend, ...).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                 max_grad_norm: float | None = 1.0, micro_batch_size: int | None = None,
                 preset: Mapping[str, Any] | None = None, lr_scheduler=None,
                 verify_model_head: bool = True, disable_dropout: bool = True, skip_nonfinite_steps: bool = True,
                 **hyper: Any):
        if micro_batch_size is not None and (isinstance(micro_batch_size, bool) or not isinstance(
                micro_batch_size, numbers.Integral) or micro_batch_size < 1):
            raise ValueError(f"micro_batch_size must be a positive int or None, got {micro_batch_size!r}")
        for name, flag in (("verify_model_head", verify_model_head), ("disable_dropout", disable_dropout),
                           ("skip_nonfinite_steps", skip_nonfinite_steps)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        if max_grad_norm is not None and not _positive_number(max_grad_norm):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        self.model = model
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm
        self.micro_batch_size = micro_batch_size
        self.lr_scheduler = lr_scheduler
        self.skip_nonfinite_steps = skip_nonfinite_steps
        self.hyper = dict(_official_recipe() if preset is None else preset)
        self.hyper.update(hyper)
        # single-process: no vocab_parallel_group (its skip decision and normalizer are this process's own)
        check_hyper_parameters(self.hyper, caller="RLPlusTrainer", passed_on=("normalizer",))
        check_plain_linear_head(model)  # a refused model (or a wrapper) is refused before anything of it changes
        if disable_dropout:
            _disable_dropout(model)
        if verify_model_head:
            verify_head(model)
        self.num_steps = 0
        self.num_skipped_steps = 0

    # -- objective -----------------------------------------------------------------------
    def global_normalizer(self, batch: Mapping[str, torch.Tensor]):
        """The normalizer that makes a sum of micro-batch losses equal the full-batch loss.

        ``token-mean``: number of target tokens in the whole batch; ``seq-mean-token-mean``:
        number of sequences with a target token; ``seq-mean-token-sum``: number of sequences;
        ``sum``: the configured one (or None). A normalizer set in ``hyper`` is kept.
        """
        if self.hyper.get("normalizer") is not None:
            return self.hyper["normalizer"]
        agg = self.hyper.get("loss_agg", "token-mean")
        if agg == "sum":
            return None
        valid = target_mask(batch["input_ids"], batch.get("attention_mask"), batch.get("loss_mask"))
        if agg == "token-mean":
            count = valid.sum()
        elif agg == "seq-mean-token-mean":
            count = valid.any(-1).sum()
        else:
            count = torch.tensor(valid.shape[0], device=valid.device)
        # an empty batch has loss 0 whatever the normalizer; keep it positive
        return count.clamp(min=1).to(torch.float32)

    def _micro_batches(self, batch: Mapping[str, torch.Tensor]):
        size = batch["input_ids"].shape[0]
        step = size if self.micro_batch_size is None else self.micro_batch_size
        for start in range(0, size, step):
            yield {k: (v[start:start + step] if isinstance(v, torch.Tensor) else v)
                   for k, v in batch.items()}

    # -- training step ---------------------------------------------------------------------
    def step(self, batch: GroupBatch | Mapping[str, Any]) -> dict[str, float]:
        """Loss, backward (accumulated over micro-batches), gradient clipping, optimizer step.

        ``batch`` is a :class:`GroupBatch` or a mapping with the tensors of
        :func:`rlplus_model_loss` (``input_ids``, ``attention_mask``, ``loss_mask``,
        ``advantages`` and optionally ``old_logprobs``, ``external_mask``,
        ``behavior_logprobs``, ``ref_logprobs``, ``position_ids``), and optionally ``rewards``
        (``[B]``, whose mean over the rows without an external token is reported) and ``group_ids``; any other
        key is refused (a misspelt ``old_logprobs`` would otherwise train on-policy).

        Returns floats: ``loss``, the ``RLPlusOutput`` metrics (over the whole batch),
        ``grad_norm`` (before clipping), ``skipped_step`` (1 when a non-finite loss or gradient
        norm left the parameters unchanged), ``tokens_per_s`` (non-padding tokens through forward
        and backward per second), ``step_time_s`` and ``reward_mean`` when rewards are given.
        """
        if isinstance(batch, GroupBatch):
            rewards = batch.rewards
            batch = batch.model_inputs()
        else:
            unknown = sorted(k for k in batch if k not in _BATCH_KEYS + _REPORTED_KEYS)
            if unknown:  # a misspelt old_logprobs would otherwise train on-policy without a word
                raise ValueError(f"RLPlusTrainer.step: unknown batch key(s) {unknown}; "
                                 f"known: {list(_BATCH_KEYS + _REPORTED_KEYS)}")
            rewards = batch.get("rewards")
            batch = {k: v for k, v in batch.items() if k in _BATCH_KEYS and v is not None}
        missing = [k for k in ("input_ids", "advantages") if k not in batch]
        if missing:
            raise ValueError(f"RLPlusTrainer.step: batch lacks {missing}")
        batch.setdefault("attention_mask", None)
        batch.setdefault("loss_mask", None)
        # the whole batch, before the model's mode, its gradients or any micro-batch's backward change
        check_model_inputs(self.model, batch, self.hyper)
        num_sequences = batch["input_ids"].shape[0]
        if num_sequences == 0:
            raise ValueError("RLPlusTrainer.step: the batch has no sequences (input_ids is [0, T])")
        reward_shape = None if rewards is None else tuple(torch.as_tensor(rewards).shape)
        if reward_shape not in (None, (num_sequences,)):
            raise ValueError(f"rewards must have shape ({num_sequences},), one per sequence of input_ids, "
                             f"got {reward_shape}")

        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        hyper = dict(self.hyper)
        hyper["normalizer"] = self.global_normalizer(batch)

        loss_sum = 0.0
        sums: dict[str, torch.Tensor] = {}
        try:
            for micro in self._micro_batches(batch):
                out = loss_of_checked_batch(self.model, micro, hyper)  # micro-batches of the checked batch
                out.loss.backward()
                loss_sum = loss_sum + out.loss.detach()
                for key, value in out.metrics.items():
                    sums[key] = sums.get(key, 0.0) + _metric_weight(key, out.metrics) * value.double()
        except BaseException:  # e.g. out of memory in a late micro-batch: no gradient of part of the batch stays
            self.optimizer.zero_grad(set_to_none=True)
            raise

        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = math.inf if self.max_grad_norm is None else self.max_grad_norm
        grad_norm = (torch.nn.utils.clip_grad_norm_(params, max_norm) if params
                     else torch.zeros(()))
        # one NaN gradient would make every parameter NaN (and, through Adam's moments, keep it so)
        skipped = self.skip_nonfinite_steps and not bool(torch.isfinite(loss_sum) & torch.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self.num_skipped_steps += 1
        else:
            self.optimizer.step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
            self.num_steps += 1

        metrics: dict[str, float] = {"loss": float(loss_sum)}
        for key, value in sums.items():  # the batch's means: weighted sums over its token counts
            w = _metric_weight(key, sums)
            metrics[key] = float(value) if key in _COUNT_METRICS else float(value / w) if float(w) > 0 else 0.0
        elapsed = time.perf_counter() - start
        attn = batch["attention_mask"]
        processed = batch["input_ids"].numel() if attn is None else int(attn.sum())
        metrics["grad_norm"] = float(grad_norm)
        metrics["skipped_step"] = float(skipped)
        metrics["step_time_s"] = elapsed
        metrics["tokens_per_s"] = processed / elapsed if elapsed > 0 else float("inf")
        if rewards is not None:
            # over the on-policy rollouts: demonstrations' rewards say nothing about the policy
            rewards = torch.as_tensor(rewards, dtype=torch.float32)
            ext = batch.get("external_mask")
            if ext is not None:  # a row with any external token is a demonstration, for [B] and [B, T] masks
                rewards = rewards[~ext.bool().reshape(len(ext), -1).any(dim=1).to(rewards.device)]
            metrics["reward_mean"] = float(rewards.mean()) if rewards.numel() else 0.0
        return metrics
