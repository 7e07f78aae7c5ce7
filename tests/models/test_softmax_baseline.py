"""Softmax-attention baseline: KV-cache decoding against the full forward, causality, chunked
prefill, parameter and FLOP arithmetic."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError
from pretrain.models.softmax import KVCache, SoftmaxConfig, SoftmaxLM


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread is faster, and immune to oversubscribed CI machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tiny(**overrides: object) -> SoftmaxConfig:
    fields: dict[str, object] = {"vocab_size": 97, "d_model": 32, "n_layers": 3, "n_heads": 4, "ffn_dim": 48}
    fields.update(overrides)
    return SoftmaxConfig(**fields)


def _model(**overrides: object) -> SoftmaxLM:
    torch.manual_seed(0)
    model = _tiny(init_std=0.2, **overrides).build().eval()  # std 0.2: attention visibly matters
    return model


@pytest.mark.parametrize("tied", [False, True])
def test_prefill_then_decode_matches_forward(tied: bool) -> None:
    model = _model(tie_word_embeddings=tied)
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        full = model(ids)
    n = 13
    logits, cache = model.prefill(ids[:, :n])
    torch.testing.assert_close(logits, full[:, :n], rtol=1e-5, atol=1e-5)
    assert cache.offset == n and cache.capacity >= n
    for t in range(n, ids.shape[1]):
        step, cache = model.decode_step(ids[:, t], cache)
        torch.testing.assert_close(step, full[:, t], rtol=1e-5, atol=1e-5)
    assert cache.offset == ids.shape[1] and cache.capacity >= ids.shape[1]


def test_chunked_prefill_matches_forward() -> None:
    model = _model()
    ids = torch.randint(0, 97, (1, 50))
    with torch.no_grad():
        full = model(ids)
    logits, cache = model.prefill(ids, chunk_size=16)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    step, _ = model.decode_step(ids[:, -1], cache)
    with torch.no_grad():
        ref = model(torch.cat([ids, ids[:, -1:]], dim=1))[:, -1]
    torch.testing.assert_close(step, ref, rtol=1e-5, atol=1e-5)


def test_decode_from_empty_state_matches_forward() -> None:
    model = _model()
    ids = torch.randint(0, 97, (1, 7))
    with torch.no_grad():
        full = model(ids)
    state = model.empty_state(1, capacity=2)  # grows twice on the way
    for t in range(ids.shape[1]):
        step, state = model.decode_step(ids[:, t], state)
        torch.testing.assert_close(step, full[:, t], rtol=1e-5, atol=1e-5)


def test_causal() -> None:
    model = _model()
    ids = torch.randint(0, 97, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-6)
    assert (a[:, 15:] - b[:, 15:]).abs().max() > 1e-2


def test_position_matters() -> None:
    """RoPE: the same tokens in another order give other logits at the last position."""
    model = _model()
    ids = torch.randint(0, 97, (1, 10))
    perm = torch.cat([ids[:, :8].flip(1), ids[:, 8:]], dim=1)
    with torch.no_grad():
        assert (model(ids)[:, -1] - model(perm)[:, -1]).abs().max() > 1e-3


@pytest.mark.parametrize("tied", [False, True])
def test_param_count_and_flops(tied: bool) -> None:
    cfg = _tiny(tie_word_embeddings=tied)
    model = cfg.build()
    assert cfg.num_params() == sum(p.numel() for p in model.parameters())
    assert cfg.num_params(exclude_embeddings=True) == cfg.num_params() - cfg.vocab_size * cfg.d_model
    n_matmul = 3 * (4 * 32 * 32 + 3 * 32 * 48) + 97 * 32
    assert cfg.flops_per_token(64) == 6 * n_matmul + 12 * 3 * 32 * 64
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tied


def test_meta_build_and_init() -> None:
    cfg = _tiny()
    with torch.device("meta"):
        model = cfg.build()
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(1))
    assert torch.all(model.model.norm.weight == 1)
    assert abs(model.lm_head.weight.std().item() - cfg.init_std) < 0.005
    assert torch.isfinite(model(torch.randint(0, 97, (1, 5)))).all()


def test_cache_memory() -> None:
    model = _model()
    _, cache = model.prefill(torch.randint(0, 97, (1, 40)))
    assert isinstance(cache, KVCache)
    assert cache.nbytes() == 2 * 3 * 40 * 32 * 4  # k and v, 3 layers, 40 tokens, d=32, fp32


def test_learns() -> None:
    torch.manual_seed(0)
    model = _tiny(vocab_size=16, n_layers=2).build()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.arange(24).remainder(16)[None].repeat(2, 1)
    for _ in range(25):
        loss = F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="divide"):
        SoftmaxConfig.from_dict({"d_model": 30, "n_heads": 4})
    with pytest.raises(ConfigError, match="even"):
        SoftmaxConfig.from_dict({"d_model": 12, "n_heads": 4})
