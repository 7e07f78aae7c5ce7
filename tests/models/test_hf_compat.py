"""Released-checkpoint compatibility of TransNormerLLM.

The authors' code and weights cannot be downloaded here, so the logits are checked against an
independent reference forward written below directly from the formulas (REFERENCE.md section 1),
in float64 over the Hugging Face state dict: naive quadratic masked attention, explicit SRMSNorm,
SGLU, silu q/k, output gate, ALiBi-style slopes with the per-layer factor, LRPE and the embedding
scale. Tiny random checkpoints are written by hand in the released layout.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pretrain.models.transnormer import TransNormerConfig
from pretrain.models.transnormer.hf import (
    HFCheckpointError,
    HFConfigError,
    config_from_hf,
    config_to_hf,
    load_hf,
    load_hf_state_dict,
    save_hf,
)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny models: one thread is faster, and immune to oversubscribed CI machines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- reference forward


def _ref_slopes(n: int) -> list[float]:
    """Per-head base slopes 2^(-8 j / n), with the ALiBi rule for n not a power of two."""
    if math.log2(n).is_integer():
        return [2.0 ** (-8.0 * j / n) for j in range(1, n + 1)]
    p = 2 ** math.floor(math.log2(n))
    return _ref_slopes(p) + _ref_slopes(2 * p)[0::2][: n - p]


def _srms(x: torch.Tensor) -> torch.Tensor:
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def reference_logits(sd: dict[str, torch.Tensor], hf: dict[str, Any], ids: torch.Tensor) -> torch.Tensor:
    """The released model's function, from its config.json and weights, in float64."""
    w = {k: v.double() for k, v in sd.items()}
    d, L, H = hf["decoder_embed_dim"], hf["decoder_layers"], hf["decoder_attention_heads"]
    lrpe = hf.get("linear_use_lrpe_list") or [0] * L
    scale = 1.0 if hf.get("no_scale_embedding", False) else math.sqrt(d)
    b, n = ids.shape
    x = w["model.embed_tokens.weight"][ids] * scale
    pos = torch.arange(n, dtype=torch.float64)
    dist = pos[:, None] - pos[None, :]
    for i in range(L):
        p = f"model.layers.{i}."
        y = _srms(x)
        q, k, v, u = (y @ w[p + "token_mixer.qkvu_proj.weight"].T).chunk(4, dim=-1)
        q, k = F.silu(q), F.silu(k)
        q, k, v = (t.reshape(b, n, H, -1).transpose(1, 2) for t in (q, k, v))
        if lrpe[i]:
            theta = w[p + "token_mixer.lrpe.theta"]  # (H, 1, h)
            ang = theta * pos[:, None]  # (H, n, h)
            q = torch.cat([q * torch.cos(ang), q * torch.sin(ang)], dim=-1)
            k = torch.cat([k * torch.cos(ang), k * torch.sin(ang)], dim=-1)
        slope = torch.tensor(_ref_slopes(H), dtype=torch.float64) * (1 - i / (L - 1) + 1e-5)
        decay = torch.exp(-slope[:, None, None] * dist.clamp(min=0)) * (dist >= 0)
        o = ((q @ k.transpose(-1, -2)) * decay) @ v
        o = o.transpose(1, 2).reshape(b, n, -1)
        x = x + (_srms(o) * u) @ w[p + "token_mixer.out_proj.weight"].T
        y = _srms(x)
        glu = (y @ w[p + "channel_mixer.l1.weight"].T) * (y @ w[p + "channel_mixer.l2.weight"].T)
        x = x + glu @ w[p + "channel_mixer.l3.weight"].T
    head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
    if hf.get("tie_word_embeddings", True):
        head = w["model.embed_tokens.weight"]
    return _srms(x) @ head.T


# ----------------------------------------------------------------------------- hand-written checkpoints


def _hf_config(**kw: Any) -> dict[str, Any]:
    cfg = {
        "architectures": ["TransnormerForCausalLM"],
        "auto_map": {"AutoModelForCausalLM": "modeling_transnormer.TransnormerForCausalLM"},
        "model_type": "transnormer",
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "vocab_size": 101,
        "init_std": 0.02,
        "decoder_embed_dim": 32,
        "decoder_layers": 3,
        "decoder_attention_heads": 4,
        "no_scale_embedding": False,
        "norm_type": "simplermsnorm",
        "linear_use_lrpe_list": [1, 0, 0],
        "hidden_dim": 32,
        "linear_act_fun": "silu",
        "glu_dim": 48,
        "bias": False,
        "torch_dtype": "float32",
        "use_cache": True,
    }
    cfg.update(kw)
    return cfg


def _hf_weights(hf: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the released names; std 0.2 so that every part visibly matters."""
    g = torch.Generator().manual_seed(seed)
    d, L, H = hf["decoder_embed_dim"], hf["decoder_layers"], hf["decoder_attention_heads"]
    hid, glu, V = hf["hidden_dim"], hf["glu_dim"], hf["vocab_size"]
    glu = d if glu == -1 else glu

    def rnd(*shape: int, std: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * std

    sd = {"model.embed_tokens.weight": rnd(V, d, std=0.5 if hf.get("no_scale_embedding") else 0.1)}
    for i, use_lrpe in enumerate(hf.get("linear_use_lrpe_list") or [0] * L):
        p = f"model.layers.{i}."
        sd[p + "token_mixer.qkvu_proj.weight"] = rnd(4 * hid, d)
        sd[p + "token_mixer.out_proj.weight"] = rnd(d, hid)
        if use_lrpe:  # random, not the init formula: the loaded values must be used
            sd[p + "token_mixer.lrpe.theta"] = torch.rand(H, 1, d // H, generator=g)
        sd[p + "channel_mixer.l1.weight"] = rnd(glu, d)
        sd[p + "channel_mixer.l2.weight"] = rnd(glu, d)
        sd[p + "channel_mixer.l3.weight"] = rnd(d, glu)
    if not hf.get("tie_word_embeddings", True):
        sd["lm_head.weight"] = rnd(V, d)
    return sd


def _write(directory: Path, hf: dict[str, Any], sd: dict[str, torch.Tensor], fmt: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf))
    if fmt == "safetensors":
        save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    elif fmt == "sharded":
        names = list(sd)
        parts = [names[: len(names) // 2], names[len(names) // 2 :]]
        weight_map = {}
        for i, part in enumerate(parts, 1):
            fname = f"model-{i:05d}-of-00002.safetensors"
            save_file({k: sd[k] for k in part}, directory / fname)
            weight_map.update(dict.fromkeys(part, fname))
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    else:  # pytorch_model.bin, tied checkpoints keep both names as torch.save(state_dict()) does
        full = dict(sd)
        if "lm_head.weight" not in full:
            full["lm_head.weight"] = full["model.embed_tokens.weight"]
        torch.save(full, directory / "pytorch_model.bin")
    return directory


CASES = {
    # LRPE on layer 0 (as the 15B release), untied (tie_word_embeddings written false)
    "lrpe0_untied_safetensors": (_hf_config(tie_word_embeddings=False), "safetensors"),
    # tied by the HF default (key absent), lm_head not stored
    "lrpe0_tied_default_sharded": (_hf_config(linear_use_lrpe_list=[1, 0, 1]), "sharded"),
    "tied_bin": (_hf_config(tie_word_embeddings=True, linear_use_lrpe_list=[1, 0, 0]), "bin"),
    # GLA width != d, glu_dim=-1 (means d), no embedding scale, no LRPE list at all
    "hidden_dim_noscale": (
        _hf_config(
            hidden_dim=48, glu_dim=-1, no_scale_embedding=True, linear_use_lrpe_list=[], tie_word_embeddings=False
        ),
        "safetensors",
    ),
    # 6 heads: the ALiBi rule for a head count that is not a power of two
    "six_heads": (
        _hf_config(decoder_embed_dim=36, hidden_dim=36, decoder_attention_heads=6, decoder_layers=2,
                   linear_use_lrpe_list=[1, 0], tie_word_embeddings=False),
        "safetensors",
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_reference(name: str, tmp_path: Path) -> None:
    hf, fmt = CASES[name]
    sd = _hf_weights(hf)
    # attention_block_size 16: 70 tokens span several blocks of the block form
    model = load_hf(_write(tmp_path / name, hf, sd, fmt), attention_block_size=16)
    ids = torch.randint(0, hf["vocab_size"], (2, 70), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(sd, hf, ids)
    assert ref.abs().max() > 1.0  # the check is not vacuous
    with torch.no_grad():
        got = model(ids)
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4)

    # prefill + recurrent decoding (LRPE offsets) give the same function
    logits, state = model.prefill(ids[:, :37])
    torch.testing.assert_close(logits.double(), ref[:, :37], rtol=1e-4, atol=1e-4)
    for t in range(37, 45):
        step, state = model.decode_step(ids[:, t], state)
        torch.testing.assert_close(step.double(), ref[:, t], rtol=1e-4, atol=1e-4)


def test_load_in_bf16(tmp_path: Path) -> None:
    hf, fmt = CASES["lrpe0_untied_safetensors"]
    sd = _hf_weights(hf)
    directory = _write(tmp_path, hf, sd, fmt)
    model = load_hf(directory, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.model.layers[1].token_mixer.slope.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, sd["lm_head.weight"].to(torch.bfloat16))
    cast = load_hf(directory).to(torch.bfloat16)  # same as loading in fp32 and casting
    ids = torch.randint(0, hf["vocab_size"], (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), cast(ids), rtol=0, atol=0)


def test_loaded_config_fields(tmp_path: Path) -> None:
    hf, _ = CASES["lrpe0_tied_default_sharded"]
    cfg = config_from_hf(hf)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.glu_dim, cfg.vocab_size) == (32, 3, 4, 48, 101)
    assert cfg.lrpe_layers == [0, 2] and cfg.tie_word_embeddings and cfg.hidden_dim is None
    hf2, _ = CASES["hidden_dim_noscale"]
    cfg2 = config_from_hf(hf2)
    assert cfg2.hidden_dim == 48 and cfg2.glu_dim == 32 and cfg2.no_scale_embedding and cfg2.lrpe_layers == []
    model = load_hf(_write(tmp_path, hf, _hf_weights(hf), "sharded"))
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_round_trip(tied: bool, tmp_path: Path) -> None:
    cfg = TransNormerConfig(vocab_size=90, d_model=32, n_layers=3, n_heads=4, glu_dim=40,
                            lrpe_layers=[0], tie_word_embeddings=tied, attention_block_size=16)  # fmt: skip
    torch.manual_seed(0)
    model = cfg.build()
    with torch.no_grad():
        model.model.layers[0].token_mixer.lrpe.theta.mul_(1.5)  # not the init value
    tok = tmp_path / "spm.model"
    tok.write_bytes(b"\x00sentencepiece-bytes")
    out = save_hf(model, tmp_path / "ckpt", tokenizer_model=tok, max_shard_bytes=40_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    hf = json.loads((out / "config.json").read_text())
    assert hf["linear_use_lrpe_list"] == [1, 0, 0] and hf["tie_word_embeddings"] is tied
    assert ("lm_head.weight" in load_hf_state_dict(out)) is not tied

    loaded = load_hf(out, attention_block_size=16)
    assert loaded.config == cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), model(ids), rtol=0, atol=0)

    # the written files follow the reference function too
    ref = reference_logits(load_hf_state_dict(out), hf, ids)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).double(), ref, rtol=1e-4, atol=1e-4)

    with pytest.raises(FileExistsError):
        save_hf(model, out)
    save_hf(model, out, overwrite=True)  # single file now; stale shards removed
    assert not (out / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]


def test_config_round_trip() -> None:
    for cfg in (
        TransNormerConfig(),
        TransNormerConfig(d_model=64, n_heads=4, hidden_dim=96, n_layers=2, no_scale_embedding=True),
        TransNormerConfig(n_layers=5, lrpe_layers=[0, 3], tie_word_embeddings=True, init_std=0.01),
    ):
        assert config_from_hf(config_to_hf(cfg)) == cfg
    with pytest.raises(HFConfigError, match="norm_eps"):
        config_to_hf(TransNormerConfig(norm_eps=1e-5))


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"bias": True}, "bias"),
        ({"norm_type": "layernorm"}, "norm_type"),
        ({"linear_act_fun": "relu"}, "linear_act_fun"),
        ({"linear_use_lrpe_list": [1, 0]}, "linear_use_lrpe_list"),
        ({"hidden_dim": 48}, "hidden_dim"),  # with LRPE on layer 0
    ],
)
def test_unsupported_configs_are_refused(change: dict[str, Any], key: str) -> None:
    with pytest.raises(HFConfigError, match=key):
        config_from_hf(_hf_config(**change))


def test_weight_errors(tmp_path: Path) -> None:
    hf = _hf_config(tie_word_embeddings=False)
    sd = _hf_weights(hf)
    with pytest.raises(HFCheckpointError, match=r"config\.json"):
        load_hf(tmp_path / "nowhere")
    missing = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    with pytest.raises(HFCheckpointError, match="lm_head"):
        load_hf(_write(tmp_path / "a", hf, missing, "safetensors"))
    no_theta = {k: v for k, v in sd.items() if "lrpe" not in k}
    with pytest.raises(HFCheckpointError, match="missing"):
        load_hf(_write(tmp_path / "b", hf, no_theta, "safetensors"))
    wrong = dict(sd, **{"model.layers.1.channel_mixer.l3.weight": torch.zeros(32, 47)})
    with pytest.raises(HFCheckpointError, match="shape"):
        load_hf(_write(tmp_path / "c", hf, wrong, "safetensors"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text(json.dumps(hf))
    with pytest.raises(HFCheckpointError, match="no weights"):
        load_hf(tmp_path / "d")


class _Payload:
    """Unpickling this runs a shell command that creates a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.mark.parametrize("container", ["raw_pickle", "torch_zip"])
def test_malicious_pickle_is_refused(container: str, tmp_path: Path) -> None:
    hf = _hf_config(tie_word_embeddings=False)
    directory = tmp_path / "evil"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf))
    marker = tmp_path / "pwned"
    payload = {**_hf_weights(hf), "model.embed_tokens.weight": _Payload(marker)}
    if container == "raw_pickle":
        data = pickle.dumps(payload)
        pickle.loads(data)  # the payload is live: a plain unpickle runs it
        assert marker.exists()
        marker.unlink()
        (directory / "pytorch_model.bin").write_bytes(data)
    else:
        torch.save(payload, directory / "pytorch_model.bin")
    with pytest.raises(HFCheckpointError, match="refused"):
        load_hf(directory)
    assert not marker.exists()


def test_plain_bin_is_memory_mapped(tmp_path: Path) -> None:
    hf = _hf_config(tie_word_embeddings=False)
    sd = _hf_weights(hf)
    directory = _write(tmp_path, hf, sd, "bin")
    loaded = load_hf_state_dict(directory)
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)
