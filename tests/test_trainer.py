"""The transformers wrapper (rlplus_kernels.trainer) against the float64 reference.

The reference is fed the model's own logits (``model(...).logits``, through the model's own
LM-head path) as ``hidden`` with an identity ``weight``, so that it materialises exactly
those logits; the wrapper instead runs the backbone and streams the head.
"""

import math
import re
from types import SimpleNamespace

import pytest
import torch
from torch import nn

transformers = pytest.importorskip(
    "transformers", reason="the trainer wrapper needs transformers (pip install rlplus-kernels[train])")
if not transformers.is_torch_available():  # transformers 5 turns its models off below torch 2.6
    pytest.skip(f"transformers {transformers.__version__} has its models off with torch {torch.__version__}",
                allow_module_level=True)

from helpers import major_minor  # noqa: E402
from reference import linear_logprobs_reference, rlplus_loss_reference  # noqa: E402

from rlplus_kernels import OFFICIAL_RECIPE  # noqa: E402
from rlplus_kernels.trainer import (  # noqa: E402
    RLPlusTrainer, build_group_batch, check_plain_linear_head, rlplus_model_loss,
    score_logprobs, target_mask, verify_head)
from rlplus_kernels.trainer.model_head import (  # noqa: E402
    disable_dropout, get_backbone, get_lm_head, position_ids_from_mask)

VOCAB = 50
TINY = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


def make_model(arch: str, tied: bool, dtype=torch.float64, seed: int = 0):
    torch.manual_seed(seed)
    if arch == "llama":
        config = transformers.LlamaConfig(**TINY, tie_word_embeddings=tied, initializer_range=0.2)
        model = transformers.LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = transformers.Qwen2Config(**TINY, tie_word_embeddings=tied, initializer_range=0.2)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        raise AssertionError(arch)
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    return model.to(dtype).eval()  # eval: no dropout, deterministic


def model_logits(model, input_ids, attention_mask):
    pos = position_ids_from_mask(attention_mask)
    return model(input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False).logits


def padded_batch(batch_size=5, seq_len=9, seed=1, padding_side="right"):
    """Random sequences of different lengths, padded on one side, with prompt/completion masks.

    The real tokens of row i are the same whatever the padding side.
    """
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (batch_size, seq_len), generator=g)
    input_ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, seq_len, dtype=torch.long)
    loss_mask = torch.zeros(batch_size, seq_len, dtype=torch.bool)
    lengths = [seq_len, seq_len - 3, seq_len - 1, 4, seq_len - 2][:batch_size]
    prompt_lens = [3, 2, 4, 2, 3][:batch_size]
    for i, (n, p) in enumerate(zip(lengths, prompt_lens)):
        start = 0 if padding_side == "right" else seq_len - n
        input_ids[i, start:start + n] = tokens[i, :n]
        attention_mask[i, start:start + n] = 1
        loss_mask[i, start + p:start + n] = True
    return input_ids, attention_mask, loss_mask


def reference_from_logits(model, input_ids, attention_mask, loss_mask, advantages, old_logprobs,
                          **kw):
    """The float64 reference on ``model(...).logits`` (identity head), shifted by hand."""
    logits = model_logits(model, input_ids, attention_mask)[:, :-1]
    eye = torch.eye(logits.shape[-1], dtype=logits.dtype)
    valid = (loss_mask[:, 1:] & attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool())
    targets = input_ids[:, 1:].masked_fill(~valid, -100)
    shift = lambda x: x if x is None or x.dim() == 1 else x[:, 1:]  # noqa: E731
    for key in ("external_mask", "behavior_logprobs", "ref_logprobs"):
        kw[key] = shift(kw.get(key))
    return rlplus_loss_reference(logits, eye, targets, shift(advantages), shift(old_logprobs), **kw)


def param_grads(model):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def assert_close_grads(got, want, rtol=1e-9, atol=1e-11):
    for name in want:
        g, w = got[name], want[name]
        if not torch.allclose(g, w, rtol=rtol, atol=atol):
            i = (g - w).abs().argmax()
            raise AssertionError(f"grad of {name}: worst element {i.item()}: got "
                                 f"{g.flatten()[i].item()!r}, want {w.flatten()[i].item()!r}")


@pytest.mark.parametrize("arch,tied", [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True)])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("with_old", [False, True])
def test_loss_and_grads_match_reference(arch, tied, padding_side, with_old):
    model = make_model(arch, tied)
    input_ids, attention_mask, loss_mask = padded_batch(padding_side=padding_side)
    B, T = input_ids.shape
    g = torch.Generator().manual_seed(2)
    advantages = torch.randn(B, generator=g, dtype=torch.float64)
    external_mask = torch.tensor([False, True, False, False, True])
    old = None
    if with_old:
        with torch.no_grad():
            old = score_logprobs(model, input_ids, attention_mask).double()
        old = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    hyper = dict(OFFICIAL_RECIPE, normalizer=7.0, clip_eps_low=0.2, clip_eps_high=0.28,
                 temperature=0.9, entropy_coef=0.01)

    model.zero_grad()
    out = rlplus_model_loss(model, input_ids, attention_mask, loss_mask, advantages, old,
                            external_mask=external_mask, **hyper)
    out.loss.backward()
    got = param_grads(model)

    model.zero_grad()
    ref = reference_from_logits(model, input_ids, attention_mask, loss_mask, advantages, old,
                                external_mask=external_mask, **hyper)
    ref.loss.backward()
    want = param_grads(model)

    torch.testing.assert_close(out.loss.double(), ref.loss.double(), rtol=1e-9, atol=1e-12)
    assert out.logprobs.shape == (B, T) and out.entropy.shape == (B, T)
    assert (out.logprobs[:, 0] == 0).all()
    torch.testing.assert_close(out.logprobs[:, 1:].double(), ref.logprobs.double(), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.entropy[:, 1:].double(), ref.entropy.double(), rtol=1e-9, atol=1e-10)
    for key in ("num_tokens", "num_external_tokens"):
        assert int(out.metrics[key]) == int(ref.metrics[key])
    assert_close_grads(got, want)
    assert any(v.abs().sum() > 0 for v in got.values())


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_the_head_sees_only_target_rows_and_the_loss_stays_the_references(loss_agg, monkeypatch):
    """rlplus_model_loss hands rlplus_loss only the rows that predict a target (no prompt, no padding),
    packed per sequence: the loss, log-probs and gradients of the reference over the whole padded batch,
    in every aggregation (a sequence without a target token included), from fewer head rows."""
    import rlplus_kernels

    seen = []

    def recording(hidden, *args, **kwargs):
        seen.append(hidden.shape[0])
        return original(hidden, *args, **kwargs)

    original = rlplus_kernels.rlplus_loss
    monkeypatch.setattr(rlplus_kernels, "rlplus_loss", recording)
    model = make_model("qwen2", tied=True)
    input_ids, attention_mask, loss_mask = padded_batch(padding_side="left")
    loss_mask[3] = False  # a sequence with no target token
    advantages = torch.randn(input_ids.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hyper = dict(loss_agg=loss_agg, entropy_coef=0.01)
    model.zero_grad()
    out = rlplus_model_loss(model, input_ids, attention_mask, loss_mask, advantages, **hyper)
    out.loss.backward()
    got = param_grads(model)
    model.zero_grad()
    ref = reference_from_logits(model, input_ids, attention_mask, loss_mask, advantages, None, **hyper)
    ref.loss.backward()
    targets = int(target_mask(input_ids, attention_mask, loss_mask).sum())
    assert seen == [targets] and targets < input_ids[:, 1:].numel() // 2
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.logprobs[:, 1:].double(), ref.logprobs.double(), rtol=1e-9, atol=1e-10)
    assert_close_grads(got, param_grads(model))


def test_a_nan_hidden_state_at_padding_reaches_no_gradient():
    """A backbone that leaves NaN in the hidden states of padding positions (as a fully masked attention
    row can): the head never sees those rows, so the loss, log-probs and every gradient stay finite."""
    model = make_model("llama", tied=False, dtype=torch.float32)
    input_ids, attention_mask, loss_mask = padded_batch(padding_side="left")
    padding = attention_mask == 0
    model.model.norm.register_forward_hook(lambda module, args, output: output.masked_fill(padding[..., None],
                                                                                         float("nan")))
    out = rlplus_model_loss(model, input_ids, attention_mask, loss_mask, torch.randn(input_ids.shape[0]))
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach())) and torch.isfinite(out.logprobs).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(score_logprobs(model, input_ids, attention_mask)).all()


def test_per_token_tensors_kl_behavior():
    """[B, T] advantages/external mask, behaviour and reference log-probs, KL, token-mean."""
    model = make_model("llama", tied=True)
    input_ids, attention_mask, loss_mask = padded_batch(padding_side="left")
    B, T = input_ids.shape
    g = torch.Generator().manual_seed(3)
    advantages = torch.randn(B, T, generator=g, dtype=torch.float64)
    external_mask = torch.rand(B, T, generator=g) < 0.5
    behavior = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    refl = score_logprobs(model, input_ids, attention_mask).double() - 0.1
    hyper = dict(kl_coef=0.05, gamma=0.7, mis_clip_max=3.0, dual_clip=3.0, loss_agg="token-mean")
    kw = dict(external_mask=external_mask, behavior_logprobs=behavior, ref_logprobs=refl, **hyper)

    model.zero_grad()
    out = rlplus_model_loss(model, input_ids, attention_mask, loss_mask, advantages, None, **kw)
    out.loss.backward()
    got = param_grads(model)
    model.zero_grad()
    ref = reference_from_logits(model, input_ids, attention_mask, loss_mask, advantages, None, **kw)
    ref.loss.backward()
    torch.testing.assert_close(out.loss.double(), ref.loss.double(), rtol=1e-9, atol=1e-12)
    assert_close_grads(got, param_grads(model))


@pytest.mark.parametrize("arch,tied", [("llama", False), ("qwen2", True)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_score_logprobs_equals_model_logits(arch, tied, temperature):
    model = make_model(arch, tied)
    input_ids, attention_mask, _ = padded_batch(padding_side="left")
    got = score_logprobs(model, input_ids, attention_mask, temperature=temperature)
    assert not got.requires_grad
    with torch.no_grad():
        logits = model_logits(model, input_ids, attention_mask)
    want = torch.log_softmax(logits[:, :-1] / temperature, -1).gather(-1, input_ids[:, 1:, None])[..., 0]
    valid = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()
    want = torch.nn.functional.pad(torch.where(valid, want, 0.0), (1, 0))
    torch.testing.assert_close(got.double(), want, rtol=1e-9, atol=1e-10)
    # same helper as the reference's linear_logprobs
    torch.testing.assert_close(
        got[:, 1:], linear_logprobs_reference(logits[:, :-1], torch.eye(VOCAB, dtype=logits.dtype),
                                              input_ids[:, 1:].masked_fill(~valid, -100),
                                              temperature=temperature).to(got.dtype),
        rtol=1e-9, atol=1e-10)


def test_left_and_right_padding_agree():
    """Position ids follow the mask, so a sequence scores the same whatever the padding."""
    model = make_model("qwen2", tied=False)
    ids_r, am_r, _ = padded_batch(padding_side="right")
    ids_l, am_l, _ = padded_batch(padding_side="left")
    lp_r = score_logprobs(model, ids_r, am_r)
    lp_l = score_logprobs(model, ids_l, am_l)
    for i in range(ids_r.shape[0]):
        # float64: the padding moves where the masked keys sit, so only the sums' order may differ
        torch.testing.assert_close(lp_r[i][am_r[i].bool()], lp_l[i][am_l[i].bool()], rtol=1e-12, atol=1e-12)


def test_score_logprobs_counts_positions_from_the_first_real_token():
    """GPT-2 learns absolute positions (RoPE models are shift-invariant and cannot tell): a padded row scores as
    the same row alone, whichever side the padding is on."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)).double().eval()
    for side in ("left", "right"):
        input_ids, attention_mask, _ = padded_batch(padding_side=side)
        got = score_logprobs(model, input_ids, attention_mask)
        for row, mask in zip(range(input_ids.shape[0]), attention_mask.bool()):
            real = input_ids[row][mask]
            with torch.no_grad():
                logits = model(real[None]).logits[0, :-1]
            want = torch.log_softmax(logits, -1).gather(-1, real[1:, None])[:, 0]
            torch.testing.assert_close(got[row][mask][1:].double(), want, rtol=1e-9, atol=1e-10, msg=side)


def test_refuses_soft_capped_and_scaled_logits():
    cfg = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                    head_dim=16, final_logit_softcapping=30.0)
    gemma = transformers.Gemma2ForCausalLM(cfg)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        check_plain_linear_head(gemma)
    ids = torch.randint(0, VOCAB, (1, 4))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        rlplus_model_loss(gemma, ids, None, None, torch.ones(1))
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        score_logprobs(gemma, ids)
    gemma.config.final_logit_softcapping = None  # a plain head again
    verify_head(gemma)

    # RecurrentGemma names its cap differently; at its random init the capped logits are so close to
    # the plain ones that verify_head alone would not see it
    recurrent = transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, lru_width=32, block_types=["recurrent"], logits_soft_cap=30.0))
    with pytest.raises(ValueError, match="logits_soft_cap"):
        check_plain_linear_head(recurrent)

    xlstm = transformers.xLSTMForCausalLM(transformers.xLSTMConfig(
        vocab_size=VOCAB, hidden_size=32, embedding_dim=32, num_heads=2, num_blocks=1, output_logit_soft_cap=30.0))
    with pytest.raises(ValueError, match="output_logit_soft_cap"):
        check_plain_linear_head(xlstm)

    cohere = transformers.CohereForCausalLM(transformers.CohereConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, logit_scale=0.0625))
    with pytest.raises(ValueError, match="logit_scale"):
        check_plain_linear_head(cohere)


class _StubModel(nn.Module):
    """A model with the given config and head (default an nn.Linear), for head discovery alone; no
    base_model_prefix, so its backbone is what get_decoder() returns."""
    base_model_prefix = ""

    def __init__(self, config, head=None):
        super().__init__()
        self.head, self.decoder = nn.Linear(8, VOCAB, bias=False) if head is None else head, nn.Identity()
        if config is not None:
            self.config = config

    def get_output_embeddings(self):
        return self.head

    def get_decoder(self):
        return self.decoder


@pytest.mark.parametrize("config,refused", [
    (SimpleNamespace(text_config=SimpleNamespace(final_logit_softcapping=30.0)), True),  # a multimodal config
    (SimpleNamespace(text_config={"final_logit_softcapping": 30.0}), True),  # its text config kept as a dict
    (SimpleNamespace(text_config={"final_logit_softcapping": None}), False),
    (SimpleNamespace(logits_scaling=1.0, logit_scale=1), False),  # scales of 1 change nothing
    (SimpleNamespace(logit_scale=2), True),
    (SimpleNamespace(decoder=SimpleNamespace(logit_scale=2.0)), True),  # an encoder-decoder's decoder config
    (SimpleNamespace(final_logit_softcapping=False), False),  # a flag that is off
    (SimpleNamespace(final_logit_softcapping=1.0), True),  # a cap of 1 still caps, unlike a scale of 1
    (SimpleNamespace(logits_mup_width_multiplier=24.0), True),  # Inkling divides the hidden state by it
    (SimpleNamespace(logits_mup_width_multiplier=1.0), False),
    (SimpleNamespace(unpadded_vocab_size=60, vocab_size=64), True),  # Inkling keeps the first 60 logits
    (SimpleNamespace(text_config={"unpadded_vocab_size": 64, "vocab_size": 64}), False),  # a cut of nothing
    (SimpleNamespace(unpadded_vocab_size=60), True),  # against an unknown vocabulary size
    (None, False),  # no config at all: verify_head is the check
], ids=["text_config", "text_config-dict", "dict-unset", "scales-of-1", "scale-2", "decoder", "cap-off", "cap-1",
        "mup-24", "mup-1", "vocab-cut", "vocab-cut-of-nothing", "vocab-cut-unknown-size", "no-config"])
def test_logit_post_processing_is_found_in_the_text_config_too(config, refused):
    model = _StubModel(config)
    if refused:
        with pytest.raises(ValueError, match="not a plain linear map"):
            check_plain_linear_head(model)
    else:
        check_plain_linear_head(model)


class _HeadOfWeight(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = nn.Parameter(weight)


def test_head_and_backbone_discovery_beyond_transformers_defaults():
    """A backbone found through get_decoder() when base_model_prefix names none; an output embedding whose
    weight is not 2-D refused by name; disable_dropout counts the non-zero rates it zeroed, modules and config."""
    model = _StubModel(None)
    assert get_backbone(model) is model.decoder
    for check in (get_lm_head, check_plain_linear_head):  # a config without post-processing: the head itself
        with pytest.raises(ValueError, match="has no 2-D `weight`"):
            check(_StubModel(None, head=_HeadOfWeight(torch.randn(6))))
    dropouts = nn.Sequential(nn.Dropout(0.1), nn.Dropout(0.0), nn.Linear(2, 2))
    dropouts.config = SimpleNamespace(attention_dropout=0.1, hidden_dropout=0.0)
    assert disable_dropout(dropouts) == 2 and disable_dropout(dropouts) == 0


def test_dropout_rates_in_a_text_config_dict_are_zeroed():
    model = _StubModel(SimpleNamespace(attention_dropout=0.1, text_config={"attention_dropout": 0.1, "hidden": 8}))
    RLPlusTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), verify_model_head=False)
    assert model.config.attention_dropout == 0.0 and model.config.text_config["attention_dropout"] == 0.0


_TRAIN_NOISE_MODELS = {
    "opt-layerdrop": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=4, num_attention_heads=2,
        word_embed_proj_dim=16, layerdrop=0.5)),
    "mixtral-router-jitter": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.5)),
}


@pytest.mark.parametrize("arch", sorted(_TRAIN_NOISE_MODELS))
def test_train_mode_noise_that_a_rate_turns_off_is_off(arch):
    """OPT's layerdrop (a layer skipped at random) and a MoE router's jitter were left on by disable_dropout:
    at unchanged parameters, train-mode forwards differed (ratio_mean 1.0098, 0.9939 at lr=0 for OPT)."""
    torch.manual_seed(0)
    model = _TRAIN_NOISE_MODELS[arch]().train()  # float32: Mixtral's experts take no float64
    ids = torch.randint(3, VOCAB, (2, 8))

    def twice_equal():
        with torch.no_grad():
            return all(torch.equal(model(ids).logits, model(ids).logits) for _ in range(4))

    assert not twice_equal(), "the noise this test turns off is not there"
    assert disable_dropout(model) >= 1
    assert twice_equal()


def test_a_routing_threshold_named_jitter_is_kept():
    """PhiMoE's router reads `router_jitter_noise` as a threshold in eval mode too: it is not noise to zero,
    while its `input_jitter_noise` (train mode only) is."""
    router = nn.Module()
    router.router_jitter_noise, router.input_jitter_noise = 0.01, 0.01
    assert disable_dropout(router) == 1
    assert (router.router_jitter_noise, router.input_jitter_noise) == (0.01, 0.0)


def test_verify_head_catches_undeclared_postprocessing():
    model = make_model("llama", tied=False)
    verify_head(model)
    forward = model.forward

    def scaled_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 2.0
        return out

    model.forward = scaled_forward
    with pytest.raises(ValueError, match="lm_head"):
        verify_head(model)


def test_scoring_and_verify_head_restore_each_module_mode():
    """A model in train mode with one layer kept in eval mode on purpose (frozen): scoring and the head
    check run in eval mode and restore every module's own mode (model.train() flipped the layer)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, attention_dropout=0.5)
    model = transformers.LlamaForCausalLM(config).train()
    model.model.layers[0].eval()
    modes = [module.training for module in model.modules()]
    verify_head(model)
    score_logprobs(model, *padded_batch()[:2])
    assert [module.training for module in model.modules()] == modes


@pytest.mark.parametrize("arch", ["llama (functional attention dropout)", "gpt2 (nn.Dropout modules)",
                                  "persimmon (config.attention_dropout read at each forward)"])
def test_dropout_is_off_when_scoring_and_training(arch):
    """The policy that generates has no dropout: score_logprobs scores in eval mode (the model's
    mode restored after), and the trainer zeroes the dropout rates, so that the importance ratio
    is 1 at unchanged parameters instead of noise."""
    torch.manual_seed(0)
    if arch.startswith("llama"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY, attention_dropout=0.5))
    elif arch.startswith("persimmon"):
        model = transformers.PersimmonForCausalLM(transformers.PersimmonConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, attention_dropout=0.5))
    else:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.5,
            embd_pdrop=0.5, attn_pdrop=0.5))
    model = model.double().train()
    input_ids, attention_mask, loss_mask = padded_batch()
    old = score_logprobs(model, input_ids, attention_mask)
    assert model.training and torch.equal(old, score_logprobs(model, input_ids, attention_mask))
    trainer = RLPlusTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0), preset={})
    metrics = trainer.step(dict(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                                advantages=torch.randn(input_ids.shape[0]), old_logprobs=old))
    assert math.isclose(metrics["ratio_mean"], 1.0, rel_tol=1e-12) and metrics["clip_frac"] == 0.0
    with pytest.raises(ValueError, match="max_grad_norm"):
        RLPlusTrainer(model, trainer.optimizer, max_grad_norm=0.0)


def test_bad_shapes_are_named():
    model = make_model("llama", tied=False)
    ids, am, lm = padded_batch()
    with pytest.raises(ValueError, match="advantages"):
        rlplus_model_loss(model, ids, am, lm, torch.zeros(3))
    with pytest.raises(ValueError, match="old_logprobs"):
        rlplus_model_loss(model, ids, am, lm, torch.zeros(5), torch.zeros(5, 3))
    # a per-token input on another device than input_ids (as a CPU advantages tensor beside a CUDA batch):
    # named before it is indexed by the target rows, whose error would name nothing
    for name in ("advantages", "old_logprobs", "external_mask", "ref_logprobs"):
        other = dict(advantages=torch.zeros(5), old_logprobs=None, external_mask=None, ref_logprobs=None)
        other[name] = torch.zeros(ids.shape, device="meta", dtype=torch.bool if name == "external_mask" else None)
        with pytest.raises(ValueError, match=f"{name} is on meta but input_ids is on cpu"):
            rlplus_model_loss(model, ids, am, lm, other.pop("advantages"), other.pop("old_logprobs"), **other)
    with pytest.raises(ValueError, match="attention_mask is on meta"):
        score_logprobs(model, ids, am.to("meta"))


# build_group_batch's refusals of one prompt with two completions: (keyword overrides, error, message)
BAD_GROUPS = [
    (dict(padding_side="top"), ValueError, "padding_side must be 'right' or 'left'"),
    (dict(completions=[[[7]], [[8]]]), ValueError, r"completions must hold one list per prompt \(1\), got 2"),
    (dict(rewards=[[1.0], [0.0]]), ValueError, r"rewards must hold one list per prompt \(1\), got 2"),
    (dict(external_completions=[[[9]], [[9]]]), ValueError, "external_completions must hold one list per prompt"),
    (dict(external_rewards=[[1.0]]), ValueError, "external_rewards given without external_completions"),
    (dict(rewards=[[1.0]]), ValueError, "prompt 0: 2 completions but 1 rewards"),
    (dict(external_completions=[[[9]]], external_rewards=[[1.0, 0.0]]), ValueError,
     "prompt 0: 1 external completions but 2 rewards"),
    (dict(prompts=[], completions=[], rewards=[]), ValueError, "no sequences"),
    (dict(prompts=[torch.tensor([[5, 6]])]), TypeError, "prompts\\[0\\] must be a 1-D integer tensor"),
    (dict(completions=[7]), TypeError, r"completions\[0\] must be a list"),
]


def test_bad_inputs_are_named_before_any_work():
    """Each of these failed deep inside (an embedding lookup, range(), len() of a float) with a message
    that did not name the argument, or was accepted: a misspelt batch key trained on-policy, a token id
    given as ignore_index dropped that token, float token ids were truncated."""
    model = make_model("llama", tied=False)
    ids, am, lm = padded_batch()
    adv = torch.zeros(ids.shape[0])
    for call, error, match in [
        (lambda: rlplus_model_loss(model, ids.float(), am, lm, adv), TypeError, "input_ids must be an integer"),
        (lambda: rlplus_model_loss(model, ids[0], am[0], lm[0], adv[:1]), ValueError, r"input_ids must be \[B, T\]"),
        (lambda: rlplus_model_loss(model, ids.masked_fill(am == 0, VOCAB), am, lm, adv), ValueError,
         rf"input_ids must lie in \[0, {VOCAB}\)"),
        (lambda: rlplus_model_loss(model, ids, am, lm, adv, position_ids=torch.zeros(3, 3, dtype=torch.long)),
         ValueError, "position_ids"),
        (lambda: rlplus_model_loss(model, ids, am, lm, adv, ignore_index=0), TypeError, "ignore_index"),
        (lambda: score_logprobs(model, ids.float()), TypeError, "input_ids"),
        *[(lambda dtype=dtype: rlplus_model_loss(model, ids.to(dtype), am, lm, adv), TypeError,
           rf"input_ids must be an integer tensor of token ids, int64 or int32, got {dtype}")
          for dtype in (torch.uint8, torch.int16)],  # what the embedding refuses, deep inside the model
        (lambda: rlplus_model_loss(model, ids, None, None, None), TypeError, "advantages must be a torch.Tensor"),
        (lambda: target_mask(ids, attention_mask=[[1, 1]]), TypeError, "attention_mask must be a torch.Tensor"),
        (lambda: target_mask([[1, 2]], None), TypeError, "input_ids must be a torch.Tensor"),
        (lambda: target_mask(ids[:, :1], None), ValueError, "at least 2 positions"),
    ]:
        with pytest.raises(error, match=match):
            call()

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for kwargs, error, match in [(dict(clip_eps=0.2), TypeError, "clip_eps"),
                                 (dict(loss_agg="mean"), ValueError, "loss_agg"),
                                 (dict(micro_batch_size=1.5), ValueError, "micro_batch_size"),
                                 (dict(normalizer=-1), ValueError, "normalizer"),
                                 (dict(skip_nonfinite_steps="no"), TypeError, "skip_nonfinite_steps"),
                                 (dict(max_grad_norm="1.0"), ValueError, "max_grad_norm must be a positive number"),
                                 (dict(disable_dropout=None), TypeError, "disable_dropout")]:
        with pytest.raises(error, match=match):
            RLPlusTrainer(model, optimizer, verify_model_head=False, **kwargs)
    RLPlusTrainer(model, optimizer, verify_model_head=False, max_grad_norm=torch.tensor(0.5))  # a number too
    trainer = RLPlusTrainer(model, optimizer, verify_model_head=False, preset={})
    batch = dict(input_ids=ids, attention_mask=am, loss_mask=lm, advantages=adv)
    for bad, match in [({**batch, "old_logprob": torch.zeros(ids.shape)}, "old_logprob"),
                       ({**batch, "rewards": torch.ones(ids.shape[0] + 1)}, "rewards"),
                       ({k: v[:0] for k, v in batch.items()}, "no sequences"),
                       ({"input_ids": ids}, r"batch lacks \['advantages'\]")]:
        with pytest.raises(ValueError, match=match):
            trainer.step(bad)

    prompts, completions, rewards = [[5, 6, 7]], [[[10, 2], [11, 12, 2]]], [[1.0, 0.0]]
    for kwargs, match in [(dict(completions=[[10, 2]]), r"completions\[0\]\[0\] must be a sequence"),
                          (dict(prompts=[[5.7, 6, 7]]), r"prompts\[0\] must hold integer token ids"),
                          (dict(external_completions=[[[15, 2]]], external_rewards=[1.0]), r"external_rewards\[0\]")]:
        with pytest.raises(TypeError, match=match):
            build_group_batch(**{**dict(prompts=prompts, completions=completions, rewards=rewards), **kwargs})
    # a negative id was packed and refused only by the step's embedding check; a float pad id was truncated
    for kwargs, error, match in [(dict(completions=[[[10, -2], [11]]]), ValueError, r"completions\[0\]\[0\] must hold "
                                  "token ids >= 0"),
                                 (dict(pad_token_id=0.5), TypeError, "pad_token_id"),
                                 (dict(pad_token_id=-1), TypeError, "pad_token_id"),
                                 *BAD_GROUPS]:
        with pytest.raises(error, match=match):
            build_group_batch(**{**dict(prompts=prompts, completions=completions, rewards=rewards), **kwargs})


class CountBackboneRuns:
    """Counts the input-embedding lookups of `model` (one per backbone forward)."""

    def __init__(self, model):
        self.count = 0
        self._handle = model.get_input_embeddings().register_forward_hook(self._hook)

    def _hook(self, *_):
        self.count += 1

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self._handle.remove()


def test_a_bad_batch_is_refused_before_the_backbone_runs():
    """rlplus_model_loss and score_logprobs check their hyper-parameters and per-token dtypes before the
    backbone's forward (they were checked only by rlplus_loss, after it); target_mask refuses a mask of
    another shape (it broadcast one)."""
    model = make_model("llama", tied=False)
    ids, am, lm = padded_batch()
    adv = torch.zeros(ids.shape[0], dtype=torch.float64)
    with CountBackboneRuns(model) as backbone:
        for call, error, match in [
            (lambda: rlplus_model_loss(model, ids, am, lm, adv, temperature=0.0), ValueError, "temperature"),
            (lambda: rlplus_model_loss(model, ids, am, lm, adv, kl_coef=0.1), ValueError, "ref_logprobs"),
            (lambda: rlplus_model_loss(model, ids, am, lm, adv.long()), TypeError, "advantages"),
            (lambda: rlplus_model_loss(model, ids, am, lm, adv, torch.zeros(ids.shape, dtype=torch.long)),
             TypeError, "old_logprobs"),
            (lambda: rlplus_model_loss(model, ids, am, lm, adv, backend="x"), ValueError, "backend"),
            (lambda: rlplus_model_loss(model, ids, am, lm, adv, normalizer=torch.ones(2)), ValueError, "normalizer"),
            (lambda: rlplus_model_loss(model, ids, am, lm, adv, normalizer=torch.tensor(-1.0)), ValueError,
             "normalizer"),
            (lambda: score_logprobs(model, ids, am, temperature=float("nan")), ValueError, "temperature"),
            (lambda: score_logprobs(model, ids, am, backend="x"), ValueError, "backend"),
            (lambda: target_mask(ids, am[:, :-1]), ValueError, "attention_mask"),
            (lambda: target_mask(ids, am, lm[:1]), ValueError, "loss_mask"),
        ]:
            with pytest.raises(error, match=match):
                call()
    assert backbone.count == 0


@pytest.fixture
def one_process_group():
    """A gloo process group of this process alone, which FSDP needs to wrap a model."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _fsdp1(model):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(model, device_id=torch.device("cpu"))


def _fsdp2(model):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard(model)


def _deepspeed(model):
    deepspeed = pytest.importorskip("deepspeed")
    config = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True}
    return deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), config=config)[0]


WRAPPERS = {  # the wrapper, and how the refusal names it
    "DataParallel": (nn.DataParallel, "DataParallel: a wrapper around LlamaForCausalLM"),  # CPU: unreplicated
    "FSDP1": (_fsdp1, "FullyShardedDataParallel: a wrapper around LlamaForCausalLM"),
    "FSDP2": (_fsdp2, "FSDPLlamaForCausalLM: a model sharded by FSDP2's fully_shard"),
    "DeepSpeed": (_deepspeed, "DeepSpeedEngine: a wrapper around LlamaForCausalLM"),
}


@pytest.mark.filterwarnings("ignore:FSDP is switching to use `NO_SHARD`")  # one process: nothing to shard
@pytest.mark.parametrize("wrapper", WRAPPERS)
def test_a_data_parallel_wrapper_is_refused_by_name_before_anything_runs_or_changes(wrapper, one_process_group,
                                                                                    monkeypatch):
    """DistributedDataParallel, DataParallel, FSDP1, FSDP2 or DeepSpeed: the trainer's functions would run the
    model's backbone and head past the wrapper's forward (where FSDP and ZeRO-3 gather the parameters) and its
    gradient synchronisation. Each refuses it by name (it said 'a bare backbone' before for DDP; FSDP1, FSDP2 and
    DeepSpeed ran the backbone on sharded parameters) before the backbone runs, and the trainer before it zeroes
    the model's dropout."""
    wrap, name = WRAPPERS[wrapper]
    monkeypatch.setenv("LOCAL_RANK", "0")  # what DeepSpeed's launcher would set
    model = make_model("llama", tied=False)
    attention = model.model.layers[0].self_attn
    model.config.attention_dropout = attention.attention_dropout = 0.1  # what the trainer would zero
    wrapped = wrap(model)
    ids, am, lm = padded_batch()
    adv = torch.zeros(ids.shape[0], dtype=torch.float64)
    with CountBackboneRuns(model) as backbone:
        for call in (lambda: RLPlusTrainer(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1)),
                     lambda: RLPlusTrainer(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1),
                                           verify_model_head=False),
                     lambda: rlplus_model_loss(wrapped, ids, am, lm, adv),
                     lambda: score_logprobs(wrapped, ids, am),
                     lambda: get_backbone(wrapped)):
            with pytest.raises(ValueError, match=re.escape(name) + "; .* in one process"):
                call()
    assert backbone.count == 0
    assert model.config.attention_dropout == attention.attention_dropout == 0.1


def test_a_compiled_model_is_refused_naming_the_remedy():
    """torch.compile(model) hands the model's attributes on, so the trainer's functions ran its backbone and
    head uncompiled, silently. Each refuses it before the backbone runs, naming the remedy."""
    model = make_model("llama", tied=False)
    ids, am, lm = padded_batch()
    adv = torch.zeros(ids.shape[0], dtype=torch.float64)
    compiled = torch.compile(model, backend="eager")
    with CountBackboneRuns(model) as backbone:
        for call in (lambda: RLPlusTrainer(compiled, torch.optim.SGD(compiled.parameters(), lr=0.1)),
                     lambda: rlplus_model_loss(compiled, ids, am, lm, adv),
                     lambda: score_logprobs(compiled, ids, am),
                     lambda: get_backbone(compiled)):
            with pytest.raises(ValueError, match=re.escape(
                    "OptimizedModule: torch.compile of LlamaForCausalLM; the trainer's functions run its backbone "
                    "and head, not its forward") + ".* compile the backbone in place: model.model.compile()"):
                call()
    assert backbone.count == 0


@pytest.mark.skipif(not hasattr(torch.compiler, "is_exporting") and major_minor(transformers.__version__) >= (5, 0),
                    reason=f"transformers {transformers.__version__}'s models call torch.compiler.is_exporting in a "
                           f"compiled forward, which torch {torch.__version__} lacks (dynamo fails there)")
def test_the_remedy_for_a_compiled_model_runs_the_backbone_compiled():
    """The remedy that the refusal names: the backbone compiled in place runs compiled, with the same loss."""
    model = make_model("llama", tied=False)
    ids, am, lm = padded_batch()
    adv = torch.linspace(-1, 1, ids.shape[0], dtype=torch.float64)
    eager = rlplus_model_loss(model, ids, am, lm, adv).loss
    torch._dynamo.reset()
    model.model.compile(backend="eager")
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    assert torch.equal(rlplus_model_loss(model, ids, am, lm, adv).loss, eager)
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames, "the backbone did not run compiled"


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_step(use_reentrant):
    """transformers' activation checkpointing (each layer run again in the backward) around the backbone that
    the trainer runs: the same loss and the same gradients of every parameter, in train mode."""
    model = make_model("llama", tied=False).train()
    input_ids, attention_mask, loss_mask = padded_batch()
    advantages = torch.linspace(-1, 1, input_ids.shape[0], dtype=torch.float64)
    layer_runs = []
    model.model.layers[0].self_attn.register_forward_hook(lambda *_: layer_runs.append(1))
    losses, grads, runs = [], [], []
    for checkpointing in (False, True):
        if checkpointing and hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23's name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
        elif checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model.zero_grad()
        layer_runs.clear()
        out = rlplus_model_loss(model, input_ids, attention_mask, loss_mask, advantages)
        out.loss.backward()
        losses.append(out.loss.detach())
        grads.append(param_grads(model))
        runs.append(len(layer_runs))
    assert runs == [1, 2], f"runs of the first attention (forward, and backward's recompute): {runs}"
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-12, atol=0)
    assert_close_grads(grads[1], grads[0], rtol=1e-12, atol=1e-14)
    assert all(g.abs().sum() > 0 for g in grads[1].values())


def peft_model(model, **config):
    """model with LoRA adapters of rank 2 on q_proj and v_proj, initialised at random (PEFT's default lora_B = 0
    would leave the adapters out of the logits) in the model's dtype."""
    peft = pytest.importorskip("peft")
    config = dict(dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False), **config)
    return peft.get_peft_model(model, peft.LoraConfig(**config)).to(torch.float64)


@pytest.mark.parametrize("head", ["frozen", "modules_to_save"])
def test_a_peft_model_trains_its_adapters_as_its_own_logits_say(head):
    """A PeftModel: the backbone of its base model runs with the adapters in place, and the head is the frozen
    lm_head or the trainable copy of modules_to_save. Loss, log-probs and every trainable gradient equal the
    reference on the PeftModel's own logits; RLPlusTrainer's numerical check of the head passes. Before, the
    trainer took the whole causal LM for the backbone and refused with hidden's last dimension = V."""
    model = peft_model(make_model("llama", tied=False),
                       modules_to_save=["lm_head"] if head == "modules_to_save" else None)
    input_ids, attention_mask, loss_mask = padded_batch()
    advantages = torch.linspace(-1, 1, input_ids.shape[0], dtype=torch.float64)
    hyper = dict(OFFICIAL_RECIPE, temperature=0.9, entropy_coef=0.01)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in name for name in trainable)
    assert any("modules_to_save" in name for name in trainable) == (head == "modules_to_save")

    model.zero_grad()
    out = rlplus_model_loss(model, input_ids, attention_mask, loss_mask, advantages, **hyper)
    out.loss.backward()
    got = {name: g for name, g in param_grads(model).items() if name in trainable}
    model.zero_grad()
    ref = reference_from_logits(model, input_ids, attention_mask, loss_mask, advantages, None, **hyper)
    ref.loss.backward()
    want = {name: g for name, g in param_grads(model).items() if name in trainable}

    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(out.logprobs[:, 1:], ref.logprobs, rtol=1e-9, atol=1e-10)
    assert_close_grads(got, want)
    assert all(got[name].abs().sum() > 0 for name in trainable), "a trainable parameter got no gradient"
    RLPlusTrainer(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    with pytest.raises(ValueError, match=re.escape("in place: model.get_base_model().model.compile()")):
        score_logprobs(torch.compile(model), input_ids, attention_mask)


def test_a_peft_model_with_its_adapters_disabled_scores_as_its_base_model():
    """PEFT's disable_adapter(): the reference policy without a second copy of the model. The trained copy of
    the head (modules_to_save) is left out as well, as in the PeftModel's own forward."""
    base = make_model("llama", tied=False)
    model = peft_model(make_model("llama", tied=False), modules_to_save=["lm_head"])
    with torch.no_grad():
        model.get_output_embeddings().weight.add_(0.1)  # the trained copy, now unlike the base model's head
    input_ids, attention_mask, _ = padded_batch()
    adapted = score_logprobs(model, input_ids, attention_mask)
    with model.disable_adapter():
        disabled = score_logprobs(model, input_ids, attention_mask)
    torch.testing.assert_close(disabled, score_logprobs(base, input_ids, attention_mask), rtol=1e-12, atol=1e-12)
    assert (adapted - disabled).abs().max() > 1e-3


def test_a_peft_adapter_on_the_lm_head_is_refused_naming_the_remedy():
    """LoRA on lm_head adds B A h to W h: not a linear map of lm_head.weight. Refused before the backbone runs
    (at PEFT's default lora_B = 0 the numerical check of the head would pass and the adapter never train)."""
    model = peft_model(make_model("llama", tied=False), target_modules=["q_proj", "lm_head"], init_lora_weights=True)
    input_ids, attention_mask, loss_mask = padded_batch()
    advantages = torch.zeros(input_ids.shape[0], dtype=torch.float64)
    with CountBackboneRuns(model) as backbone:
        for call in (lambda: RLPlusTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1)),
                     lambda: rlplus_model_loss(model, input_ids, attention_mask, loss_mask, advantages),
                     lambda: score_logprobs(model, input_ids, attention_mask)):
            with pytest.raises(ValueError, match=re.escape(
                    "LlamaForCausalLM: the LM head carries a PEFT adapter (peft.tuners.lora.layer.Linear)") +
                    r".* Leave lm_head out of target_modules: train it whole with modules_to_save=\['lm_head'\]"):
                call()
    assert backbone.count == 0


def test_rlplus_model_loss_passes_vocab_parallel_group_on_and_the_trainer_names_itself():
    """rlplus_model_loss hands every keyword it does not take to rlplus_loss, vocab_parallel_group included;
    RLPlusTrainer (single-process) refuses that one, and its messages name RLPlusTrainer."""
    model = make_model("llama", tied=False)
    ids, am, lm = padded_batch()
    adv = torch.linspace(-1, 1, ids.shape[0], dtype=torch.float64)
    plain = rlplus_model_loss(model, ids, am, lm, adv).loss
    assert torch.equal(rlplus_model_loss(model, ids, am, lm, adv, vocab_parallel_group=None).loss, plain)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    for kwargs, match in [(dict(targets=ids), "RLPlusTrainer got an unexpected keyword 'targets'"),
                          (dict(ignore_index=0), "RLPlusTrainer got an unexpected keyword 'ignore_index'"),
                          (dict(vocab_parallel_group=None),
                           r"RLPlusTrainer got unknown hyper-parameter\(s\) \['vocab_parallel_group'\]")]:
        with pytest.raises(TypeError, match=match):
            RLPlusTrainer(model, optimizer, verify_model_head=False, **kwargs)


def test_a_bad_batch_leaves_the_model_and_its_gradients_as_they_were():
    """RLPlusTrainer.step checks the whole batch before it sets train mode, clears gradients or runs any
    micro-batch. Before, per-sequence and per-token tensors with extra rows were cut to the micro-batches
    (attention_mask's extra row counted in the normalizer), and a bad id in the last sequence was refused
    after the first micro-batches' backward had written .grad."""
    model = make_model("llama", tied=False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    ids, am, lm = padded_batch()
    b = ids.shape[0]
    batch = dict(input_ids=ids, attention_mask=am, loss_mask=lm, advantages=torch.zeros(b, dtype=torch.float64))
    bad_id = ids.clone()
    bad_id[-1, 3] = VOCAB
    trainer = RLPlusTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=1,
                            verify_model_head=False, preset={}, kl_coef=0.1)
    ref = dict(ref_logprobs=torch.zeros(ids.shape, dtype=torch.float64))
    with CountBackboneRuns(model) as backbone:
        for bad, match in [(dict(batch, advantages=torch.zeros(b + 2, dtype=torch.float64), **ref), "advantages"),
                           (dict(batch, old_logprobs=torch.zeros(b + 1, ids.shape[1]), **ref), "old_logprobs"),
                           (dict(batch, attention_mask=torch.ones(b + 1, ids.shape[1]), **ref), "attention_mask"),
                           (dict(batch, input_ids=bad_id, **ref), "input_ids must lie in"),
                           (batch, "ref_logprobs")]:
            with pytest.raises(ValueError, match=match):
                trainer.step(bad)
    assert backbone.count == 0 and not model.training
    assert all(torch.equal(p.grad, torch.full_like(p, 7.0)) for p in model.parameters())


def test_a_step_that_fails_midway_leaves_no_partial_gradient(monkeypatch):
    """An error in a late micro-batch (out of memory, say) after earlier ones ran backward: no gradient of
    part of the batch is left for a later optimizer step to apply."""
    from rlplus_kernels.trainer import trainer as trainer_module

    calls = []

    def fail_second_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return loss_of_checked_batch(*args, **kwargs)

    loss_of_checked_batch = trainer_module.loss_of_checked_batch
    monkeypatch.setattr(trainer_module, "loss_of_checked_batch", fail_second_call)
    model = make_model("llama", tied=False)
    ids, am, lm = padded_batch()
    trainer = RLPlusTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=2,
                            verify_model_head=False)
    with pytest.raises(RuntimeError, match="simulated"):
        trainer.step(dict(input_ids=ids, attention_mask=am, loss_mask=lm,
                          advantages=torch.ones(ids.shape[0], dtype=torch.float64)))
    assert len(calls) == 2 and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_build_group_batch(padding_side):
    prompts = [[5, 6, 7], [8, 9]]
    completions = [[[10, 2], [11, 12, 2]], [[13, 2], [14, 2]]]
    rewards = [[1.0, 0.0], [0.0, 0.0]]
    ext = [[[15, 2]], [[16, 17, 18, 2]]]
    b = build_group_batch(prompts, completions, rewards, external_completions=ext,
                          pad_token_id=0, padding_side=padding_side)
    assert b.input_ids.shape == (6, 6)
    assert b.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert b.external_mask.tolist() == [False, False, True, False, False, True]
    assert b.rewards.tolist() == [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    torch.testing.assert_close(b.advantages, torch.tensor([1 / 3, -2 / 3, 1 / 3, -1 / 3, -1 / 3, 2 / 3]))
    assert b.loss_mask.sum(1).tolist() == [2, 3, 2, 2, 2, 4]
    assert (b.loss_mask <= b.attention_mask.bool()).all()
    row = 4  # prompt [8, 9] + [14, 2]
    assert b.input_ids[row][b.attention_mask[row].bool()].tolist() == [8, 9, 14, 2]
    assert b.input_ids[row][b.loss_mask[row]].tolist() == [14, 2]
    side = 0 if padding_side == "left" else -1
    assert b.attention_mask[4, side] == 0


def test_build_group_batch_takes_tensors_and_a_rewards_matrix():
    b = build_group_batch([torch.tensor([5, 6])], [[torch.tensor([7]), [8, 9]]], torch.tensor([[1.0, 0.0]]),
                          device="cpu")
    assert b.input_ids.tolist() == [[5, 6, 7, 0], [5, 6, 8, 9]]
    assert b.loss_mask.tolist() == [[False, False, True, False], [False, False, True, True]]
    assert b.advantages.tolist() == [0.5, -0.5]
    zero = build_group_batch([[0, 5]], [[[0, 2]]], [[1.0]], pad_token_id=3)  # token id 0 is a token, not padding
    assert zero.input_ids.tolist() == [[0, 5, 0, 2]] and zero.loss_mask.tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("loss_agg", ["token-mean", "sum", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batching_does_not_change_the_step(loss_agg):
    """Gradient accumulation with a global normalizer: the loss, every metric and the update of one
    rlplus_model_loss call on the whole batch (its own normalizer: target tokens after the prompt,
    sequences with a target), whole or in micro-batches. Ratios differ from 1 (clipping active), and
    one row has no target token."""
    ids, am, lm = padded_batch()
    lm[3] = False
    adv = torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5], dtype=torch.float64)
    ext = torch.tensor([False, True, False, False, True])
    old = score_logprobs(make_model("llama", tied=True), ids, am).double() + 0.3 * torch.randn(ids.shape,
                                                                                              dtype=torch.float64)
    batch = dict(input_ids=ids, attention_mask=am, loss_mask=lm, advantages=adv, external_mask=ext, old_logprobs=old)
    hyper = dict(loss_agg=loss_agg, entropy_coef=0.01)
    model = make_model("llama", tied=True)
    direct = rlplus_model_loss(model, **batch, **hyper)
    direct.loss.backward()
    with torch.no_grad():
        params = [torch.cat([(p - 0.1 * p.grad).flatten() for p in model.parameters()])]
    assert 0 < float(direct.metrics["clip_frac"]) < 1
    for micro in (None, 2):
        model = make_model("llama", tied=True)
        trainer = RLPlusTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), micro_batch_size=micro,
                                preset={}, max_grad_norm=None, **hyper)
        metrics = trainer.step(batch)
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        assert math.isclose(metrics["loss"], float(direct.loss.detach()), rel_tol=1e-9)
        for key, value in direct.metrics.items():
            assert math.isclose(metrics[key], float(value), rel_tol=1e-9, abs_tol=1e-12), (micro, key)
    for step in params[1:]:
        torch.testing.assert_close(step, params[0], rtol=1e-10, atol=1e-12)


def test_trainer_metrics_and_preset():
    model = make_model("qwen2", tied=True, dtype=torch.float32)
    trainer = RLPlusTrainer(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    assert trainer.hyper == dict(OFFICIAL_RECIPE)
    b = build_group_batch([[5, 6]], [[[7, 2], [8, 2]]], [[1.0, 0.0]], external_completions=[[[9, 2]]])
    m = trainer.step(b)
    for key in ("loss", "grad_norm", "tokens_per_s", "num_tokens", "clip_frac", "ratio_mean",
                "mis_ratio_mean", "explore_coef_mean", "logprob_mean", "entropy_mean", "reward_mean"):
        assert key in m and math.isfinite(m[key]), key
    assert m["num_tokens"] == 6 and m["num_external_tokens"] == 2
    assert m["reward_mean"] == 0.5  # the rollouts only, not the demonstration
    per_token_external = b.external_mask[:, None] & b.loss_mask.bool()  # the same rows as a [B, T] mask
    for external in (per_token_external, -per_token_external.double()):  # masks are flags: -1.0 marks a token
        m = trainer.step({**b.model_inputs(), "external_mask": external, "rewards": b.rewards})
        assert m["num_external_tokens"] == 2 and m["reward_mean"] == 0.5


@pytest.mark.parametrize("poisoned", ["advantages", "old_logprobs"])
def test_a_non_finite_step_is_skipped_not_applied(poisoned):
    """A NaN advantage (a group of one, normalised by its std) makes the loss and gradients NaN, a NaN
    old log-prob the loss: the step leaves the parameters and the optimizer untouched and says so, and
    the next clean batch trains. Without the guard the NaN advantage's step turns every parameter NaN."""
    batch = build_group_batch([[5, 6]], [[[7, 2], [8, 2]]], [[1.0, 0.0]]).model_inputs()
    batch["old_logprobs"] = score_logprobs(make_model("qwen2", tied=True, dtype=torch.float32),
                                           batch["input_ids"], batch["attention_mask"])
    bad = dict(batch, **{poisoned: batch[poisoned].clone()})
    bad[poisoned][(0, -1) if poisoned == "old_logprobs" else 0] = float("nan")  # [S, T] / [S]
    for guarded in (True, False):
        model = make_model("qwen2", tied=True, dtype=torch.float32)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        trainer = RLPlusTrainer(model, optimizer, skip_nonfinite_steps=guarded)
        metrics = trainer.step(bad)
        assert math.isnan(metrics["loss"])
        if not guarded:  # applied: with NaN gradients (a NaN advantage), every parameter is NaN
            assert metrics["skipped_step"] == 0 and trainer.num_steps == 1
            assert any(p.isnan().any() for p in model.parameters()) == (poisoned == "advantages")
            continue
        assert metrics["skipped_step"] == 1 and trainer.num_skipped_steps == 1 and trainer.num_steps == 0
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
        assert not optimizer.state and all(p.grad is None for p in model.parameters())
        metrics = trainer.step(batch)
        assert metrics["skipped_step"] == 0 and trainer.num_steps == 1 and math.isfinite(metrics["loss"])
        assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def _target_batch():
    input_ids, attention_mask, loss_mask = padded_batch()
    return dict(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask,
                advantages=torch.tensor([1.0, -0.5, 0.25, -1.0, 0.5], dtype=torch.float64))


def test_a_step_starts_from_zero_gradients_and_takes_the_trainers_normalizer():
    """Gradients left by an earlier backward do not enter the step, and a `normalizer` given to the trainer is
    the loss's."""
    batch = _target_batch()
    model = make_model("llama", tied=False)
    want = rlplus_model_loss(model, **batch, normalizer=3.0)
    want.loss.backward()
    want_norm = torch.cat([grad.flatten() for grad in param_grads(model).values()]).norm().item()
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    trainer = RLPlusTrainer(model, torch.optim.SGD(model.parameters(), lr=0.0), preset={}, max_grad_norm=None,
                            normalizer=3.0)
    metrics = trainer.step(batch)
    assert math.isclose(metrics["loss"], float(want.loss.detach()), rel_tol=1e-12)
    assert math.isclose(metrics["grad_norm"], want_norm, rel_tol=1e-9)


def test_gradients_are_clipped_to_norm_one_by_default():
    batch = dict(_target_batch(), advantages=torch.full((5,), 50.0, dtype=torch.float64))
    model = make_model("llama", tied=False)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    metrics = RLPlusTrainer(model, torch.optim.SGD(model.parameters(), lr=1.0), preset={}).step(batch)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert metrics["grad_norm"] > 1.0  # the norm before clipping
    assert math.isclose(float((after - before).norm()), 1.0, rel_tol=1e-6)


def test_a_non_finite_gradient_of_a_finite_loss_is_skipped():
    model = make_model("llama", tied=False)
    model.lm_head.weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))
    before = [p.detach().clone() for p in model.parameters()]
    metrics = RLPlusTrainer(model, torch.optim.SGD(model.parameters(), lr=0.1), preset={}).step(_target_batch())
    assert math.isfinite(metrics["loss"]) and math.isnan(metrics["grad_norm"]) and metrics["skipped_step"] == 1
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_the_lr_scheduler_steps_with_the_optimizer_only():
    """lr_scheduler steps after every optimizer step, and not after a step skipped as non-finite."""
    model = make_model("qwen2", tied=True, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    trainer = RLPlusTrainer(model, optimizer,
                            lr_scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5))
    batch = build_group_batch([[5, 6]], [[[7, 2], [8, 2]]], [[1.0, 0.0]]).model_inputs()
    assert trainer.step(batch)["skipped_step"] == 0
    assert optimizer.param_groups[0]["lr"] == 5e-4
    bad = dict(batch, advantages=torch.full_like(batch["advantages"], float("nan")))
    assert trainer.step(bad)["skipped_step"] == 1
    assert optimizer.param_groups[0]["lr"] == 5e-4


def test_training_raises_logprob_of_rewarded_completions():
    model = make_model("llama", tied=False, dtype=torch.float32, seed=3)
    prompts = [[5, 6, 7], [8, 9, 10]]
    good = [[20, 21, 2], [30, 31, 2]]
    bad = [[22, 23, 2], [32, 33, 2]]
    batch = build_group_batch(prompts, [[good[0], bad[0], bad[0]], [bad[1], good[1], bad[1]]],
                              [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                              external_completions=[[good[0]], [good[1]]])
    trainer = RLPlusTrainer(model, torch.optim.AdamW(model.parameters(), lr=3e-3), normalizer=4)

    def seq_logprob(completions):
        b = build_group_batch(prompts, [[c] for c in completions], [[0.0], [0.0]])
        lp = score_logprobs(model, b.input_ids, b.attention_mask)
        return (lp * b.loss_mask).sum(-1)

    good0, bad0 = seq_logprob(good), seq_logprob(bad)
    for _ in range(10):
        metrics = trainer.step(batch)
        assert math.isfinite(metrics["loss"])
    good1, bad1 = seq_logprob(good), seq_logprob(bad)
    assert (good1 > good0 + 1.0).all(), (good0, good1)
    assert (bad1 < bad0).all(), (bad0, bad1)


def test_import_does_not_need_transformers():
    import subprocess
    import sys
    code = ("import sys, rlplus_kernels, rlplus_kernels.trainer; "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_example_runs_end_to_end(tmp_path):
    """examples/train_rlplus_tiny.py, issue 5's end-to-end example (its full run, ~3 min, and its figures are in
    the README), cut to two RL steps of each method on one seed: it still runs, samples each step's rollouts
    and writes the summary it prints."""
    import json
    import os
    import subprocess
    import sys
    example = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                           "train_rlplus_tiny.py")
    small = ["--steps", "2", "--warmup-steps", "2", "--prompts-per-step", "2", "--group-size", "2",
             "--eval-every", "1", "--eval-samples", "2", "--k", "2", "--seeds", "0", "--max-operand", "3",
             "--hidden", "16", "--out", str(tmp_path)]
    proc = subprocess.run([sys.executable, example, *small], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads((tmp_path / "train_rlplus_tiny.json").read_text())
    # the recipe as run: "sum" over a batch's completion tokens at most (2 prompts x 2 x its new tokens), not 8192
    assert result["recipe"]["normalizer"] == 2 * 2 * result["args"]["max_new_tokens"], result["recipe"]
    for method, name in (("rlplus", "RL-PLUS"), ("grpo", "GRPO")):
        history = result["runs"]["0"][method]
        # rollouts sampled so far: 2 prompts x a group of 2 per step, where RL-PLUS's group holds 1 demonstration
        per_step = 2 * (1 if method == "rlplus" else 2)
        assert [(h["step"], h["samples"]) for h in history] == [(0, 0), (1, per_step), (2, 2 * per_step)], history
        assert all(0.0 <= h["rollout_reward"] <= 1.0 for h in history[1:]), history
        assert set(result["summary"][method]) == {"start", "final"}
        assert f"{name:8s} step    2" in proc.stdout, proc.stdout[-2000:]
