import pytest
import torch

from pretrain.lego.stages import STAGE_FLOWS, set_trainable
from pretrain.models.lego_mt import DEC, ENC, MIX, LegoMT, detach, flow_names, parse_flows
from pretrain.models.lego_mt.config import LegoMTConfig, m2m_1_2b, tiny

GROUPS = ["en", "de", "fr"]


def _model(seed: int = 0, **kw) -> LegoMT:
    torch.manual_seed(seed)
    model = tiny(GROUPS, vocab_size=64).model_copy(update=kw).build()
    # branches start as copies of main/m2m; perturb so routing mix-ups would show
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 64, (3, 7), generator=g)
    src[0, 5:] = 0  # padding
    tgt = torch.randint(4, 64, (3, 6), generator=g)
    return src, tgt[:, :-1], tgt[:, 1:]


def _parts(model: LegoMT) -> dict[str, torch.nn.Module]:
    parts = {"embed": model.embed, "main": model.main, "m2m": model.m2m}
    for g in model.resident:
        parts[f"enc.{g}"] = model.enc_branches[g]
        parts[f"dec.{g}"] = model.dec_branches[g]
    return parts


def _expected(flows: int, group: str) -> set[str]:
    used = {"embed"}
    if flows & DEC:
        used |= {"main", f"dec.{group}"}
    if flows & ENC:
        used |= {f"enc.{group}", "m2m"}
    if flows & MIX:
        used |= {"main", "m2m"}
    return used


@pytest.mark.parametrize("flows", range(1, 8))
def test_gradient_reaches_exactly_the_selected_flows(flows):
    model = _model()
    src, tgt_in, labels = _batch()
    out = model(src, tgt_in, flows, "de", labels=labels)
    assert sorted(k for k in out if k != "loss") == sorted(flow_names(flows))
    assert torch.allclose(out["loss"], sum(out[n]["loss"] for n in flow_names(flows)))
    out["loss"].backward()
    want = _expected(flows, "de")
    for name, part in _parts(model).items():
        grads = [p.grad for p in part.parameters()]
        if name in want:
            assert all(g is not None for g in grads), name
            assert sum(g.abs().sum() for g in grads) > 0, name
        else:
            assert all(g is None for g in grads), name


def test_flow_bitmask_parsing():
    assert flow_names(7) == ["dec", "enc", "mix"]
    assert parse_flows("enc+mix") == ENC | MIX == 6
    assert parse_flows("1") == DEC
    for bad in (0, 8, "foo"):
        with pytest.raises(ValueError):
            parse_flows(bad)


@pytest.mark.parametrize(
    ("encoder", "decoder", "flow", "group"),
    [("main", "fr", "dec", "fr"), ("de", "m2m", "enc", "de"), ("main", "m2m", "mix", "en")],
)
def test_detached_flow_matches_the_flow_in_the_full_model(encoder, decoder, flow, group):
    model = _model().eval()
    src, tgt_in, _ = _batch()
    full = model(src, tgt_in, 7, group)[flow]["logits"]
    single = detach(model, encoder=encoder, decoder=decoder).eval()
    assert torch.equal(single(src, tgt_in), full)
    n_single = sum(p.numel() for p in single.parameters())
    assert n_single < sum(p.numel() for p in model.parameters()) / 2
    with torch.no_grad():  # no shared storage
        single.encoder.layers[0].ffn.up.weight.zero_()
    assert torch.equal(model(src, tgt_in, 7, group)[flow]["logits"], full)


def test_any_encoder_with_any_decoder_detaches():
    model = _model().eval()
    src, tgt_in, _ = _batch()
    flow = detach(model, encoder="de", decoder="fr").eval()
    mem = model.encode("de", src)
    assert torch.equal(flow(src, tgt_in), model.decode("fr", mem, src, tgt_in))


def test_stage2_leaves_frozen_weights_bit_identical():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = set_trainable(model, 2, "de")
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    for seed in range(3):
        src, tgt_in, labels = _batch(seed)
        opt.zero_grad()
        model(src, tgt_in, STAGE_FLOWS[2], "de", labels=labels)["loss"].backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("dec_branches.de.") for k in changed)
    for k in before:
        if k.startswith(("embed.", "main.")):
            assert torch.equal(before[k], after[k]), k


def test_stage1_trains_enc_and_mix_parts_only():
    model = _model()
    params = {id(p) for p in set_trainable(model, 1, "fr")}
    assert all(id(p) in params for p in model.enc_branches["fr"].parameters())
    assert not any(id(p) in params for p in model.dec_branches["fr"].parameters())
    assert not any(id(p) in params for p in model.enc_branches["de"].parameters())


def test_residency_and_layerdrop():
    model = tiny(GROUPS, vocab_size=64).model_copy(update={"layerdrop": 0.5}).build(resident=["de"])
    assert model.resident == ["de"]
    with pytest.raises(KeyError, match="not resident"):
        model.encoder("fr")
    with pytest.raises(KeyError, match="unknown group"):
        model.decoder("xx")
    model.drop_group("de")
    model.add_group("fr")
    assert model.resident == ["fr"]
    src, tgt_in, _ = _batch()
    model.eval()
    a = model(src, tgt_in, 7, "fr")["mix"]["logits"]
    assert torch.equal(a, model(src, tgt_in, 7, "fr")["mix"]["logits"])


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="n_heads"):
        LegoMTConfig(d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="group name"):
        LegoMTConfig(groups=["main"])
    big = m2m_1_2b(["en", "de"])
    per = big.num_params_per_part()
    assert 1.2e9 < per["embed"] + per["encoder"] + per["decoder"] < 1.3e9
    small = tiny(["en"])
    model = small.build()
    per = small.num_params_per_part()
    n = sum(p.numel() for p in model.parameters())
    assert n == per["embed"] + 2 * per["encoder"] + 2 * per["decoder"]


def test_yaml_presets_load():
    from pretrain.lego.train import LegoRunConfig

    big = LegoRunConfig.from_yaml("configs/lego-mt-1.2b.yaml")
    per = big.model.num_params_per_part()
    assert round((per["embed"] + per["encoder"] + per["decoder"]) / 1e9, 2) == 1.24
    assert big.model.layerdrop == 0.05 and len(big.model.groups) == 7
    from pretrain.lego.parallelize import check_lego_layout

    assert big.parallel.engine == "deepspeed" and big.parallel.zero_stage == 2
    check_lego_layout(big.parallel, world_size=8)  # a layout the Lego trainer runs
    assert LegoRunConfig.from_yaml("configs/lego-mt-tiny.yaml").model.d_model == 128
