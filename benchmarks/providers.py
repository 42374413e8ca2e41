"""The implementations that `bench_loss.py` races against each other.

Every provider computes the same thing from the same inputs:

* mode ``fwd``: the log-probabilities of the targets under ``torch.no_grad()`` -- the path that
  scores rollouts for ``old_logprobs`` / ``ref_logprobs``;
* mode ``fwd+bwd``: the on-policy GRPO/PPO clipped surrogate, token-mean over all tokens, and its
  gradients with respect to ``hidden`` and ``weight``; when the problem has external
  (off-policy) sequences, RL-PLUS's MIS / exploration term on those (SPEC section 1), for the
  providers that can express it.

``naive`` below is a *baseline*, written the way most trainers write it (full logits,
``log_softmax``, gather, autograd); it is not the float64 reference, which lives in
``reference/`` and defines the function for the tests.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import os
from dataclasses import dataclass, asdict
from typing import Callable

import torch

CLIP_LOW = 0.2
CLIP_HIGH = 0.2
GAMMA = 0.5  # exploration exponent of RL-PLUS (only used on external tokens)
LOG_RATIO_CLAMP = 20.0


@dataclass(frozen=True)
class Problem:
    """One benchmark configuration: N = tokens = batch * seq_len rows of hidden size D, vocabulary V."""

    tokens: int
    hidden: int
    vocab: int
    dtype: str = "float32"
    device: str = "cpu"
    seq_len: int = 512
    external_frac: float = 0.0  # fraction of sequences that are external demonstrations
    seed: int = 0

    @property
    def batch(self) -> int:
        return self.tokens // self.seq_len

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Inputs:
    hidden: torch.Tensor  # [B, T, D], requires grad
    weight: torch.Tensor  # [V, D], requires grad
    targets: torch.Tensor  # [B, T] int64
    advantages: torch.Tensor  # [B] float32, one per sequence (GRPO)
    old_logprobs: torch.Tensor | None  # [B, T] float32
    external_mask: torch.Tensor | None  # [B] bool, or None when every sequence is on-policy


def make_inputs(problem: Problem, with_old_logprobs: bool) -> Inputs:
    """Deterministic inputs; logits have a standard deviation of about 2, like a trained LM head."""
    if problem.tokens % problem.seq_len:
        raise ValueError(f"tokens ({problem.tokens}) must be a multiple of seq_len ({problem.seq_len})")
    dev, dt = torch.device(problem.device), problem.torch_dtype
    gen = torch.Generator(device=dev).manual_seed(problem.seed)
    B, T, D, V = problem.batch, problem.seq_len, problem.hidden, problem.vocab
    hidden = torch.randn(B, T, D, generator=gen, device=dev).to(dt).requires_grad_(True)
    weight = (torch.randn(V, D, generator=gen, device=dev) * (2.0 / math.sqrt(D))).to(dt).requires_grad_(True)
    targets = torch.randint(0, V, (B, T), generator=gen, device=dev)
    advantages = torch.randn(B, generator=gen, device=dev)
    external = None
    if problem.external_frac > 0:
        # one external demonstration per group of round(1 / frac) sequences, as in RL-PLUS (7 + 1)
        every = max(1, round(1 / problem.external_frac))
        external = (torch.arange(B, device=dev) % every) == every - 1
    old = None
    if with_old_logprobs:
        # the rollout policy is a little off the current one, so that some ratios get clipped
        with torch.no_grad():
            logp = _chunked_logprobs(hidden.detach().reshape(-1, D), weight.detach(), targets.reshape(-1))
        old = (logp + 0.1 * torch.randn(logp.shape, generator=gen, device=dev)).reshape(B, T)
    return Inputs(hidden, weight, targets, advantages, old, external)


def _chunked_logprobs(h, w, y):
    out = torch.empty(h.shape[0], device=h.device, dtype=torch.float32)
    chunk = max(1, 2**24 // w.shape[0])  # 64 MB of float32 logits at a time: input preparation stays small
    for i in range(0, h.shape[0], chunk):
        z = (h[i:i + chunk] @ w.T).float()
        out[i:i + chunk] = z.gather(-1, y[i:i + chunk, None]).squeeze(-1) - torch.logsumexp(z, -1)
    return out


# ---------------------------------------------------------------------------------------------
# the loss on per-token log-probs, shared by the providers that only produce log-probs
# ---------------------------------------------------------------------------------------------

def rlplus_token_loss(logp, old, adv, external=None):
    """Per-token RL-PLUS loss on [B, T] log-probs (SPEC section 1); token-mean aggregation."""
    adv = adv[:, None].expand_as(logp)
    ratio = torch.exp(torch.clamp(logp - old, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    on = torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - CLIP_LOW, 1 + CLIP_HIGH))
    if external is None:
        return on.mean()
    # MIS weight w = p / (p_old / 2 + pw / 2) with pw = (p_old + 1) / 2, and C = (1 - p)^gamma
    log_pw = torch.log((torch.exp(old) + 1) / 2)
    log_w = logp - torch.logaddexp(old, log_pw) + math.log(2.0)
    w = torch.exp(torch.clamp(log_w, max=LOG_RATIO_CLAMP))
    coef = torch.clamp(1 - torch.exp(logp.detach()), min=0) ** GAMMA
    ext = -w * adv * coef
    return torch.where(external[:, None].expand_as(logp), ext, on).mean()


# ---------------------------------------------------------------------------------------------
# providers
# ---------------------------------------------------------------------------------------------

class Provider:
    """`unavailable(problem)` gives the reason it cannot run there (None when it can);
    `logprobs(inp)` and `loss(inp)` return closures that run the op once."""

    name: str = ""
    supports_external = False
    note = ""

    def unavailable(self, problem: Problem) -> str | None:
        return None

    def version(self) -> str | None:
        return None

    def logprobs(self, inp: Inputs) -> Callable[[], torch.Tensor]:
        raise NotImplementedError

    def loss(self, inp: Inputs) -> Callable[[], torch.Tensor]:
        raise NotImplementedError


def naive_logprobs(hidden, weight, targets):
    """Full logits, upcast, log_softmax, gather: what most RL trainers do."""
    logits = (hidden @ weight.T).float()  # [B, T, V]
    return torch.log_softmax(logits, dim=-1).gather(-1, targets[..., None]).squeeze(-1)


def naive_loss(hidden, weight, targets, advantages, old, external):
    return rlplus_token_loss(naive_logprobs(hidden, weight, targets), old, advantages, external)


class Naive(Provider):
    name = "naive"
    supports_external = True
    note = "full [N, V] logits in float32, log_softmax, gather, autograd"

    def logprobs(self, inp):
        return lambda: naive_logprobs(inp.hidden, inp.weight, inp.targets)

    def loss(self, inp):
        return lambda: naive_loss(inp.hidden, inp.weight, inp.targets, inp.advantages, inp.old_logprobs,
                                  inp.external_mask)


class NaiveCompile(Provider):
    name = "compile"
    supports_external = True
    note = "torch.compile(dynamic=True) of the naive path"

    def unavailable(self, problem):
        if problem.device == "cpu":
            import shutil
            if shutil.which("cc") is None and shutil.which("gcc") is None:
                return "torch.compile on CPU needs a C compiler"
        return None

    def logprobs(self, inp):
        fn = torch.compile(naive_logprobs, dynamic=True)
        return lambda: fn(inp.hidden, inp.weight, inp.targets)

    def loss(self, inp):
        fn = torch.compile(naive_loss, dynamic=True)
        return lambda: fn(inp.hidden, inp.weight, inp.targets, inp.advantages, inp.old_logprobs, inp.external_mask)


class _Ours(Provider):
    backend = ""
    supports_external = True

    def unavailable(self, problem):
        try:
            import rlplus_kernels  # noqa: F401
            from rlplus_kernels import rlplus_loss, linear_logprobs  # noqa: F401
        except ImportError as e:
            return f"rlplus_kernels public API not importable ({e}); run `pip install -e .` from the repo root"
        return None

    def version(self):
        try:
            return importlib.metadata.version("rlplus-kernels")
        except importlib.metadata.PackageNotFoundError:
            return getattr(importlib.import_module("rlplus_kernels"), "__version__", None)

    def logprobs(self, inp):
        from rlplus_kernels import linear_logprobs
        return lambda: linear_logprobs(inp.hidden, inp.weight, inp.targets, backend=self.backend)

    def loss(self, inp):
        from rlplus_kernels import rlplus_loss
        return lambda: rlplus_loss(inp.hidden, inp.weight, inp.targets, inp.advantages, inp.old_logprobs,
                                   external_mask=inp.external_mask, clip_eps_low=CLIP_LOW,
                                   clip_eps_high=CLIP_HIGH, gamma=GAMMA, loss_agg="token-mean",
                                   backend=self.backend).loss


class OursTorch(_Ours):
    name = "torch"
    backend = "torch"
    note = "rlplus_kernels, chunked PyTorch backend"


class OursTriton(_Ours):
    name = "triton"
    backend = "triton"
    note = "rlplus_kernels, fused Triton kernels"

    def unavailable(self, problem):
        if problem.device != "cuda":
            return "the Triton kernels need a CUDA device (TRITON_INTERPRET=1 is far too slow to time)"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
        why = super().unavailable(problem)
        if why is None:
            try:
                importlib.import_module("rlplus_kernels.backends.triton_op")
            except ImportError as e:
                why = f"this checkout has no Triton backend yet ({e})"
        return why


class OursTritonSinglePass(OursTriton):
    """The Triton backend under RLPLUS_SCHEDULE=single-pass (rlplus_kernels/kernels/README.md, "Schedule"):
    the loss's gradients formed in its forward, three GEMMs. Log-probs alone are the two-pass op's."""

    name = "triton-single-pass"
    note = "rlplus_kernels, Triton backend, RLPLUS_SCHEDULE=single-pass"

    def loss(self, inp):
        run = super().loss(inp)

        def call():
            previous = os.environ.get("RLPLUS_SCHEDULE")
            os.environ["RLPLUS_SCHEDULE"] = "single-pass"
            try:
                return run()
            finally:
                if previous is None:
                    del os.environ["RLPLUS_SCHEDULE"]
                else:
                    os.environ["RLPLUS_SCHEDULE"] = previous
        return call


class Liger(Provider):
    """Liger-Kernel's chunked GRPO loss set to our loss: no KL (beta=0), clip 0.2/0.2, token-mean
    ("dapo": sum over tokens / number of tokens), temperature 1, TRL's defaults otherwise
    (one sequence per chunk, the loss math under torch.compile). It has no external-data branch.
    Its forward computes the gradients too (they are stored for backward)."""

    name = "liger"
    note = "LigerFusedLinearGRPOLoss(beta=0, loss_type='dapo'); fwd: its chunked selective log-softmax"

    def unavailable(self, problem):
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss  # noqa: F401
        except ImportError as e:
            return f"liger-kernel not installed ({e}); `pip install .[bench]`"
        if problem.external_frac > 0:
            return "no external (off-policy MIS) branch in Liger's GRPO loss"
        return None

    def version(self):
        return importlib.metadata.version("liger-kernel")

    def logprobs(self, inp):
        from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase
        # the same streaming (2048-token x 4096-vocab chunks) that the loss uses for its log-probs
        return lambda: LigerFusedLinearPPOBase.chunk_forward(inp.hidden, inp.weight, inp.targets)

    def loss(self, inp):
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=CLIP_LOW,
                                       epsilon_high=CLIP_HIGH, loss_type="dapo", temperature=1.0)
        mask = torch.ones_like(inp.targets)
        return lambda: mod(inp.hidden, inp.weight, inp.targets, mask, inp.advantages,
                           old_per_token_logps=inp.old_logprobs)[0]


class CutCrossEntropy(Provider):
    """Apple's Cut Cross-Entropy for the log-prob part (logp = -CE, reduction='none'), our loss on
    top through autograd. Default gradient filtering (filter_eps='high'), as a user gets it."""

    name = "cce"
    supports_external = True
    note = "cut_cross_entropy.linear_cross_entropy(reduction='none') for log-probs + loss via autograd"

    def unavailable(self, problem):
        if problem.device != "cuda":
            return "Cut Cross-Entropy's kernels need a CUDA device"
        try:
            from cut_cross_entropy import linear_cross_entropy  # noqa: F401
        except ImportError as e:
            return f"cut-cross-entropy not installed ({e})"
        return None

    def version(self):
        return importlib.metadata.version("cut-cross-entropy")

    def _logp(self, inp):
        from cut_cross_entropy import linear_cross_entropy
        return -linear_cross_entropy(inp.hidden, inp.weight, inp.targets, reduction="none").float()

    def logprobs(self, inp):
        return lambda: self._logp(inp)

    def loss(self, inp):
        return lambda: rlplus_token_loss(self._logp(inp), inp.old_logprobs, inp.advantages, inp.external_mask)


PROVIDERS: dict[str, Provider] = {p.name: p for p in
                                  (Naive(), NaiveCompile(), OursTorch(), OursTriton(), OursTritonSinglePass(), Liger(),
                                   CutCrossEntropy())}
