import pytest
import torch
from mlflow.tracking import MlflowClient

from pretrain.lego.baseline import all_pairs, matched_steps, train_baseline
from pretrain.lego.data import batch_indices
from pretrain.lego.detach import load_flow
from pretrain.lego.train import LegoRunConfig
from pretrain.lego.translate import translate_ids
from tests.lego.test_train import _cfg

DIRECTIONS = {"en-de", "en-fr", "de-en", "de-fr", "fr-en", "fr-de"}


def _tracked(data_dir) -> LegoRunConfig:
    data = _cfg(data_dir).to_dict()
    data["tracking"]["enabled"] = True
    return LegoRunConfig.from_dict(data)


@pytest.fixture(scope="module")
def baseline_run(synthetic_pairs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("baseline")
    return run_dir, train_baseline(_tracked(synthetic_pairs), run_dir)


def test_matched_steps_is_the_whole_lego_schedule(synthetic_pairs):
    cfg = _cfg(synthetic_pairs)
    assert matched_steps(cfg) == 3 * 4 + 3 * 3  # 3 groups x (stage 1 + stage 2), as the Lego-MT run
    two_rounds = _cfg(synthetic_pairs, rounds=2, stages=[1])
    assert matched_steps(two_rounds) == 2 * 3 * 4


def test_trains_on_every_groups_pairs_for_the_matched_steps(baseline_run, synthetic_pairs):
    run_dir, res = baseline_run
    cfg = _cfg(synthetic_pairs)
    assert res["global_step"] == len(res["losses"]) == matched_steps(cfg) == 21
    assert res["batch_size"] == cfg.train.batch_size
    assert res["directions"] == {d: 24 for d in DIRECTIONS} and res["pairs"] == 144
    pairs = all_pairs(synthetic_pairs, cfg.model.groups)
    seen = {pairs[i].src_lang for s in range(21) for i in batch_indices(len(pairs), 4, s, cfg.train.seed)}
    assert seen == {"en", "de", "fr"}  # batches mix the groups
    losses = res["losses"]
    assert sum(losses[s] for s in range(17, 22)) < sum(losses[s] for s in range(1, 6))
    client = MlflowClient(res["mlflow_tracking_uri"])
    run = client.get_run(res["mlflow_run_id"])
    assert run.info.run_name == "lego-mt-baseline" and (run_dir / "mlflow.db").is_file()
    assert len(client.get_metric_history(res["mlflow_run_id"], "loss")) == 21


def test_its_flow_loads_and_translates(baseline_run):
    run_dir, _ = baseline_run
    flow, meta = load_flow(run_dir)  # the run directory holds flow/
    assert (meta["encoder"], meta["decoder"], meta["run_dir"]) == ("main", "m2m", str(run_dir.resolve()))
    out = translate_ids(flow, [[12, 13, 14], [20, 21]], tgt_tag=meta["lang_tags"]["de"], eos=3, max_len=8)
    assert len(out) == 2 and all(isinstance(t, int) for row in out for t in row)


def test_resume_equals_uninterrupted(baseline_run, synthetic_pairs, tmp_path):
    ref_dir, ref = baseline_run
    cfg = _cfg(synthetic_pairs)
    first = train_baseline(cfg, tmp_path, stop_after=10)  # killed after step 10, last save at 9
    assert max(first["losses"]) == 10
    second = train_baseline(cfg, tmp_path)
    assert second["resumed_from"] == 9 and min(second["losses"]) == 10
    assert {**first["losses"], **second["losses"]} == ref["losses"]
    a, _ = load_flow(ref_dir)
    b, _ = load_flow(tmp_path)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert train_baseline(cfg, tmp_path)["global_step"] == 21  # finished: a re-run only reports


def test_init_from_continues_a_multilingual_model(baseline_run, synthetic_pairs, tmp_path):
    """A baseline started from a trained flow begins where that flow ended, not at random init."""
    run_dir, ref = baseline_run
    cont = train_baseline(_cfg(synthetic_pairs, init_from=str(run_dir)), tmp_path / "cont", stop_after=1)
    assert cont["losses"][1] < ref["losses"][5] < ref["losses"][1]
    wide = _cfg(synthetic_pairs, init_from=str(run_dir))
    wide = wide.model_copy(update={"model": wide.model.model_copy(update={"d_model": 64})})
    with pytest.raises(ValueError, match="d_model"):
        train_baseline(wide, tmp_path / "wide", stop_after=0)
