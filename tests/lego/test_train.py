import json

import pytest
import torch

from checkpoints import load_checkpoint
from pretrain.lego.store import PartitionStore
from pretrain.lego.train import LegoRunConfig, train
from pretrain.models.lego_mt.config import tiny


def _cfg(data_dir, **train_kw) -> LegoRunConfig:  # also used by conftest.full_run
    train = dict(
        data_dir=str(data_dir),
        stage1_steps=4,
        stage2_steps=3,
        batch_size=4,
        max_len=12,
        checkpoint_interval=3,
        lr=3e-3,
        warmup=1,
    )
    train.update(train_kw)
    model = tiny(["en", "de", "fr"], vocab_size=64).model_copy(update={"dropout": 0.1, "layerdrop": 0.2})
    return LegoRunConfig(model=model, train=train, tracking={"enabled": False})


def _partitions(run_dir):
    store = PartitionStore(run_dir / "parts")
    index = store.read_index()["partitions"]
    return {name: store.load(name, step) for name, step in index.items()}


def test_schedule_residency_and_mlflow(full_run):
    run_dir, res = full_run
    assert res["global_step"] == 3 * 4 + 3 * 3
    assert [r for _, r in res["resident"]] == [["en"], ["de"], ["fr"]] * 2
    full = tiny(["en", "de", "fr"], vocab_size=64).build()
    assert res["peak_params"] < sum(p.numel() for p in full.parameters())
    parts = _partitions(run_dir)
    assert sorted(parts) == ["dec_de", "dec_en", "dec_fr", "enc_de", "enc_en", "enc_fr", "shared"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(res["mlflow_tracking_uri"])
    hist = client.get_metric_history(res["mlflow_run_id"], "loss")
    assert len(hist) == res["global_step"]
    assert (run_dir / "mlflow.db").is_file()
    assert {"loss_enc", "loss_mix", "loss_dec", "lr"} <= set(
        client.get_run(res["mlflow_run_id"]).data.metrics
    )


def test_stage2_does_not_touch_shared_or_encoder_branches(full_run):
    run_dir, _ = full_run
    index = PartitionStore(run_dir / "parts").read_index()["partitions"]
    # stage 1 ends at step 12: shared and encoder branches were last written there or before
    assert index["shared"] == 12 and all(index[f"enc_{g}"] <= 12 for g in ("en", "de", "fr"))
    assert [index[f"dec_{g}"] for g in ("en", "de", "fr")] == [15, 18, 21]


def test_resume_mid_group_equals_uninterrupted(full_run, synthetic_pairs, tmp_path):
    _, ref = full_run
    cfg = _cfg(synthetic_pairs)
    first = train(cfg, tmp_path, stop_after=7)  # killed in group 2 of stage 1, last save at 6
    assert max(first["losses"]) == 7
    second = train(cfg, tmp_path)
    assert min(second["losses"]) == 7  # resumed from the step-6 checkpoint
    merged = {**first["losses"], **second["losses"]}
    assert merged == ref["losses"]
    a, b = _partitions(full_run[0]), _partitions(tmp_path)
    for name in a:
        for part, tensors in a[name].items():
            for key, value in tensors.items():
                assert torch.equal(value, b[name][part][key]), (name, part, key)


def test_losses_go_down(full_run):
    _, res = full_run
    losses = res["losses"]
    assert losses[4] < losses[1]


def test_state_checkpoint_is_loadable(full_run):
    run_dir, _ = full_run
    ckpt = load_checkpoint(run_dir / "state" / "step_00000021")
    assert ckpt.metadata["phase"] == 6


def test_init_from_a_multilingual_model(full_run, synthetic_pairs, tmp_path):
    """Every branch starts from the given model: shared parts = its embedding/encoder/decoder,
    every encoder branch = its encoder; a model of another shape is refused by name."""
    from pretrain.lego.detach import detach_from_run, save_flow

    flow = detach_from_run(full_run[0], encoder="de", decoder="fr")
    meta = json.loads((synthetic_pairs / "meta.json").read_text())
    save_flow(flow, tmp_path / "flow", meta=meta)
    cfg = _cfg(synthetic_pairs, init_from=str(tmp_path / "flow"))
    train(cfg, tmp_path / "run", stop_after=0)
    parts = _partitions_at_start(tmp_path / "run")
    for key, value in flow.encoder.state_dict().items():
        assert torch.equal(parts["shared"]["main"][key], value)
        for g in ("en", "de", "fr"):
            assert torch.equal(parts[f"enc_{g}"]["encoder"][key], value)
    for key, value in flow.decoder.state_dict().items():
        assert torch.equal(parts["shared"]["m2m"][key], value)
    assert torch.equal(parts["shared"]["embed"]["tokens.weight"], flow.embed.tokens.weight)

    wide = _cfg(synthetic_pairs, init_from=str(tmp_path / "flow"))
    wide = wide.model_copy(update={"model": wide.model.model_copy(update={"ffn_dim": 128})})
    with pytest.raises(ValueError, match="ffn_dim"):
        train(wide, tmp_path / "wide", stop_after=0)


def _partitions_at_start(run_dir):
    store = PartitionStore(run_dir / "parts")
    names = [p.name for p in (run_dir / "parts").iterdir()]
    return {name: store.load(name, 0) for name in names}
