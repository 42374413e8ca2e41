"""Every bad input of SPEC.md section 3 raises ValueError/TypeError naming the argument, before any work."""

from __future__ import annotations

import os
import re

import pytest
import torch

from helpers import CountMatmuls
from rlplus_kernels import RLPlusLoss, linear_logprobs, rlplus_loss

N, D, V = 6, 4, 11


def good(**overrides):
    kwargs = dict(hidden=torch.randn(N, D), weight=torch.randn(V, D), targets=torch.randint(0, V, (N,)),
                  advantages=torch.randn(N))
    kwargs.update(overrides)
    return kwargs


def freed(x: torch.Tensor, nbytes: int = 0) -> torch.Tensor:
    """x with its storage cut to nbytes, as FSDP1 leaves a gathered parameter outside its unit's forward."""
    x.untyped_storage().resize_(nbytes)
    return x


def partitioned(shape) -> torch.Tensor:
    """What DeepSpeed ZeRO-3 leaves of a parameter outside the forward that reads it: empty, with its ds_shape."""
    x = torch.empty(0)
    x.ds_shape = torch.Size(shape)
    return x


def batched(**overrides):
    return good(**{**dict(hidden=torch.randn(2, 3, D), targets=torch.randint(0, V, (2, 3)),
                          advantages=torch.randn(2, 3)), **overrides})


CASES = [
    # (description, kwargs, exception, words the message must contain)
    ("hidden 1-D", good(hidden=torch.randn(D)), ValueError, "hidden"),
    ("hidden 4-D", good(hidden=torch.randn(1, 2, 3, D), targets=torch.zeros(1, 2, 3, dtype=torch.long),
                        advantages=torch.randn(1, 2, 3)), ValueError, "hidden must be 2-D [N, D] or 3-D [B, T, D]"),
    ("hidden not a tensor", good(hidden=[[0.0] * D] * N), TypeError, "hidden"),
    ("weight 1-D", good(weight=torch.randn(V)), ValueError,
     "weight must be 2-D [V, D], got shape [11]. A 1-D weight is what FSDP1 (FullyShardedDataParallel) with "
     "use_orig_params=True leaves"),
    ("weight 3-D", good(weight=torch.randn(V, D, 1)), ValueError, "weight must be 2-D [V, D], got shape [11, 4, 1]"),
    ("weight freed", good(weight=freed(torch.randn(V, D))), ValueError,
     "weight's storage holds 0 bytes, fewer than its shape [11, 4] and strides [4, 1] reach: its memory was freed. "
     "FSDP1 (FullyShardedDataParallel) frees a unit's gathered parameters"),
    ("bias one element short", good(bias=freed(torch.randn(V), nbytes=(V - 1) * 4)), ValueError,
     "bias's storage holds 40 bytes, fewer than its shape [11] and strides [1] reach: its memory was freed. FSDP1"),
    ("weight partitioned by ZeRO-3", good(weight=partitioned((V, D))), ValueError,
     "weight is a parameter that DeepSpeed ZeRO-3 has partitioned (shape [11, 4], this rank holds [0]): ZeRO-3 "
     "gathers a parameter where it is read during the forward of the engine's module"),
    ("hidden freed", good(hidden=freed(torch.randn(N, D))), ValueError,
     "hidden's storage holds 0 bytes, fewer than its shape [6, 4] and strides [4, 1] reach: its memory was freed"),
    ("advantages freed", good(advantages=freed(torch.randn(N))), ValueError, "advantages's storage holds 0 bytes"),
    ("hidden size mismatch", good(weight=torch.randn(V, D + 1)), ValueError, "weight.shape[1]"),
    ("bias wrong shape", good(bias=torch.randn(V + 1)), ValueError, "bias"),
    ("float targets", good(targets=torch.zeros(N)), TypeError, "targets"),
    ("bool targets", good(targets=torch.zeros(N, dtype=torch.bool)), TypeError, "targets"),
    ("targets wrong shape", good(targets=torch.zeros(N + 1, dtype=torch.long)), ValueError, "targets"),
    ("target >= V", good(targets=torch.full((N,), V)), ValueError, "targets"),
    ("negative target", good(targets=torch.full((N,), -3)), ValueError, "targets"),
    ("target -1 with the default ignore_index", good(targets=torch.full((N,), -1)), ValueError,
     "targets must lie in [0, 11) or equal ignore_index=-100, found -1"),
    ("advantages wrong shape", good(advantages=torch.randn(N + 1)), ValueError, "advantages"),
    ("advantages integer", good(advantages=torch.ones(N, dtype=torch.long)), TypeError, "advantages"),
    ("per-sequence advantages on flat input", good(advantages=torch.randn(1)), ValueError, "advantages"),
    ("old_logprobs wrong shape", good(old_logprobs=torch.randn(N, 1)), ValueError, "old_logprobs"),
    ("old_logprobs integer", good(old_logprobs=torch.zeros(N, dtype=torch.int32)), TypeError, "old_logprobs"),
    ("per-sequence old_logprobs", batched(old_logprobs=-torch.rand(2)), ValueError,
     "old_logprobs must have shape [2, 3], got [2]"),
    ("behavior_logprobs integer", good(behavior_logprobs=torch.zeros(N, dtype=torch.long)), TypeError,
     "behavior_logprobs must be a floating-point tensor"),
    ("behavior_logprobs wrong shape", good(behavior_logprobs=torch.randn(2)), ValueError, "behavior_logprobs"),
    ("ref_logprobs integer", good(ref_logprobs=torch.zeros(N, dtype=torch.long), kl_coef=0.1), TypeError,
     "ref_logprobs"),
    ("loss_mask complex", good(loss_mask=torch.zeros(N, dtype=torch.complex64)), TypeError, "loss_mask"),
    ("loss_mask wrong shape", good(loss_mask=torch.ones(N + 2, dtype=torch.bool)), ValueError, "loss_mask"),
    ("external_mask wrong shape", good(external_mask=torch.ones(3, dtype=torch.bool)), ValueError, "external_mask"),
    ("weight dtype differs", good(weight=torch.randn(V, D, dtype=torch.float64)), TypeError, "weight"),
    ("bias dtype differs", good(bias=torch.randn(V, dtype=torch.float16)), TypeError, "bias"),
    ("integer hidden", good(hidden=torch.ones(N, D, dtype=torch.long), weight=torch.ones(V, D, dtype=torch.long)),
     TypeError, "hidden"),
    ("zero temperature", good(temperature=0.0), ValueError, "temperature"),
    ("negative temperature", good(temperature=-1.0), ValueError, "temperature"),
    ("infinite temperature", good(temperature=float("inf")), ValueError, "temperature"),
    ("nan temperature", good(temperature=float("nan")), ValueError, "temperature"),
    ("negative clip_eps_low", good(clip_eps_low=-0.1), ValueError, "clip_eps_low"),
    ("negative clip_eps_high", good(clip_eps_high=-0.1), ValueError, "clip_eps_high"),
    ("dual_clip = 1", good(dual_clip=1.0), ValueError, "dual_clip"),
    ("negative gamma", good(gamma=-0.5), ValueError, "gamma"),
    ("negative kl_coef", good(kl_coef=-0.1, ref_logprobs=-torch.rand(N)), ValueError, "kl_coef"),
    ("chunk_tokens 0", good(chunk_tokens=0), ValueError, "chunk_tokens"),
    ("chunk_vocab negative", good(chunk_vocab=-4), ValueError, "chunk_vocab"),
    ("weight without rows", good(weight=torch.randn(0, D)), ValueError, "weight"),
    ("hidden size 0", good(hidden=torch.randn(N, 0), weight=torch.randn(V, 0)), ValueError, "weight"),
    ("mis_clip_max = 0", good(mis_clip_max=0.0), ValueError, "mis_clip_max"),
    ("kl without ref_logprobs", good(kl_coef=0.1), ValueError, "ref_logprobs"),
    ("small kl without ref_logprobs", good(kl_coef=1e-3), ValueError, "kl_coef=0.001 > 0 needs ref_logprobs"),
    ("unknown loss_agg", good(loss_agg="mean"), ValueError, "loss_agg"),
    ("seq mode on flat input", good(loss_agg="seq-mean-token-mean"), ValueError, "loss_agg"),
    ("seq mode (token-sum) on flat input", good(loss_agg="seq-mean-token-sum"), ValueError, "loss_agg"),
    ("normalizer 0", good(normalizer=0), ValueError, "normalizer"),
    ("normalizer negative", good(normalizer=-4.0), ValueError, "normalizer"),
    ("normalizer string", good(normalizer="8192"), TypeError, "normalizer"),
    ("normalizer bool", good(normalizer=True), TypeError, "normalizer must be a positive number or a 0-dim tensor"),
    ("normalizer 1-D tensor", good(normalizer=torch.ones(2)), ValueError, "normalizer"),
    ("normalizer inf", good(normalizer=float("inf")), ValueError, "normalizer"),
    ("normalizer tensor negative", good(normalizer=torch.tensor(-1.0)), ValueError, "normalizer"),
    ("normalizer tensor 0 with valid tokens", good(normalizer=torch.tensor(0.0)), ValueError, "normalizer"),
    ("normalizer tensor nan", good(normalizer=torch.tensor(float("nan"))), ValueError, "normalizer"),
    ("unknown backend", good(backend="cuda"), ValueError, "backend"),
    ("ignore_index beyond int64", good(ignore_index=2**64), ValueError, "ignore_index"),
    ("ignore_index 2^63", good(ignore_index=2**63), ValueError, "ignore_index must fit in int64"),
    ("ignore_index below int64", good(ignore_index=-2**63 - 1), ValueError, "ignore_index must fit in int64"),
    ("chunk_tokens bool", good(chunk_tokens=True), ValueError, "chunk_tokens must be a positive int or None"),
    ("string return_entropy", good(return_entropy="no"), TypeError, "return_entropy"),
    ("per-sequence advantages wrong length", batched(advantages=torch.randn(3)), ValueError, "advantages"),
    ("string gamma", good(gamma="0.5"), TypeError, "gamma"),
    ("advantages None", good(advantages=None), TypeError, "advantages must be a torch.Tensor, got None"),
    ("boolean normalizer tensor", good(normalizer=torch.tensor(True)), TypeError,
     "normalizer must be a real number tensor"),
    ("cu_seqlens on meta", good(cu_seqlens=torch.tensor([0, N], device="meta")), ValueError, "cu_seqlens is on meta"),
    ("normalizer on meta", good(normalizer=torch.tensor(3.0, device="meta")), ValueError, "normalizer is on meta"),
    *[(f"{name} on meta", good(**{name: torch.zeros(N, device="meta")}, kl_coef=0.1, ref_logprobs=-torch.rand(N)),
       ValueError, f"{name} is on meta but targets is on cpu")
      for name in ("old_logprobs", "behavior_logprobs", "external_mask", "loss_mask")],
    ("ref_logprobs on meta", good(kl_coef=0.1, ref_logprobs=torch.zeros(N, device="meta")), ValueError,
     "ref_logprobs is on meta but targets is on cpu"),
    *[(f"{name} sparse", good(**{name: good()[name].to_sparse()}), TypeError,
       f"{name} must be a dense tensor, got layout torch.sparse_coo (call {name}.to_dense())")
      for name in ("hidden", "weight", "advantages")],
    ("targets uint64", good(targets=torch.randint(0, V, (N,)).to(getattr(torch, "uint64", torch.int64))), TypeError,
     "targets must be an integer tensor that int64 holds, got torch.uint64"),
    *[(f"{name} past float32's range", good(**{name: 1e39}, ref_logprobs=-torch.rand(N)), ValueError,
       f"{name} must lie within float32's range (+-3.403e+38), got 1e+39") for name in ("kl_coef", "entropy_coef")],
    *[(f"{name} past float's range", good(**{name: 10**400}), ValueError,
       f"{name} must be finite, got an integer of 1329 bits, past float's range")
      for name in ("gamma", "temperature", "normalizer", "mis_clip_max")],
    *[(f"{value} {name}", good(**{name: float(value)}), ValueError, name)
      for name in ("kl_coef", "gamma", "entropy_coef", "clip_eps_low", "clip_eps_high", "dual_clip", "mis_clip_max")
      for value in ("nan", "inf", "-inf")],
]


@pytest.mark.parametrize("description,kwargs,error,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_argument(description, kwargs, error, words):
    hidden = kwargs["hidden"]
    if isinstance(hidden, torch.Tensor) and hidden.is_floating_point():
        hidden.requires_grad_()
    with CountMatmuls() as counter, pytest.raises(error, match=re.escape(words)):
        rlplus_loss(**kwargs)
    assert counter.count == 0, "refused only after the logits' GEMMs ran"


def test_module_refuses_bad_hyper_parameters_at_construction():
    with pytest.raises(ValueError, match="dual_clip"):
        RLPlusLoss(dual_clip=0.5)
    with pytest.raises(ValueError, match="loss_agg"):
        RLPlusLoss(loss_agg="tokens")
    with pytest.raises(ValueError, match="normalizer"):
        RLPlusLoss(normalizer=0)
    with pytest.raises(ValueError, match="normalizer"):
        RLPlusLoss(normalizer=torch.ones(2))
    # a misspelt hyper-parameter, or a per-batch tensor given to the constructor: named, with what it takes
    for keyword in ("clip_eps", "external_mask"):
        with pytest.raises(TypeError, match=re.escape(f"RLPlusLoss got unknown keyword(s) ['{keyword}']: it takes the "
                                                      "hyper-parameters kl_coef, temperature, clip_eps_low")):
            RLPlusLoss(**{keyword: 0.2})


def test_numpy_scalars_are_numbers():
    """Hyper-parameters read from a config through numpy are the same numbers as Python's."""
    np = pytest.importorskip("numpy")
    kwargs = good(old_logprobs=-torch.rand(N), external_mask=torch.rand(N) < 0.5)
    kwargs["targets"][0] = -1
    numpy_values = dict(clip_eps_low=np.float32(0.25), clip_eps_high=np.float64(0.3), gamma=np.float16(0.5),
                        temperature=np.float32(0.75), entropy_coef=np.float64(0.01), ignore_index=np.int64(-1),
                        chunk_vocab=np.int32(4), normalizer=np.int64(7), backend="torch")
    python_values = {k: v.item() if isinstance(v, np.generic) else v for k, v in numpy_values.items()}
    got = rlplus_loss(**kwargs, **numpy_values)
    assert torch.equal(got.loss, rlplus_loss(**kwargs, **python_values).loss)
    with pytest.raises(TypeError, match="ignore_index"):
        rlplus_loss(**kwargs, ignore_index=np.float32(-1))


def test_linear_logprobs_validates_too():
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(torch.randn(N, D), torch.randn(V, D), torch.full((N,), V))
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(torch.randn(N, D), torch.randn(V, D), torch.zeros(N, dtype=torch.long), temperature=0)


def test_float64_is_refused_by_the_triton_backend():
    with pytest.raises(TypeError, match="hidden"):
        rlplus_loss(**good(hidden=torch.randn(N, D, dtype=torch.float64), weight=torch.randn(V, D, dtype=torch.float64),
                           backend="triton"))


def test_triton_on_cpu_without_the_interpreter_says_how(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        rlplus_loss(**good(backend="triton"))
    assert os.environ["TRITON_INTERPRET"] == "0"


def test_auto_without_triton_falls_back_to_torch_and_triton_says_what_is_missing(monkeypatch):
    from rlplus_kernels import backends

    assert backends.resolve_backend("auto", torch.device("cuda")) == (
        "triton" if backends.triton_installed() else "torch")
    monkeypatch.setattr(backends, "triton_installed", lambda: False)
    assert backends.resolve_backend("auto", torch.device("cuda")) == "torch"
    with pytest.raises(ValueError, match="backend='triton' needs the triton package"):
        rlplus_loss(**good(backend="triton"))


def test_ignore_index_out_of_range_is_allowed():
    out = rlplus_loss(**good(targets=torch.tensor([0, -100, 3, -100, 10, 1])))
    assert out.metrics["num_tokens"].item() == 4


def test_tensors_on_different_devices():
    """The meta device stands in for a second device: the check must fire before any computation."""
    with pytest.raises(ValueError, match="weight"):
        rlplus_loss(**good(weight=torch.randn(V, D, device="meta")))
    with pytest.raises(ValueError, match="targets"):
        rlplus_loss(**good(targets=torch.zeros(N, dtype=torch.long, device="meta")))
    with pytest.raises(ValueError, match="advantages"):
        rlplus_loss(**good(advantages=torch.randn(N, device="meta")))


def test_a_normalizer_counted_on_the_cpu_is_taken_to_the_inputs_device():
    """A 0-dim count on the CPU serves inputs on any device (meta stands in for a GPU): it is moved, not refused;
    one on another non-CPU device is refused (the "normalizer on meta" case above)."""
    from rlplus_kernels.validation import check_normalizer

    moved = check_normalizer(torch.tensor(3.0), torch.device("meta"))
    assert moved.device.type == "meta" and moved.shape == ()
