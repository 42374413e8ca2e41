"""RL-PLUS loss and rollout scoring for a Hugging Face causal LM, from hidden states.

Alignment used throughout: every per-token tensor is ``[B, T]`` and aligned with
``input_ids``; the value at ``t`` concerns the token ``input_ids[:, t]``, which the model
predicts from position ``t - 1``. Position 0 is never a target, nor is a token whose own or
whose predecessor's ``attention_mask`` is 0 (padding, on either side).

The computation is, without ever building the ``[B, T, V]`` logits::

    h      = backbone(input_ids, attention_mask, position_ids).last_hidden_state   # [B, T, D]
    W, c   = model.get_output_embeddings().weight, .bias
    rows   = target_mask(...)[:, 1:]                     # [B, T-1]: rows of h[:, :-1] that predict a target
    out    = rlplus_loss(h[:, :-1][rows], W, input_ids[:, 1:][rows], advantages at rows, ...,
                         cu_seqlens=per-sequence offsets of the rows)  # packed [n]: no prompt or padding row
    out.logprobs -> [B, T], 0 in front and at every non-target
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from ..config import RLPlusConfig
from ..validation import check_kl_inputs, check_normalizer, check_normalizer_value
from .model_head import check_plain_linear_head, eval_mode, final_hidden_states, get_lm_head

__all__ = ["rlplus_model_loss", "score_logprobs", "target_mask", "check_model_inputs"]


def _check_2d(name: str, x: torch.Tensor | None, input_ids: torch.Tensor, allow_1d: bool = False,
              floating: bool = False) -> None:
    """x is None or a tensor of input_ids' shape (or [B] with allow_1d), on input_ids' device (and
    floating point with `floating`)."""
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    shape = input_ids.shape
    if tuple(x.shape) != tuple(shape) and not (allow_1d and tuple(x.shape) == (shape[0],)):
        expected = f"{tuple(shape)}" + (f" or ({shape[0]},)" if allow_1d else "")
        raise ValueError(f"{name} must have shape {expected} (aligned with input_ids), got {tuple(x.shape)}")
    if x.device != input_ids.device:  # before it indexes or is indexed by a mask of input_ids' device
        raise ValueError(f"{name} is on {x.device} but input_ids is on {input_ids.device}")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_input_ids(input_ids) -> None:
    """An integer ``[B, T]`` tensor with ``T >= 2``; checked before the tensors aligned with it."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype not in (torch.int64, torch.int32):  # what an embedding lookup takes
        raise TypeError(f"input_ids must be an integer tensor of token ids, int64 or int32, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"input_ids needs at least 2 positions (position 0 is never a target), "
                         f"got T={input_ids.shape[1]}")


def target_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` bool: which tokens are targets (see the module docstring)."""
    check_input_ids(input_ids)
    _check_2d("attention_mask", attention_mask, input_ids)
    _check_2d("loss_mask", loss_mask, input_ids)
    attn = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.bool())
    valid = torch.zeros_like(attn)
    valid[:, 1:] = attn[:, 1:] & attn[:, :-1]
    if loss_mask is not None:
        valid &= loss_mask.bool()
    return valid


def _shift(x: torch.Tensor | None) -> torch.Tensor | None:
    """``[B, T]`` aligned with input_ids -> ``[B, T-1]`` aligned with hidden[:, :-1]; ``[B]`` kept."""
    if x is None or x.dim() == 1:
        return x
    return x[:, 1:]


def _unshift(x: torch.Tensor | None) -> torch.Tensor | None:
    if x is None:
        return None
    return torch.nn.functional.pad(x, (1, 0))


def _at_targets(x: torch.Tensor | None, target_rows: torch.Tensor) -> torch.Tensor | None:
    """x ``[B, T-1, ...]`` (or ``[B]``, per sequence) at the target rows, packed in row order: ``[n, ...]``."""
    if x is None:
        return None
    if x.dim() == 1:
        x = x[:, None].expand(target_rows.shape)
    return x[target_rows]


def _from_targets(x: torch.Tensor | None, target_rows: torch.Tensor) -> torch.Tensor | None:
    """``[n]`` values of the target rows back to ``[B, T]`` aligned with input_ids, 0 elsewhere."""
    if x is None:
        return None
    full = x.new_zeros(target_rows.shape)
    full[target_rows] = x
    return _unshift(full)


def _packed_cu_seqlens(target_rows: torch.Tensor) -> torch.Tensor:
    """``[B + 1]`` offsets of each sequence's target rows in the packed ``[n]`` layout (a sequence may have none)."""
    return torch.nn.functional.pad(target_rows.sum(1).cumsum(0), (1, 0))


def _hidden_and_head(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None):
    """The final hidden states of the rows that predict input_ids[:, 1:] ([B, T-1, D]) and the LM head's
    (weight, bias), of inputs that `_check_model_and_ids` passed."""
    hidden = final_hidden_states(model, input_ids, attention_mask, position_ids)
    return (hidden[:, :-1], *get_lm_head(model))


def _check_model_and_ids(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         position_ids: torch.Tensor | None) -> None:
    """What a backbone forward needs of its inputs: a plain linear head, ids its embedding holds."""
    check_input_ids(input_ids)
    _check_2d("attention_mask", attention_mask, input_ids)
    _check_2d("position_ids", position_ids, input_ids)
    check_plain_linear_head(model)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    num_embeddings = getattr(embeddings, "num_embeddings", None)
    # padding positions too: the embedding looks every id up ("index out of range in self" otherwise)
    if num_embeddings is not None and bool(((input_ids < 0) | (input_ids >= num_embeddings)).any()):
        raise ValueError(f"input_ids must lie in [0, {num_embeddings}) (the model's input embedding), padding "
                         f"included; got ids from {int(input_ids.min())} to {int(input_ids.max())}")


def check_hyper_parameters(hyper: Mapping[str, Any], caller: str = "rlplus_model_loss()",
                           passed_on: tuple = ("normalizer", "vocab_parallel_group")) -> RLPlusConfig:
    """The keywords that `caller` passes on to rlplus_loss (the config's, and `passed_on`), as the config
    they make."""
    for key in ("targets", "hidden", "weight", "bias", "loss_mask", "cu_seqlens"):
        if key in hyper:
            raise TypeError(f"{caller} got an unexpected keyword {key!r}: it is taken from the model and input_ids")
    if "ignore_index" in hyper:
        raise TypeError(f"{caller} got an unexpected keyword 'ignore_index': the targets are "
                        "input_ids, selected by attention_mask and loss_mask (a token id given as "
                        "ignore_index would silently drop that token)")
    known = [f.name for f in dataclasses.fields(RLPlusConfig) if f.name != "ignore_index"] + list(passed_on)
    unknown = sorted(k for k in hyper if k not in known)
    if unknown:
        raise TypeError(f"{caller} got unknown hyper-parameter(s) {unknown}; known: {known}")
    check_normalizer(hyper.get("normalizer"), None)
    return RLPlusConfig(**{k: v for k, v in hyper.items() if k not in passed_on})


def check_model_inputs(model: nn.Module, batch: Mapping[str, Any], hyper: Mapping[str, Any]) -> None:
    """The checks of :func:`rlplus_model_loss` that need no forward pass, of its tensor arguments `batch`
    (by name: input_ids, advantages, and optionally the others) and its keywords `hyper`, so that a bad
    batch is refused before the backbone runs (and, in RLPlusTrainer, before any micro-batch's backward)."""
    input_ids, advantages = batch["input_ids"], batch["advantages"]
    attention_mask, loss_mask = batch.get("attention_mask"), batch.get("loss_mask")
    if advantages is None:
        raise TypeError("advantages must be a torch.Tensor, got None")
    _check_model_and_ids(model, input_ids, attention_mask, batch.get("position_ids"))
    _check_2d("loss_mask", loss_mask, input_ids)
    _check_2d("advantages", advantages, input_ids, allow_1d=True, floating=True)
    _check_2d("external_mask", batch.get("external_mask"), input_ids, allow_1d=True)
    for name in ("old_logprobs", "behavior_logprobs", "ref_logprobs"):
        _check_2d(name, batch.get(name), input_ids, floating=True)
    check_kl_inputs(check_hyper_parameters(hyper), batch.get("ref_logprobs"))
    normalizer = hyper.get("normalizer")
    if isinstance(normalizer, torch.Tensor):
        check_normalizer_value(normalizer, target_mask(input_ids, attention_mask, loss_mask))


def rlplus_model_loss(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      loss_mask: torch.Tensor | None, advantages: torch.Tensor,
                      old_logprobs: torch.Tensor | None = None, *,
                      external_mask: torch.Tensor | None = None,
                      behavior_logprobs: torch.Tensor | None = None,
                      ref_logprobs: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None,
                      **hyper: Any):
    """RL-PLUS loss of a causal LM on a padded batch, without materialising its logits.

    Args:
        model: a ``transformers`` causal LM (``AutoModelForCausalLM``) whose logits are
            ``lm_head(last_hidden_state)``; tied heads are fine, soft-capped ones are refused.
        input_ids, attention_mask: ``[B, T]``, either padding side.
        loss_mask: ``[B, T]``, true on the completion tokens that are trained on (or None: every
            non-padding token after position 0).
        advantages: ``[B]`` or ``[B, T]``; external_mask: ``[B]`` or ``[B, T]``.
        old_logprobs, behavior_logprobs, ref_logprobs: ``[B, T]``, aligned with ``input_ids``
            (as :func:`score_logprobs` returns them).
        position_ids: default ``cumsum(attention_mask) - 1``, as ``generate`` uses.
        **hyper: every other keyword goes to :func:`rlplus_kernels.rlplus_loss` (temperature,
            clip bounds, gamma, loss_agg, normalizer, entropy_coef, kl_coef, backend,
            vocab_parallel_group, ...).

    Returns:
        ``RLPlusOutput`` whose ``logprobs`` (and ``entropy``) are ``[B, T]`` aligned with
        ``input_ids``, 0 at position 0 and at every non-target.
    """
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask, advantages=advantages,
                 old_logprobs=old_logprobs, external_mask=external_mask, behavior_logprobs=behavior_logprobs,
                 ref_logprobs=ref_logprobs, position_ids=position_ids)
    check_model_inputs(model, batch, hyper)
    return loss_of_checked_batch(model, batch, hyper)


def loss_of_checked_batch(model: nn.Module, batch: Mapping[str, Any], hyper: Mapping[str, Any]):
    """:func:`rlplus_model_loss` of keyword arguments `batch` (its tensors) and `hyper` that
    :func:`check_model_inputs` passed, without checking them again (RLPlusTrainer checks a whole batch
    once, then calls this per micro-batch)."""
    from rlplus_kernels import rlplus_loss

    input_ids, attention_mask = batch["input_ids"], batch.get("attention_mask")
    # The head sees only the target rows, packed per sequence (cu_seqlens keeps the seq modes exact):
    # prompt and padding rows cost no logits, and a padding row's hidden state, whatever a backbone left
    # there (NaN after a fully masked attention row), reaches no gradient
    target_rows = target_mask(input_ids, attention_mask, batch.get("loss_mask"))[:, 1:]
    hidden, weight, bias = _hidden_and_head(model, input_ids, attention_mask, batch.get("position_ids"))
    packed = lambda key: _at_targets(_shift(batch.get(key)), target_rows)  # noqa: E731
    out = rlplus_loss(
        hidden[target_rows], weight, input_ids[:, 1:][target_rows], packed("advantages"), packed("old_logprobs"),
        external_mask=packed("external_mask"), behavior_logprobs=packed("behavior_logprobs"),
        ref_logprobs=packed("ref_logprobs"), bias=bias, cu_seqlens=_packed_cu_seqlens(target_rows), **hyper)
    return out._replace(logprobs=_from_targets(out.logprobs, target_rows),
                        entropy=_from_targets(out.entropy, target_rows))


@torch.no_grad()
def score_logprobs(model: nn.Module, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, *, temperature: float = 1.0,
                   position_ids: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``[B, T]`` float32 log-probs of ``input_ids`` under ``model``, aligned with ``input_ids``.

    ``out[:, t] = log_softmax(logits[:, t-1] / temperature)[input_ids[:, t]]``; 0 at position 0 and
    at padding. Runs under ``torch.no_grad()`` through :func:`rlplus_kernels.linear_logprobs`,
    for ``old_logprobs`` (the rollout policy) and ``ref_logprobs`` (the reference policy), in eval
    mode (the policy that generates has no dropout), the model's own mode restored after.
    """
    from rlplus_kernels import linear_logprobs

    _check_model_and_ids(model, input_ids, attention_mask, position_ids)
    RLPlusConfig(temperature=temperature, backend=backend)  # refused before the backbone runs
    target_rows = target_mask(input_ids, attention_mask)[:, 1:]
    with eval_mode(model):
        hidden, weight, bias = _hidden_and_head(model, input_ids, attention_mask, position_ids)
    logp = linear_logprobs(hidden[target_rows], weight, input_ids[:, 1:][target_rows], bias=bias,
                           temperature=temperature, backend=backend)
    return _from_targets(logp, target_rows)
