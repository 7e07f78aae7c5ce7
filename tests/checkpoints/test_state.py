"""flatten_state / unflatten_state: exact, pickle-free round trips of real training state."""

from __future__ import annotations

import json
import math
import random
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from checkpoints.save import _independent
from checkpoints.state import flatten_state, unflatten_state


def roundtrip(state: Any) -> Any:
    """Through the real on-disk encodings: safetensors bytes and JSON text."""
    tensors, skeleton = flatten_state(state)
    blob = save(_independent(tensors))
    text = json.dumps(skeleton, allow_nan=False)  # the skeleton is strict JSON
    return unflatten_state(load(blob), json.loads(text))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: Any, b: Any, path: str = "") -> None:
    """Equal values *and* types, recursively; tensors bit for bit; floats by bit pattern."""
    assert type(a) is type(b), f"{path}: {type(a)} vs {type(b)}"
    if isinstance(a, dict):
        assert list(a.keys()) == list(b.keys()), path
        for (ka, va), kb in zip(a.items(), b.keys()):
            assert type(ka) is type(kb), f"{path}: key {ka!r}"
            assert_same(va, b[kb], f"{path}/{ka}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(_bytes(a), _bytes(b)), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    elif isinstance(a, (float, np.generic)):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), path
    else:
        assert a == b, path


def test_scalars_containers_and_tensors_roundtrip_exactly() -> None:
    odict = OrderedDict(w=torch.arange(4.0))
    odict._metadata = OrderedDict({"": {"version": 2}})  # type: ignore[attr-defined]
    state = {
        "ints": {0: 1, 1: -(2**70), "0": "str key", None: None, 2.5: "float key"},
        "bool_keys": {True: 1, False: 0},
        "floats": [0.1, -0.0, math.inf, -math.inf, math.nan, 1e308, 5e-324],
        "nested": ([1, (2, [3])], ()),
        "tensors": {
            "bf16": torch.randn(3, 5).to(torch.bfloat16),
            "zero_dim": torch.tensor(3.25),
            "uint8": torch.randint(0, 255, (7,), dtype=torch.uint8),
            "bool": torch.tensor([True, False]),
            "int64": torch.tensor([2**62, -1]),
            "f64": torch.tensor([math.pi], dtype=torch.float64),
            "empty": torch.empty(0, 3),
            "transposed": torch.randn(4, 3).t(),
            "nan": torch.tensor([math.nan, math.inf]),
        },
        "numpy": {
            "u4": np.arange(5, dtype=np.uint32),
            "big_endian": np.arange(3, dtype=">i8"),
            "zero_dim": np.array(1.5),
            "f16_2d": np.ones((2, 3), dtype=np.float16),
            "scalars": (np.float32(1.25), np.int64(-3), np.bool_(True), np.float64(math.nan)),
        },
        "torch_meta": [torch.bfloat16, torch.device("cpu"), torch.Size([2, 3])],
        "odict": odict,
    }
    out = roundtrip(state)
    assert_same(state, out)
    assert out["odict"]._metadata == {"": {"version": 2}}


def test_tied_tensors_are_stored_once_and_restored_shared() -> None:
    weight = torch.randn(10, 4)
    state = {"embed.weight": weight, "lm_head.weight": weight.detach()}
    tensors, _ = flatten_state(state)
    assert list(tensors) == ["embed.weight"]
    out = roundtrip(state)
    assert out["lm_head.weight"] is out["embed.weight"]
    assert torch.equal(out["embed.weight"], weight)


def test_views_of_one_storage_are_saved_independently() -> None:
    fused = torch.randn(6, 4)
    state = {"q": fused[:2], "k": fused[2:4], "whole": fused, "flat": fused.view(-1)}
    out = roundtrip(state)
    for key, value in state.items():
        assert torch.equal(out[key], value), key


def test_model_state_dict_keeps_its_keys_as_tensor_names() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    tensors, _ = flatten_state(model.state_dict())
    assert list(tensors) == list(model.state_dict())


def test_adamw_and_scheduler_state_restore_the_next_step_bit_for_bit() -> None:
    torch.manual_seed(0)

    def make() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
        cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[3])
        return model, opt, sched

    def step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any, x: torch.Tensor) -> None:
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        sched.step()

    model, opt, sched = make()
    xs = [torch.randn(4, 8) for _ in range(5)]
    for x in xs[:3]:
        step(model, opt, sched, x)

    saved = roundtrip(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict()}
    )
    assert all(type(k) is int for k in saved["optimizer"]["state"])
    assert type(saved["optimizer"]["param_groups"][0]["betas"]) is tuple
    assert_same(opt.state_dict(), saved["optimizer"])
    assert_same(sched.state_dict(), saved["scheduler"])

    model2, opt2, sched2 = make()
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    for x in xs[3:]:
        step(model, opt, sched, x)
        step(model2, opt2, sched2, x)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_rng_states_reproduce_the_same_draws() -> None:
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    generator = torch.Generator().manual_seed(4)
    rng = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "generator": generator.get_state(),
        "np_generator": np.random.default_rng(5).bit_generator.state,
    }
    expected = (
        torch.rand(5),
        np.random.rand(5),
        [random.random() for _ in range(5)],
        torch.rand(5, generator=generator),
    )

    restored = roundtrip(rng)
    assert type(restored["python"]) is tuple and type(restored["python"][1]) is tuple
    torch.set_rng_state(restored["torch"])
    np.random.set_state(restored["numpy"])
    random.setstate(restored["python"])
    generator.set_state(restored["generator"])
    got = (
        torch.rand(5),
        np.random.rand(5),
        [random.random() for _ in range(5)],
        torch.rand(5, generator=generator),
    )
    assert torch.equal(expected[0], got[0])
    assert np.array_equal(expected[1], got[1])
    assert expected[2] == got[2]
    assert torch.equal(expected[3], got[3])
    bit_gen = np.random.PCG64()
    bit_gen.state = restored["np_generator"]
    assert np.random.Generator(bit_gen).random() == np.random.default_rng(5).random()


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"a": {"b": [1, object()]}}, "a/b/1"),
        ({"opt": {(1, 2): 3}}, "opt"),
        ({"x": {1, 2}}, "x"),
        ({"arr": np.array([object()])}, "arr"),
    ],
)
def test_unsupported_types_raise_type_error_naming_the_path(state: Any, path: str) -> None:
    with pytest.raises(TypeError, match=f"'{path}'"):
        flatten_state(state)


def test_malformed_skeleton_is_a_clear_error() -> None:
    tensors, skeleton = flatten_state({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="missing"):
        unflatten_state({}, skeleton)
    with pytest.raises(ValueError, match="unknown tag"):
        unflatten_state(tensors, {"@": "pickle", "v": "..."})
