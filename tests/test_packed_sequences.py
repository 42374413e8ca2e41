"""Packed (padding-free) [N] inputs with cu_seqlens: the same loss and gradients as the padded [B, T] batch."""

from __future__ import annotations

import pytest
import torch

from reference import rlplus_loss_reference
from rlplus_kernels import RLPlusLoss, rlplus_loss

LENGTHS = [4, 0, 7, 1, 5]  # an empty sequence too
D, V = 6, 23
LOSS_AGG_MODES = ("token-mean", "sum", "seq-mean-token-mean", "seq-mean-token-sum")


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, length = len(LENGTHS), max(LENGTHS)
    padded = dict(
        hidden=torch.randn(batch, length, D, generator=gen, dtype=torch.float64),
        targets=torch.randint(0, V, (batch, length), generator=gen),
        old_logprobs=-torch.rand(batch, length, generator=gen, dtype=torch.float64),
        loss_mask=torch.rand(batch, length, generator=gen) > 0.2,
    )
    padded["targets"][torch.arange(length)[None, :] >= torch.tensor(LENGTHS)[:, None]] = -100
    per_sequence = dict(advantages=torch.randn(batch, generator=gen, dtype=torch.float64),
                        external_mask=torch.tensor([False, False, True, False, True]))
    keep = padded["targets"] != -100
    packed = {k: v[keep] for k, v in padded.items()}
    cu_seqlens = torch.tensor([0] + LENGTHS).cumsum(0)
    weight = torch.randn(V, D, generator=gen, dtype=torch.float64)
    bias = torch.randn(V, generator=gen, dtype=torch.float64)
    return padded, packed, per_sequence, cu_seqlens, weight, bias, keep


@pytest.mark.parametrize("loss_agg", LOSS_AGG_MODES)
def test_packed_matches_padded_and_reference(loss_agg):
    padded, packed, per_sequence, cu_seqlens, weight, bias, keep = _batch()
    kwargs = dict(loss_agg=loss_agg, entropy_coef=0.01, kl_coef=0.0, bias=bias, **per_sequence)
    results = []
    for inputs, extra, fn in ((padded, {}, rlplus_loss), (packed, dict(cu_seqlens=cu_seqlens), rlplus_loss),
                              (packed, dict(cu_seqlens=cu_seqlens), rlplus_loss_reference)):
        hidden = inputs["hidden"].clone().requires_grad_()
        w = weight.clone().requires_grad_()
        rest = {k: v for k, v in inputs.items() if k != "hidden"}
        out = fn(hidden, w, **rest, **kwargs, **extra)
        out.loss.backward()
        grad_hidden = hidden.grad if inputs is packed else hidden.grad[keep]
        logprobs = out.logprobs if inputs is packed else out.logprobs[keep]
        results.append((out.loss.detach(), logprobs, grad_hidden, w.grad))
    padded_result, packed_result, reference = results
    for name, got, want_padded, want_reference in zip(("loss", "logprobs", "grad_hidden", "grad_weight"),
                                                       packed_result, padded_result, reference):
        torch.testing.assert_close(got, want_padded, rtol=1e-12, atol=1e-14, msg=f"{name} vs padded")
        torch.testing.assert_close(got, want_reference, rtol=1e-12, atol=1e-14, msg=f"{name} vs reference")


def test_module_takes_cu_seqlens():
    _, packed, per_sequence, cu_seqlens, weight, bias, _ = _batch(1)
    module = RLPlusLoss(loss_agg="seq-mean-token-mean")
    out = module(packed["hidden"], weight, packed["targets"], per_sequence["advantages"], cu_seqlens=cu_seqlens)
    want = rlplus_loss_reference(packed["hidden"], weight, packed["targets"], per_sequence["advantages"],
                                 loss_agg="seq-mean-token-mean", cu_seqlens=cu_seqlens)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cu_seqlens, error, match", [
    (torch.tensor([0.0, 17.0]), TypeError, "cu_seqlens must be an integer"),
    (torch.tensor([[0, 17]]), ValueError, r"cu_seqlens must be 1-D"),
    (torch.tensor([], dtype=torch.long), ValueError, r"cu_seqlens must be 1-D \[S \+ 1\] with S >= 0"),
    (torch.tensor([0]), ValueError, "end at N = 17"),  # no sequence, but 17 tokens
    (torch.tensor([1, 17]), ValueError, "cu_seqlens must start at 0"),
    (torch.tensor([0, 16]), ValueError, "end at N = 17"),
    (torch.tensor([0, 9, 4, 17]), ValueError, "never decrease"),
])
def test_bad_cu_seqlens_is_refused(cu_seqlens, error, match):
    _, packed, per_sequence, _, weight, _, _ = _batch()
    with pytest.raises(error, match=match):
        rlplus_loss(packed["hidden"], weight, packed["targets"], packed["old_logprobs"], cu_seqlens=cu_seqlens)


def test_cu_seqlens_rules():
    padded, packed, per_sequence, cu_seqlens, weight, _, _ = _batch()
    with pytest.raises(ValueError, match="cu_seqlens describes packed"):
        rlplus_loss(padded["hidden"], weight, padded["targets"], per_sequence["advantages"], cu_seqlens=cu_seqlens)
    with pytest.raises(ValueError, match="cu_seqlens"):  # a seq mode on [N] inputs needs it
        rlplus_loss(packed["hidden"], weight, packed["targets"], packed["old_logprobs"],
                    loss_agg="seq-mean-token-sum")
    with pytest.raises(ValueError, match=r"advantages must have shape \[17\], got \[5\]"):  # [S] needs cu_seqlens
        rlplus_loss(packed["hidden"], weight, packed["targets"], per_sequence["advantages"])
    with pytest.raises(ValueError, match=r"advantages must have shape \[17\] or \[5\]"):
        rlplus_loss(packed["hidden"], weight, packed["targets"], per_sequence["advantages"][:4],
                    cu_seqlens=cu_seqlens)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.uint8], ids=str)
def test_cu_seqlens_of_any_integer_dtype(dtype):
    _, packed, per_sequence, cu_seqlens, weight, _, _ = _batch()
    args = (packed["hidden"], weight, packed["targets"], per_sequence["advantages"])
    want = rlplus_loss(*args, cu_seqlens=cu_seqlens, loss_agg="seq-mean-token-mean").loss
    assert torch.equal(rlplus_loss(*args, cu_seqlens=cu_seqlens.to(dtype), loss_agg="seq-mean-token-mean").loss, want)


def test_per_token_tensors_are_read_per_token_when_there_are_as_many_sequences_as_tokens():
    """S == N (only with empty sequences): an [N] tensor is read per token, as docs/distributed.md says."""
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(6, D, generator=gen, dtype=torch.float64), torch.randn(V, D, generator=gen,
                                                                                         dtype=torch.float64)
    targets, advantages = torch.randint(0, V, (6,), generator=gen), torch.randn(6, generator=gen, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 0, 2, 2, 3, 3, 6])
    got = rlplus_loss(hidden, weight, targets, advantages, cu_seqlens=cu_seqlens).loss
    torch.testing.assert_close(got, rlplus_loss(hidden, weight, targets, advantages).loss, rtol=1e-12, atol=1e-14)
    want = rlplus_loss_reference(hidden, weight, targets, advantages, cu_seqlens=cu_seqlens).loss
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
