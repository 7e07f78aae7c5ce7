"""Streaming generation: greedy decoding equals repeated full forwards, seeds reproduce,
stop ids stop, bad settings are rejected."""

from __future__ import annotations

import pytest
import torch

from pretrain.generate import SamplingConfig, generate
from pretrain.models.transnormer import TransNormerConfig, TransNormerLLM


@pytest.fixture(scope="module")
def model() -> TransNormerLLM:
    cfg = TransNormerConfig(
        vocab_size=50, d_model=32, n_layers=2, n_heads=4, glu_dim=40, lrpe_layers=[0], attention_block_size=4
    )
    model = cfg.build()
    model.init_weights(torch.Generator().manual_seed(1))
    return model


def test_greedy_equals_argmax_of_full_forwards(model: TransNormerLLM) -> None:
    prompt = [3, 14, 15, 9, 2, 6]
    out = list(generate(model, prompt, SamplingConfig(max_new_tokens=10, greedy=True)))
    assert len(out) == 10
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert out == ids[len(prompt) :]


def test_generation_streams(model: TransNormerLLM) -> None:
    stream = generate(model, [1, 2, 3], SamplingConfig(max_new_tokens=5))
    first = next(stream)
    assert isinstance(first, int) and 0 <= first < model.config.vocab_size
    assert len(list(stream)) == 4


def test_same_seed_same_samples(model: TransNormerLLM) -> None:
    sampling = SamplingConfig(max_new_tokens=20, temperature=1.5, seed=7)
    a = list(generate(model, [5, 6], sampling))
    b = list(generate(model, [5, 6], sampling))
    assert a == b
    others = [
        list(generate(model, [5, 6], SamplingConfig(max_new_tokens=20, temperature=1.5, seed=s)))
        for s in (8, 9)
    ]
    assert any(o != a for o in others)


def test_top_k_one_and_top_p_zero_are_greedy(model: TransNormerLLM) -> None:
    greedy = list(generate(model, [4, 4, 4], SamplingConfig(max_new_tokens=8, greedy=True)))
    assert list(generate(model, [4, 4, 4], SamplingConfig(max_new_tokens=8, top_k=1, seed=3))) == greedy
    assert list(generate(model, [4, 4, 4], SamplingConfig(max_new_tokens=8, top_p=0.0, seed=3))) == greedy


def test_top_k_restricts_the_support(model: TransNormerLLM) -> None:
    prompt = [7, 8]
    with torch.no_grad():
        top3 = set(model(torch.tensor([prompt]))[0, -1].topk(3).indices.tolist())
    firsts = {
        next(generate(model, prompt, SamplingConfig(max_new_tokens=1, top_k=3, temperature=5.0, seed=s)))
        for s in range(20)
    }
    assert firsts <= top3


def test_stop_ids_stop(model: TransNormerLLM) -> None:
    greedy = list(generate(model, [1, 2, 3], SamplingConfig(max_new_tokens=12, greedy=True)))
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    out = list(
        generate(model, [1, 2, 3], SamplingConfig(max_new_tokens=12, greedy=True, stop_token_ids=(stop_at,)))
    )
    assert out == greedy[:first]


def test_zero_new_tokens(model: TransNormerLLM) -> None:
    assert list(generate(model, [1], SamplingConfig(max_new_tokens=0))) == []


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": 0.0}, {"top_p": 1.5}, {"top_p": -0.1}, {"top_k": -1}, {"max_new_tokens": -1}],
)
def test_bad_sampling_settings_rejected(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingConfig(**kwargs)


def test_greedy_allows_zero_temperature() -> None:
    SamplingConfig(greedy=True, temperature=0.0)


def test_bad_prompts_rejected_eagerly(model: TransNormerLLM) -> None:
    with pytest.raises(ValueError, match="empty"):
        generate(model, [], SamplingConfig())
    with pytest.raises(ValueError, match="outside"):
        generate(model, [1, 50], SamplingConfig())
