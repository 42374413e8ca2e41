"""Split a Hugging Face causal LM into its backbone and its LM head.

RL-PLUS only needs the final (normed) hidden states and the head's ``weight``/``bias``; the
``[B, T, V]`` logits are never built. This holds only when the model's logits are a plain linear
map of the last hidden state, ``logits = h @ W.T + c``; the architectures that post-process
the logits (soft-capping, scaling) are refused here with the option that would be needed.

Nothing in this file imports ``transformers``: models are handled by duck typing
(``get_output_embeddings``, ``base_model_prefix``, ``config``).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterator

import torch
from torch import nn

from ..validation import instance_of_loaded

__all__ = ["check_plain_linear_head", "get_lm_head", "get_backbone", "final_hidden_states",
           "position_ids_from_mask", "verify_head", "eval_mode", "disable_dropout"]

# config attribute -> (what the model does with its logits, what rlplus_loss would need)
_LOGIT_POSTPROCESSING = {
    "final_logit_softcapping": (
        "soft-caps its logits (cap * tanh(logits / cap), e.g. Gemma-2/3)",
        "a `final_logit_softcapping` option (tanh soft-capping of z inside the vocabulary "
        "stream), which rlplus_loss does not have; set config.final_logit_softcapping=None "
        "only if you accept training a different distribution"),
    "logit_softcapping": (
        "soft-caps its logits",
        "a logit soft-capping option, which rlplus_loss does not have"),
    "softcap": (
        "soft-caps its logits",
        "a logit soft-capping option, which rlplus_loss does not have"),
    "logits_soft_cap": (
        "soft-caps its logits (cap * tanh(logits / cap), e.g. RecurrentGemma)",
        "a logit soft-capping option, which rlplus_loss does not have"),
    "output_logit_soft_cap": (
        "soft-caps its logits (cap * tanh(logits / cap), e.g. xLSTM)",
        "a logit soft-capping option, which rlplus_loss does not have"),
    "logit_scale": (
        "multiplies its logits by a constant (e.g. Cohere)",
        "a `logit_scale` option; rlplus_loss has none (a constant scale s equals "
        "temperature / s, but the wrapper does not fold it silently)"),
    "logits_scaling": (
        "rescales its logits by a constant (e.g. Granite divides by it)",
        "a logit-scale option; rlplus_loss has none (a constant scale equals a change of "
        "temperature, but the wrapper does not fold it silently)"),
    "output_multiplier": (
        "multiplies its logits by a constant",
        "a logit-scale option; rlplus_loss has none"),
    "lm_head_multiplier": (
        "multiplies its logits by a constant (e.g. Falcon-H1)",
        "a logit-scale option; rlplus_loss has none"),
    "logits_mup_width_multiplier": (
        "divides its last hidden state by a constant before the head (e.g. Inkling)",
        "a logit-scale option; rlplus_loss has none"),
    "unpadded_vocab_size": (
        "keeps only its first unpadded_vocab_size logits (e.g. Inkling): its softmax leaves out the head's "
        "last rows",
        "the head cut to those rows (lm_head.weight[:unpadded_vocab_size]), which the wrapper does not do "
        "silently"),
}
# harmless values of the attributes above beyond None and False: a scale of 1, a vocabulary cut that cuts nothing
_SCALES = ("logit_scale", "logits_scaling", "output_multiplier", "lm_head_multiplier", "logits_mup_width_multiplier")
_VOCABULARY_CUTS = ("unpadded_vocab_size",)


def _configs(model: nn.Module) -> list[Any]:
    config = getattr(model, "config", None)
    if config is None:
        return []
    out = [config]
    for sub in ("text_config", "decoder"):
        sub_config = getattr(config, sub, None)
        if sub_config is not None and not isinstance(sub_config, str):
            out.append(sub_config)  # an object, or a dict as some multimodal configs keep it
    return out


def check_plain_linear_head(model: nn.Module) -> None:
    """Raise ``ValueError`` unless ``model``'s logits are ``lm_head(last_hidden_state)``.

    Looks at the config attributes through which ``transformers`` models post-process their
    logits; a value that is None (or 1 for a scale, or the vocabulary size for a cut) is harmless.
    :func:`verify_head` is the numerical check for everything that a config does not declare.
    """
    for config in _configs(model):
        for attr, (what, needed) in _LOGIT_POSTPROCESSING.items():
            value, vocab_size = (config.get(attr), config.get("vocab_size")) if isinstance(config, dict) else \
                (getattr(config, attr, None), getattr(config, "vocab_size", None))
            if value is None or value is False:
                continue
            if attr in _SCALES and isinstance(value, (int, float)) and float(value) == 1.0:
                continue  # (a soft-cap of 1 still caps)
            if attr in _VOCABULARY_CUTS and isinstance(value, int) and isinstance(vocab_size, int) \
                    and value >= vocab_size:
                continue
            arch = type(model).__name__
            raise ValueError(
                f"{arch}: config.{attr}={value!r} -- this model {what}, so its logits are not a "
                f"plain linear map of the last hidden state. Training it from hidden states "
                f"would need {needed}.")
    get_lm_head(model)  # the head itself must be a linear layer


_FSDP_MODULES = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")  # FSDPModule: torch < 2.6


def _refuse_wrapper(model: nn.Module) -> None:
    """A data-parallel wrapper is refused by name: DistributedDataParallel or DataParallel (no
    ``get_output_embeddings``; the model is its ``.module``), FSDP1's FullyShardedDataParallel or DeepSpeed's
    engine (which hand their module's attributes on), or a model that FSDP2's fully_shard has sharded. Running
    the model's backbone and head directly would bypass the wrapper's forward (where FSDP and ZeRO-3 gather the
    parameters) and its gradient synchronisation. So is torch.compile(model), whose compiled forward would
    never run."""
    compiled = getattr(model, "_orig_mod", None)  # torch.compile(model) hands the model's attributes on
    if isinstance(compiled, nn.Module):
        causal_lm = "model.get_base_model()" if _is_peft_model(compiled) else "model"
        backbone = getattr(compiled, "base_model_prefix", "") or "<backbone>"
        raise ValueError(
            f"{type(model).__name__}: torch.compile of {type(compiled).__name__}; the trainer's functions run its "
            f"backbone and head, not its forward, so the compiled forward would never run. Pass the model itself "
            f"(._orig_mod) and compile the backbone in place: {causal_lm}.{backbone}.compile()")
    inner = getattr(model, "module", None)
    if isinstance(inner, nn.Module) and (not hasattr(model, "get_output_embeddings")
                                         or instance_of_loaded(model, "FullyShardedDataParallel", _FSDP_MODULES)
                                         or instance_of_loaded(model, "DeepSpeedEngine", ("deepspeed.runtime.engine",))):
        what = f"a wrapper around {type(inner).__name__}"
    elif instance_of_loaded(model, "FSDPModule", _FSDP_MODULES):
        what = "a model sharded by FSDP2's fully_shard"
    else:
        return
    raise ValueError(
        f"{type(model).__name__}: {what}; the trainer's functions run the causal LM itself in one process (its "
        f"backbone and head directly, past the wrapper's forward and gradient hooks). Pass the unwrapped model in "
        f"a single process; across processes call rlplus_model_loss on the causal LM inside the forward of the "
        f"module that the wrapper wraps (docs/distributed.md, 'The trainer's functions across processes').")


def _causal_lm(model: nn.Module) -> nn.Module:
    """The causal LM whose backbone and head the trainer's functions run: a wrapper is refused
    (`_refuse_wrapper`); PEFT's PeftModel is its base model, whose modules carry the adapters in place."""
    _refuse_wrapper(model)
    return model.get_base_model() if _is_peft_model(model) else model


def _is_peft_model(model: nn.Module) -> bool:
    return instance_of_loaded(model, "PeftModel", ("peft", "peft.peft_model"))


def get_lm_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the LM head's ``(weight [V, D], bias [V] | None)``; tied heads share the embedding."""
    model = _causal_lm(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(
            f"{type(model).__name__}: get_output_embeddings() returned None; a causal LM with a "
            f"linear LM head (e.g. AutoModelForCausalLM) is needed, not a bare backbone.")
    if instance_of_loaded(head, "BaseTunerLayer", ("peft.tuners.tuners_utils",)):
        raise ValueError(
            f"{type(model).__name__}: the LM head carries a PEFT adapter ({type(head).__module__}."
            f"{type(head).__name__}); its logits add the adapter's term to those of lm_head.weight, so they are not "
            f"a linear map of that weight. Leave lm_head out of target_modules: train it whole with "
            f"modules_to_save=['lm_head'], or keep it frozen.")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{type(model).__name__}: the output embedding {type(head).__name__} has no 2-D "
            f"`weight`; only a linear LM head (nn.Linear) is supported.")
    bias = getattr(head, "bias", None)
    return weight, bias


def get_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack that returns the final normed hidden states (``model.model`` for Llama)."""
    model = _causal_lm(model)
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if backbone is None and hasattr(model, "get_decoder"):
        backbone = model.get_decoder()
    if backbone is None or backbone is model:
        raise ValueError(
            f"{type(model).__name__}: cannot find the backbone (model.{prefix or '<base_model_prefix>'}) "
            f"that returns last_hidden_state without computing logits.")
    return backbone


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (no dropout) inside the block; the mode of each of its modules restored
    after (``model.train(flag)`` would also flip a sub-module kept in eval mode on purpose)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


# float rates of train-mode noise that transformers models read as module attributes, beyond "dropout" and
# "layerdrop" in a name: MoE routers' multiplicative jitter (Mixtral, Qwen-MoE, PhiMoE's input, DBRX). Not
# PhiMoE's `router_jitter_noise`, a routing threshold in eval mode too.
_TRAIN_NOISE = ("jitter_noise", "input_jitter_noise", "moe_jitter_eps")


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability of ``model`` to 0, and its other train-mode noise that a rate turns
    off; returns how many were non-zero.

    Covers ``nn.Dropout`` modules and the float rates that ``transformers`` modules apply in train
    mode: every float attribute whose name holds "dropout" (``attention_dropout``, ``dropout``,
    ``activation_dropout``, ...) or "layerdrop" (layers skipped at random), and MoE routers' jitter
    (``_TRAIN_NOISE``), on the modules and on the model's config, which some attention implementations
    read at every forward (e.g. Persimmon's). Train-mode randomness without such a rate remains (PhiMoE
    samples its experts in train mode).
    """
    changed = 0
    for owner in [*model.modules(), *_configs(model)]:
        if isinstance(owner, nn.modules.dropout._DropoutNd):
            changed += owner.p != 0
            owner.p = 0.0
        is_dict = isinstance(owner, dict)  # a sub-config kept as a dict (`_configs`)
        for name, value in list((owner if is_dict else vars(owner)).items()):
            noise = "dropout" in name or "layerdrop" in name or name in _TRAIN_NOISE
            if noise and isinstance(value, float) and value != 0.0:
                if is_dict:
                    owner[name] = 0.0
                else:
                    setattr(owner, name, 0.0)
                changed += 1
    return changed


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as ``generate`` does for left-padded prompts."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def final_hidden_states(model: nn.Module, input_ids: torch.Tensor,
                        attention_mask: torch.Tensor | None = None,
                        position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T, D]`` final normed hidden states; the LM head is not applied.

    Position ids follow the attention mask (left padding gives the same positions as in
    ``generate``) unless given.
    """
    backbone = get_backbone(model)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if attention_mask is not None and position_ids is None:
        position_ids = position_ids_from_mask(attention_mask)
    if position_ids is not None and _accepts(backbone, "position_ids"):
        kwargs["position_ids"] = position_ids
    if _accepts(backbone, "use_cache"):
        kwargs["use_cache"] = False
    out = backbone(**kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if hidden.dim() != 3 or hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"{type(backbone).__name__} returned hidden states of shape "
                         f"{tuple(hidden.shape)}, expected [B, T, D] for input_ids {tuple(input_ids.shape)}")
    return hidden


@torch.no_grad()
def verify_head(model: nn.Module, *, seq_len: int = 4, atol: float = 1e-4, rtol: float = 1e-3) -> None:
    """Numerical check, once per model: ``lm_head(backbone(x))`` must equal ``model(x).logits``.

    Runs the full model on a ``[1, seq_len]`` input (a ``1 x seq_len x V`` logits tensor) and
    raises ``ValueError`` naming the largest difference when the model post-processes its
    logits in a way its config does not declare.
    """
    check_plain_linear_head(model)
    weight, bias = get_lm_head(model)
    vocab = weight.shape[0]
    ids = torch.arange(1, seq_len + 1, device=weight.device).remainder(vocab)[None]
    mask = torch.ones_like(ids)
    pos = position_ids_from_mask(mask)
    with eval_mode(model):  # dropout would make the two forwards differ
        hidden = final_hidden_states(model, ids, mask, pos)
        mine = torch.nn.functional.linear(hidden, weight, bias).float()
        kwargs = {"attention_mask": mask, "use_cache": False}
        if _accepts(model, "position_ids"):
            kwargs["position_ids"] = pos
        theirs = model(ids, **kwargs).logits.float()
    if mine.shape != theirs.shape or not torch.allclose(mine, theirs, atol=atol, rtol=rtol):
        diff = (mine - theirs).abs().max().item() if mine.shape == theirs.shape else float("nan")
        raise ValueError(
            f"{type(model).__name__}: model(x).logits differs from lm_head(last_hidden_state) "
            f"(max abs diff {diff:.3g}); its logits are post-processed, which rlplus_loss "
            f"cannot reproduce from the head's weight and bias.")
