"""Random RL-PLUS problems for property tests: a hypothesis strategy and the tensors it describes."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

from reference import linear_logprobs_reference

AGG_FLAT = ["token-mean", "sum"]
AGG_ALL = AGG_FLAT + ["seq-mean-token-mean", "seq-mean-token-sum"]


@dataclass
class Problem:
    shape: tuple            # targets' shape: (N,) or (B, T)
    hidden_size: int
    vocab_size: int
    dtype: torch.dtype
    seed: int
    logit_scale: float = 1.0
    with_bias: bool = True
    with_old: bool = True
    external: str = "none"  # none | token | sequence
    with_behavior: bool = False
    with_loss_mask: bool = False
    with_ignored: bool = False
    per_sequence_advantages: bool = False
    normalizer: object = None  # None | float | "tensor"
    # std of old/behaviour log-probs around the current ones: 0.3 straddles the clip bounds; 2 puts many
    # ratios past the dual clip (3) and MIS weights past their cap (2); 25 past the +-20 log-ratio clamp
    log_ratio_spread: float = 0.3
    options: dict = field(default_factory=dict)


@st.composite
def problems(draw, dtypes, max_tokens=40, max_hidden=24, max_vocab=120, chunked=True):
    batched = draw(st.booleans())
    if batched:
        shape = (draw(st.integers(1, 4)), draw(st.integers(1, max(1, max_tokens // 4))))
    else:
        shape = (draw(st.integers(1, max_tokens)),)
    dtype = draw(st.sampled_from(dtypes))
    problem = Problem(
        shape=shape,
        hidden_size=draw(st.integers(1, max_hidden)),
        vocab_size=draw(st.integers(2, max_vocab)),
        dtype=dtype,
        seed=draw(st.integers(0, 2**31 - 1)),
        logit_scale=draw(st.sampled_from([0.3, 1.0, 4.0])),
        with_bias=draw(st.booleans()),
        with_old=draw(st.booleans()),
        external=draw(st.sampled_from(["none", "token", "sequence"] if batched else ["none", "token"])),
        with_behavior=draw(st.booleans()),
        with_loss_mask=draw(st.booleans()),
        with_ignored=draw(st.booleans()),
        per_sequence_advantages=batched and draw(st.booleans()),
        normalizer=draw(st.sampled_from([None, 7.0, "tensor"])),
        # not float16 past the clamp: ratios of e^20 make gradients beyond its range (65504)
        log_ratio_spread=draw(st.sampled_from([0.3, 2.0] if dtype == torch.float16 else [0.3, 2.0, 25.0])),
    )
    kl_coef = draw(st.sampled_from([0.0, 0.05]))
    problem.options = dict(
        temperature=draw(st.sampled_from([1.0, 0.7, 1.6])),
        clip_eps_low=draw(st.sampled_from([0.2, None, 0.0, 0.3])),
        clip_eps_high=draw(st.sampled_from([0.2, None, 0.28])),
        dual_clip=draw(st.sampled_from([None, 3.0])),
        gamma=draw(st.sampled_from([0.5, 0.0, 1.0, 2.0])),
        mis_clip_max=draw(st.sampled_from([None, 2.0])),
        kl_coef=kl_coef,
        entropy_coef=draw(st.sampled_from([0.0, 0.01, -0.02])),
        return_entropy=draw(st.booleans()),
        loss_agg=draw(st.sampled_from(AGG_ALL if batched else AGG_FLAT)),
    )
    if chunked:
        problem.options.update(chunk_tokens=draw(st.integers(1, 16)), chunk_vocab=draw(st.integers(1, 64)))
    return problem


def build(problem: Problem, device="cpu"):
    """(positional args, keyword args) of rlplus_loss for `problem`; float tensors in problem.dtype."""
    g = torch.Generator().manual_seed(problem.seed)
    shape, D, V, dtype = problem.shape, problem.hidden_size, problem.vocab_size, problem.dtype
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    hidden = rand(*shape, D).to(dtype)
    weight = (rand(V, D) * problem.logit_scale / D**0.5).to(dtype)
    bias = rand(V).to(dtype) if problem.with_bias else None
    targets = torch.randint(0, V, shape, generator=g)
    if problem.with_ignored:
        targets[torch.rand(shape, generator=g) < 0.25] = -100
    true_logp = linear_logprobs_reference(hidden, weight, targets, bias=bias,
                                          temperature=problem.options.get("temperature", 1.0))
    spread = problem.log_ratio_spread
    old = (true_logp + spread * rand(*shape)).clamp(max=0) if problem.with_old else None
    adv_shape = shape[:1] if problem.per_sequence_advantages else shape
    kwargs = dict(bias=bias, **problem.options)
    if problem.external == "token":
        kwargs["external_mask"] = torch.rand(shape, generator=g) < 0.4
    elif problem.external == "sequence":
        kwargs["external_mask"] = torch.rand(shape[:1], generator=g) < 0.5
    if problem.with_behavior:
        kwargs["behavior_logprobs"] = (true_logp + spread * rand(*shape)).clamp(max=0)
    if problem.with_loss_mask:
        kwargs["loss_mask"] = torch.rand(shape, generator=g) < 0.7
    if problem.options.get("kl_coef", 0) > 0:
        kwargs["ref_logprobs"] = (true_logp + 0.5 * rand(*shape)).clamp(max=0)
    if problem.normalizer == "tensor":
        kwargs["normalizer"] = torch.tensor(11.0)
    elif problem.normalizer is not None:
        kwargs["normalizer"] = problem.normalizer
    args = [hidden.to(device), weight.to(device), targets.to(device), rand(*adv_shape).to(device),
            None if old is None else old.float().to(device)]
    kwargs["bias"] = None if bias is None else bias.to(device)
    kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return args, kwargs
