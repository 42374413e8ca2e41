"""rlplus-kernels: the RL-PLUS objective computed straight from hidden states and the LM head.

    from rlplus_kernels import rlplus_loss
    out = rlplus_loss(hidden, lm_head.weight, targets, advantages, old_logprobs, external_mask=ext)
    out.loss.backward()
"""

from .advantages import group_advantages
from .api import RLPlusLoss, RLPlusOutput, compute_rlplus_loss, linear_logprobs, rlplus_loss
from .config import OFFICIAL_RECIPE, RLPlusConfig

__version__ = "0.1.0"

__all__ = [
    "rlplus_loss",
    "linear_logprobs",
    "RLPlusLoss",
    "RLPlusOutput",
    "RLPlusConfig",
    "group_advantages",
    "OFFICIAL_RECIPE",
    "compute_rlplus_loss",
]
