"""TransNormerLLM: config arithmetic and validation, prefill + recurrent decoding against the
full forward, layout of the weights, and a tiny model that learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError
from pretrain.models.transnormer import InferenceState, TransNormerConfig, TransNormerLLM


def _tiny(**overrides: object) -> TransNormerConfig:
    fields: dict[str, object] = {
        "vocab_size": 97,
        "d_model": 32,
        "n_layers": 3,
        "n_heads": 4,
        "glu_dim": 48,
        "attention_block_size": 8,
    }
    fields.update(overrides)
    return TransNormerConfig(**fields)


CONFIGS = {
    "plain": _tiny(),
    "lrpe_first": _tiny(lrpe_layers=[0]),
    "lrpe_tied": _tiny(lrpe_layers=[0, 2], tie_word_embeddings=True),
    "tied_hidden_dim": _tiny(tie_word_embeddings=True, hidden_dim=24, n_heads=3, no_scale_embedding=True),
    "one_layer": _tiny(n_layers=1, n_heads=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_matches_forward(name: str) -> None:
    model = CONFIGS[name].build()
    ids = torch.randint(0, model.config.vocab_size, (2, 21))
    n = 13  # not a multiple of the block size
    with torch.no_grad():
        full = model(ids)
    logits, state = model.prefill(ids[:, :n])
    torch.testing.assert_close(logits, full[:, :n], rtol=1e-5, atol=1e-5)
    assert state.offset == n
    for t in range(n, ids.shape[1]):
        step, state = model.decode_step(ids[:, t], state)
        torch.testing.assert_close(step, full[:, t], rtol=1e-5, atol=1e-5)
    assert state.offset == ids.shape[1]


def test_decode_from_empty_state_matches_forward() -> None:
    model = CONFIGS["lrpe_first"].build()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        full = model(ids)
    state = model.empty_state(1)
    for t in range(ids.shape[1]):
        step, state = model.decode_step(ids[:, t], state)
        torch.testing.assert_close(step, full[:, t], rtol=1e-5, atol=1e-5)


def test_state_shapes_and_dtype() -> None:
    cfg = _tiny(lrpe_layers=[1])
    model = cfg.build().to(torch.bfloat16)
    _, state = model.prefill(torch.randint(0, cfg.vocab_size, (3, 5)))
    assert isinstance(state, InferenceState)
    h = cfg.head_dim
    assert [tuple(kv.shape) for kv in state.kv] == [(3, 4, h, h), (3, 4, 2 * h, h), (3, 4, h, h)]
    assert all(kv.dtype == torch.float32 for kv in state.kv)
    # The decay constants stay exact fp32 through dtype casts.
    slope = model.model.layers[0].token_mixer.slope
    assert slope.dtype == torch.float32


def test_meta_init_then_to_empty() -> None:
    cfg = _tiny(lrpe_layers=[0])
    with torch.device("meta"):
        model = TransNormerLLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    ref = cfg.build()
    for layer, ref_layer in zip(model.model.layers, ref.model.layers, strict=True):
        torch.testing.assert_close(layer.token_mixer.slope, ref_layer.token_mixer.slope)
    torch.testing.assert_close(
        model.model.layers[0].token_mixer.lrpe.theta, ref.model.layers[0].token_mixer.lrpe.theta
    )
    assert abs(model.lm_head.weight.std().item() - cfg.init_std) < 0.005


def test_init_is_reproducible_with_a_generator() -> None:
    a, b = CONFIGS["plain"].build(), CONFIGS["plain"].build()
    a.init_weights(torch.Generator().manual_seed(3))
    b.init_weights(torch.Generator().manual_seed(3))
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb)


def test_hf_layout_names() -> None:
    model = _tiny(lrpe_layers=[0], n_layers=2).build()
    names = set(model.state_dict())
    expected = {
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.token_mixer.lrpe.theta",
        *(f"model.layers.{i}.token_mixer.{p}.weight" for i in range(2) for p in ("qkvu_proj", "out_proj")),
        *(f"model.layers.{i}.channel_mixer.{p}.weight" for i in range(2) for p in ("l1", "l2", "l3")),
    }
    assert names == expected


def test_tied_embeddings_share_one_matrix() -> None:
    model = _tiny(tie_word_embeddings=True).build()
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("name", list(CONFIGS))
def test_num_params_matches_model(name: str) -> None:
    cfg = CONFIGS[name]
    model = cfg.build()
    assert cfg.num_params() == sum(p.numel() for p in model.parameters()) == model.num_params()
    assert cfg.num_params(exclude_embeddings=True) == model.num_params(exclude_embeddings=True)
    assert cfg.num_params() - cfg.num_params(True) == cfg.vocab_size * cfg.d_model


def test_flops_per_token_formula() -> None:
    cfg = _tiny(lrpe_layers=[0], attention_block_size=64)
    d, g, v, h, H, L = 32, 48, 97, 8, 4, 3
    matmul = L * (4 * d * d + d * d + 3 * d * g) + v * d
    for seq_len, blk in ((16, 16), (64, 64), (1000, 64)):
        attn = sum(H * (2 * blk * hq + 2 * blk * h + 4 * hq * h) for hq in (2 * h, h, h))
        assert cfg.flops_per_token(seq_len) == pytest.approx(3 * (2 * matmul + attn))


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"d_model": 30, "n_heads": 4}, "n_heads"),
        ({"hidden_dim": 30, "n_heads": 4}, "hidden_dim"),
        ({"lrpe_layers": [3]}, "lrpe_layers"),
        ({"lrpe_layers": [-1]}, "lrpe_layers"),
        ({"glu_dim": 0}, "glu_dim"),
        ({"n_layers": 0}, "n_layers"),
    ],
)
def test_bad_config_names_the_field(overrides: dict[str, object], field: str) -> None:
    data = {"vocab_size": 97, "d_model": 32, "n_layers": 3, "n_heads": 4, **overrides}
    with pytest.raises(ConfigError, match=field):
        TransNormerConfig.from_dict(data)
    with pytest.raises(ValueError, match=field):
        TransNormerConfig(**data)


def test_tiny_model_overfits_one_batch() -> None:
    torch.manual_seed(0)
    cfg = _tiny(lrpe_layers=[0], vocab_size=64)
    model = cfg.build()
    ids = torch.randint(0, cfg.vocab_size, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 3.5
    assert losses[-1] < 0.5 * losses[0]


def test_meta_init_keeps_embeddings_tied() -> None:
    cfg = _tiny(tie_word_embeddings=True)
    with torch.device("meta"):
        model = TransNormerLLM(cfg)
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.num_params() == cfg.num_params()


def test_from_hf_to_hf_methods_round_trip(tmp_path) -> None:
    model = _tiny(lrpe_layers=[0]).build()
    model.to_hf(tmp_path / "hf")
    again = TransNormerLLM.from_hf(tmp_path / "hf")
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    # Weights are bit-equal; the block size of the attention is not part of the HF config, so
    # the two models may block the sequence differently: fp32 rounding only.
    for name, tensor in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    torch.testing.assert_close(again(ids), model.eval()(ids), rtol=1e-5, atol=1e-6)
