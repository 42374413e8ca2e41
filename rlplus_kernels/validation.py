"""Checks of SPEC.md section 3: every bad input is refused, naming the argument, before any work."""

from __future__ import annotations

import math
import numbers
import sys
from typing import Callable, Optional

import torch

from ._environment import graph_capturing

SUPPORTED_DTYPES = {
    "torch": (torch.float32, torch.float16, torch.bfloat16, torch.float64),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


def plain_number(name: str, value):
    """A numpy scalar (np.float32(0.2), from a config file) as the Python number it holds; anything
    else as given. Duck-typed, not isinstance(np.generic): torch.compile traces numpy scalars as its
    own 0-dim ndarrays, whose value is unknown while it traces (sympy's "expression is NaN" at the first
    comparison): there the argument `name` is refused."""
    if not isinstance(value, (bool, int, float, torch.Tensor)) and getattr(value, "ndim", None) == 0 \
            and hasattr(value, "item"):
        if torch.compiler.is_compiling():
            raise TypeError(f"{name} is a numpy scalar, which torch.compile traces as a tensor of unknown value: "
                            f"pass a Python number ({name}=float(value) or int(value))")
        return value.item()
    return value


def check_number(name: str, value, *, allow_none: bool = False) -> Optional[float]:
    """A finite real number as a Python float (numpy scalars from a config file included)."""
    if value is None and allow_none:
        return None
    value = plain_number(name, value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    # comparisons, not math.isfinite: under torch.compile a float argument that changed between
    # calls is a symbolic float, which compares (a guard) but has no isfinite (NaN fails both)
    if not -math.inf < value < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
    try:
        return float(value)
    except OverflowError:  # an integer past float's range passes the comparisons above
        raise ValueError(f"{name} must be finite, got an integer of {value.bit_length()} bits, past float's range") \
            from None


def shape_text(shape) -> str:
    """A shape as "[3, 4]", also inside torch.compile: dynamo cannot trace str() of a tuple of symbolic
    sizes, while an f-string of one size specialises it (on an error path, where that costs nothing)."""
    return str([int(f"{size}") for size in shape])


def refuse_if(bad: torch.Tensor, device_message: str, eager_message: Callable[[], str]) -> None:
    """Raise ValueError(eager_message()) where the 0-dim bool `bad` holds: one host sync. Inside
    torch.compile, where a host sync would be a data-dependent guard, and while a CUDA graph is captured,
    where it is an error (and where the check then runs again at every replay), the check runs on the device
    (torch._assert_async, asynchronously) with `device_message`, which reads no tensor value."""
    if torch.compiler.is_compiling() or graph_capturing(bad.device):
        torch._assert_async(~bad, device_message)
    elif bool(bad):
        raise ValueError(eager_message())


def instance_of_loaded(obj, name: str, modules: tuple) -> bool:
    """Whether obj is an instance of the class `name` of one of `modules`. Nothing is imported (a DTensor's
    module takes ~1 s, DeepSpeed's and PEFT's more): such an object exists only where its module is loaded."""
    for module in modules:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(obj, cls):
            return True
    return False


def require_tensor(name: str, x) -> torch.Tensor:
    """A torch.Tensor, not a DTensor (whose ops would reach the kernels with plain tensors mixed in: torch's
    error names neither the argument nor the remedy), with a storage that covers it (FSDP1 frees the storage of
    a unit's gathered parameters and leaves their views), and not a parameter that DeepSpeed ZeRO-3 has left
    partitioned. These checks are skipped inside torch.compile."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense tensor, got layout {x.layout} (call {name}.to_dense())")
    if torch.compiler.is_compiling():
        return x
    if instance_of_loaded(x, "DTensor", ("torch.distributed.tensor", "torch.distributed._tensor")):  # >= 2.5, 2.4
        remedy = (" FSDP2 (fully_shard) keeps a parameter sharded outside the forward of its unit: call the loss "
                  "after the forward of the unit that holds the LM head, or call lm_head.unshard() first; a "
                  f"tensor-parallel vocabulary shard is {name}.to_local() with vocab_parallel_group."
                  if name in ("weight", "bias") else "")
        raise TypeError(f"{name} is a DTensor (placements {tuple(x.placements)}); the loss takes plain tensors.{remedy} "
                        "See docs/distributed.md, 'FSDP2 and DTensor'")
    partitioned_shape = getattr(x, "ds_shape", None)
    if partitioned_shape is not None and tuple(x.shape) != tuple(partitioned_shape):
        raise ValueError(
            f"{name} is a parameter that DeepSpeed ZeRO-3 has partitioned (shape {shape_text(partitioned_shape)}, "
            f"this rank holds {shape_text(x.shape)}): ZeRO-3 gathers a parameter where it is read during the forward "
            "of the engine's module, and leaves it partitioned outside. Compute the loss inside the forward of the "
            "module that the engine wraps (docs/distributed.md, 'DeepSpeed ZeRO-3').")
    if _storage_falls_short(x):
        remedy = (" FSDP1 (FullyShardedDataParallel) frees a unit's gathered parameters outside that unit's forward: "
                  "keep the LM head in the root unit, or compute the loss inside the forward of the unit that holds "
                  "it (docs/distributed.md, 'FSDP1')." if name in ("weight", "bias") else "")
        raise ValueError(f"{name}'s storage holds {x.untyped_storage().nbytes()} bytes, fewer than its shape "
                         f"{shape_text(x.shape)} and strides {list(x.stride())} reach: its memory was freed.{remedy}")
    return x


def _storage_falls_short(x: torch.Tensor) -> bool:
    """Whether x's storage ends before x does (a kernel would read freed or foreign memory)."""
    if x.layout != torch.strided or x.numel() == 0:
        return False
    try:
        nbytes = x.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):  # wrapper subclasses without a storage of their own
        return False
    last = x.storage_offset() + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride()))
    return (last + 1) * x.element_size() > nbytes


def check_head_tensors(hidden, weight, bias, *, backend: str) -> None:
    """hidden [N, D] | [B, T, D], weight [V, D], bias [V]: ranks, sizes, one dtype, one device."""
    require_tensor("hidden", hidden)
    require_tensor("weight", weight)
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be 2-D [N, D] or 3-D [B, T, D], got shape {shape_text(hidden.shape)}")
    if weight.dim() != 2:
        flattened = (". A 1-D weight is what FSDP1 (FullyShardedDataParallel) with use_orig_params=True leaves in a "
                     "parameter outside its unit's forward (this rank's flattened shard): compute the loss inside "
                     "the forward of the unit that holds the LM head (docs/distributed.md, 'FSDP1')"
                     if weight.dim() == 1 else "")
        raise ValueError(f"weight must be 2-D [V, D], got shape {shape_text(weight.shape)}{flattened}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden's last dimension ({hidden.shape[-1]}) must equal weight.shape[1] ({weight.shape[1]})"
        )
    if weight.shape[0] < 1 or hidden.shape[-1] < 1:
        raise ValueError(f"weight must have at least one row and one column, got shape {shape_text(weight.shape)}")
    if bias is not None:
        require_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {shape_text(bias.shape)}")
    supported = SUPPORTED_DTYPES[backend]
    if hidden.dtype not in supported:
        raise TypeError(f"hidden has unsupported dtype {hidden.dtype}; backend {backend!r} supports {supported}")
    for name, x in (("weight", weight), ("bias", bias)):
        if x is None:
            continue
        if x.dtype != hidden.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but hidden has {hidden.dtype}: hidden, weight and bias must share "
                "one dtype (inside torch.autocast they are cast for you)"
            )
        if x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")


def check_targets(targets, hidden) -> torch.Tensor:
    """Integer targets of shape hidden.shape[:-1], on hidden's device; returned as int64, the index dtype
    of gather and of the kernels, which also holds any ignore_index. Their range: `check_target_range`."""
    require_tensor("targets", targets)
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.dtype == getattr(torch, "uint64", None):  # >= 2.3
        # its values from 2^63 on would turn negative in int64, some into ignore_index: a token silently dropped
        raise TypeError("targets must be an integer tensor that int64 holds, got torch.uint64")
    targets = targets.to(torch.int64)
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets must have shape hidden.shape[:-1] = {shape_text(hidden.shape[:-1])}, "
                         f"got {shape_text(targets.shape)}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    return targets


def check_target_range(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Each target in [0, V) or ignore_index (one host sync)."""
    out_of_range = ((targets < 0) | (targets >= vocab_size)) & (targets != ignore_index)
    rule = "targets must lie in [0, {}) or equal ignore_index"
    # the compiled message names no number: a vocabulary-parallel V, exchanged between ranks, is a
    # data-dependent size there, which a message cannot format
    refuse_if(out_of_range.any(), rule.format("V") + " (V: the vocabulary size)",
              lambda: f"{rule.format(vocab_size)}={ignore_index}, found {targets[out_of_range][0].item()}")


def check_cu_seqlens(cu_seqlens, targets, name: str = "targets") -> None:
    """Packed sequences of [N] targets (the tensor `name` of the caller): int [S + 1], from 0 to N,
    non-decreasing (one host sync)."""
    if cu_seqlens is None:
        return
    require_tensor("cu_seqlens", cu_seqlens)
    if targets.dim() != 1:
        raise ValueError(f"cu_seqlens describes packed [N] inputs, got {name} of shape {shape_text(targets.shape)} "
                         "([B, T] inputs are one sequence per row already)")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype.is_complex or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:  # [0]: no sequence, a rank with nothing to score
        raise ValueError(f"cu_seqlens must be 1-D [S + 1] with S >= 0, got shape {shape_text(cu_seqlens.shape)}")
    if cu_seqlens.device != targets.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {name} is on {targets.device}")
    bad = (cu_seqlens[0] != 0) | (cu_seqlens[-1] != targets.shape[0]) | (cu_seqlens[1:] < cu_seqlens[:-1]).any()
    refuse_if(bad, "cu_seqlens must start at 0, end at N and never decrease",
               lambda: f"cu_seqlens must start at 0, end at N = {targets.shape[0]} and never decrease, "
                       f"got {cu_seqlens.tolist()}")


def check_per_token(name: str, x, targets, *, kind: str, num_sequences: Optional[int] = None,
                    sequence_ids: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """A per-token tensor of targets' shape; given a sequence layout (`head.sequence_layout`), also [S]:
    one value per sequence, spread over its tokens (targets' shape wins where the two coincide)."""
    if x is None:
        return None
    require_tensor(name, x)
    if kind == "float" and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if kind == "mask" and x.dtype.is_complex:
        raise TypeError(f"{name} must be a bool, integer or floating tensor, got {x.dtype}")
    if x.device != targets.device:
        raise ValueError(f"{name} is on {x.device} but targets is on {targets.device}")
    shapes = [tuple(targets.shape)]
    if sequence_ids is not None:
        shapes.append((num_sequences,))
    if tuple(x.shape) not in shapes:
        expected = " or ".join(shape_text(s) for s in shapes)
        raise ValueError(f"{name} must have shape {expected}, got {shape_text(x.shape)}")
    if tuple(x.shape) != shapes[0]:
        x = x[sequence_ids].view(targets.shape)
    return x


def check_normalizer(normalizer, device: Optional[torch.device]):
    """A positive number, or a 0-dim tensor (whose value `check_normalizer_value` checks) on `device` or the
    CPU (moved to `device`); None: any device."""
    if normalizer is None:
        return None
    if isinstance(normalizer, torch.Tensor):
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a number or a 0-dim tensor, got shape {shape_text(normalizer.shape)}")
        if normalizer.dtype == torch.bool or normalizer.dtype.is_complex:
            raise TypeError(f"normalizer must be a real number tensor, got {normalizer.dtype}")
        if device is None:
            return normalizer
        if normalizer.device != device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer is on {normalizer.device} but the inputs are on {device}")
        if normalizer.device != device and graph_capturing(device):
            raise ValueError(f"normalizer is a CPU tensor while a CUDA graph is captured: its copy to {device} cannot "
                             f"be captured; pass it on {device} (a tensor that each step fills in place)")
        return normalizer.to(device)
    normalizer = plain_number("normalizer", normalizer)
    if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
        raise TypeError(f"normalizer must be a positive number or a 0-dim tensor, got {type(normalizer).__name__}")
    if not check_number("normalizer", normalizer) > 0:
        raise ValueError(f"normalizer must be a finite number > 0, got {normalizer}")
    return float(normalizer)


def check_normalizer_value(normalizer: torch.Tensor, valid: torch.Tensor) -> None:
    """A tensor normalizer is finite and > 0, or 0 when no token enters the loss (a global count over
    ranks that have none). One host sync, as for the targets; on the device inside torch.compile."""
    bad = ~torch.isfinite(normalizer) | (normalizer < 0) | ((normalizer == 0) & valid.any())
    rule = "normalizer must be finite and > 0 (0 only when no token enters the loss)"
    refuse_if(bad, rule, lambda: f"{rule}, got {normalizer.item()}")


def check_kl_inputs(config, ref_logprobs) -> None:
    """A KL term needs the reference policy's log-probs."""
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError(f"kl_coef={config.kl_coef} > 0 needs ref_logprobs")
