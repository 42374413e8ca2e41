"""Hyper-parameters of the RL-PLUS objective: one frozen dataclass, validated once."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Optional

from .validation import check_number, plain_number

FLOAT32_MAX = 3.4028234663852886e38
LOSS_AGG_MODES = ("token-mean", "sum", "seq-mean-token-mean", "seq-mean-token-sum")
SEQ_AGG_MODES = ("seq-mean-token-mean", "seq-mean-token-sum")
BACKENDS = ("auto", "triton", "torch")

# The recipe of the paper's official code (SPEC.md section 1): no clipping, a sum normalised by the
# maximum response length, a small entropy bonus, gamma 0.5, no KL. Advantages are the reward minus
# the group mean (see `group_advantages`), each group holding 7 rollouts and 1 demonstration.
OFFICIAL_RECIPE = dict(
    clip_eps_low=None,
    clip_eps_high=None,
    dual_clip=None,
    gamma=0.5,
    mis_clip_max=None,
    kl_coef=0.0,
    entropy_coef=0.001,
    loss_agg="sum",
    normalizer=8192,
)


def _integer(name: str, value):
    """A Python int for any integral number but bool (numpy integers included), else the value as given."""
    value = plain_number(name, value)
    return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value


@dataclass(frozen=True)
class RLPlusConfig:
    """Everything of `rlplus_loss` that is not a per-batch tensor (SPEC.md section 2)."""

    kl_coef: float = 0.0
    temperature: float = 1.0
    clip_eps_low: Optional[float] = 0.2
    clip_eps_high: Optional[float] = 0.2
    dual_clip: Optional[float] = None
    gamma: float = 0.5
    mis_clip_max: Optional[float] = None
    entropy_coef: float = 0.0
    return_entropy: bool = False
    loss_agg: str = "token-mean"
    ignore_index: int = -100
    backend: str = "auto"
    chunk_tokens: Optional[int] = None
    chunk_vocab: Optional[int] = None

    def __post_init__(self) -> None:
        # frozen: the normalised values are set through object.__setattr__
        for name in ("kl_coef", "temperature", "gamma", "entropy_coef"):
            object.__setattr__(self, name, check_number(name, getattr(self, name)))
        for name in ("clip_eps_low", "clip_eps_high", "dual_clip", "mis_clip_max"):
            object.__setattr__(self, name, check_number(name, getattr(self, name), allow_none=True))
        for name in ("ignore_index", "chunk_tokens", "chunk_vocab"):
            object.__setattr__(self, name, _integer(name, getattr(self, name)))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        for name in ("kl_coef", "entropy_coef"):  # the kernels read them in float32
            value = getattr(self, name)
            if not -FLOAT32_MAX <= value <= FLOAT32_MAX:
                raise ValueError(f"{name} must lie within float32's range (+-{FLOAT32_MAX:.4g}), got {value}")
        for name in ("clip_eps_low", "clip_eps_high"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip must be > 1 or None, got {self.dual_clip}")
        if self.gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {self.gamma}")
        if self.mis_clip_max is not None and self.mis_clip_max <= 0:
            raise ValueError(f"mis_clip_max must be > 0 or None, got {self.mis_clip_max}")
        if self.loss_agg not in LOSS_AGG_MODES:
            raise ValueError(f"loss_agg must be one of {LOSS_AGG_MODES}, got {self.loss_agg!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if not -2**63 <= self.ignore_index < 2**63:  # the targets are int64
            raise ValueError(f"ignore_index must fit in int64, got {self.ignore_index}")
        if not isinstance(plain_number("return_entropy", self.return_entropy), bool):
            raise TypeError(f"return_entropy must be a bool, got {type(self.return_entropy).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        for name in ("chunk_tokens", "chunk_vocab"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")

    @property
    def with_entropy(self) -> bool:
        # A bool even where entropy_coef is a SymFloat (torch.compile): torch 2.6's dynamo cannot bool() a SymBool
        return True if self.entropy_coef != 0 else self.return_entropy

    def as_kwargs(self) -> dict:
        return asdict(self)
