"""The pure-PyTorch definition of correct: materialises the logits and computes SPEC.md literally."""

from .rlplus_reference import linear_logprobs_reference, rlplus_loss_from_logprobs_reference, rlplus_loss_reference

__all__ = ["rlplus_loss_reference", "rlplus_loss_from_logprobs_reference", "linear_logprobs_reference"]
