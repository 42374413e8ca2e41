"""What every backend shares: the compute dtype and the autograd glue around CONTRACT.md's op."""

from __future__ import annotations

import torch


# Floor for log-probabilities and shifted logits: exp of anything below it is 0 in float32 and
# float64 (they underflow at -104 and -745), so clamping there changes no probability, while it keeps
# 0 * log p and e^shift * shift finite where a logit is -inf or -3e38 (a vocabulary row masked
# by its bias) instead of 0 * inf = NaN.
LOG_P_FLOOR = -1.0e4


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def widest_float(device: torch.device) -> torch.dtype:
    """float64, or float32 where the device has none (MPS): a sum of float32 terms there neither overflows where
    its mean would not nor loses the last bits that make a mean of equal terms exact."""
    return torch.float32 if device.type == "mps" else torch.float64


def device_scalars(like: torch.Tensor, values, dtype: torch.dtype) -> torch.Tensor:
    """[len(values)] of `dtype` on `like`'s device, formed there: no copy from the host (which would wait for the
    device, and cannot be captured in a CUDA graph). Products, not torch.full or torch.tensor: under
    torch.compile (AOTAutograd) those make a symbolic float a constant of the graph again, a product keeps it,
    so a value that changes between calls (a coefficient schedule) does not recompile."""
    one = like.new_ones((), dtype=dtype)
    return torch.stack([one * value for value in values])


def finish_logprobs(lse, target_logit, entropy, targets, ignore_index):
    """logp and entropy from the (merged) partials; 0 at ignored rows."""
    active = targets != ignore_index
    zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
    logp = torch.where(active, target_logit - lse, zero)
    entropy = None if entropy is None else torch.where(active, entropy, zero)
    return logp, entropy
