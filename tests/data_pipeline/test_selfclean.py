"""The self-cleaning loop: two rounds with a seconds-long evaluation model on stdlib text with
planted garbage, the batched scorer, reports, MLflow metrics and resumption."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
import torch

from data_pipeline.selfclean import SelfCleanConfig, run_selfclean, score_token_lists
from data_pipeline.selfclean.scoring import windows_of
from data_pipeline.selfclean.tracking import DataTracker
from pretrain.config import ConfigError
from pretrain.tracking import TrackingConfig

GARBAGE = 12
#: A TransNormerLLM that trains in a second or two (the conftest's tiny shape).
TINY_EVAL = [
    "data.seq_len=64",
    "model.vocab_size=512",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.glu_dim=64",
    "model.attention_block_size=16",
    "train.steps=16",
    "train.micro_batch_size=8",
    "train.warmup_steps=2",
    "train.log_interval=8",
    "train.eval_interval=0",
    "train.eval_batches=1",
    "train.threads=1",
    "checkpoint.interval=100",
]


def write_corpus_with_garbage(path: Path, max_bytes: int = 150_000, garbage: int = GARBAGE) -> Path:
    """Stdlib documents plus ``garbage`` random character strings (ids ``garbage-<i>``)."""
    from data_pipeline.corpus import build_stdlib_corpus

    build_stdlib_corpus(path, max_bytes=max_bytes)
    rng = random.Random(0)
    alphabet = string.ascii_letters + string.digits + string.punctuation + " "
    with open(path, "a", encoding="utf-8") as f:
        for i in range(garbage):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(300, 900)))
            f.write(json.dumps({"id": f"garbage-{i}", "text": text}) + "\n")
    return path


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(folder.glob("*.jsonl")) for line in p.read_text().splitlines()]


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("selfclean")
    raw = write_corpus_with_garbage(root / "raw.jsonl")
    config = SelfCleanConfig(
        rounds=2, quantile=0.9, train_config="tnl-tiny", train_overrides=TINY_EVAL, review_samples=5
    )
    tracking = TrackingConfig(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="data-test")
    tracker = DataTracker(tracking, root, run_name="selfclean-test", params=config.to_dict())
    result = run_selfclean([raw], root / "sc", config, tasks=2, on_round=tracker.log_round)
    tracker.finish([])
    return {"root": root, "raw": raw, "config": config, "result": result, "tracker": tracker}


def test_garbage_scores_highest_and_is_dropped(two_rounds: dict) -> None:
    first = two_rounds["root"] / "sc" / "round_1"
    dropped, kept = _records(first / "dropped"), _records(first / "kept")
    scores = {r["id"]: r["perplexity"] for r in dropped + kept}
    garbage = {k: v for k, v in scores.items() if k.startswith("garbage-")}
    real = sorted(v for k, v in scores.items() if not k.startswith("garbage-"))
    assert len(garbage) == GARBAGE
    assert min(garbage.values()) > real[len(real) // 2]  # above the median real document
    top = sorted(scores, key=scores.get, reverse=True)[:GARBAGE]
    assert sum(k.startswith("garbage-") for k in top) >= GARBAGE - 2
    assert {r["id"] for r in dropped} >= set(garbage)  # the quantile threshold drops all of it
    assert all(
        not r["id"].startswith("garbage-") for r in _records(two_rounds["root"] / "sc" / "round_2" / "kept")
    )


def test_counts_reconcile(two_rounds: dict) -> None:
    rounds = two_rounds["result"]["rounds"]
    n_raw = len(two_rounds["raw"].read_text().splitlines())
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["in"] == n_raw
    assert rounds[1]["in"] == rounds[0]["kept"]
    for r in rounds:
        rdir = two_rounds["root"] / "sc" / f"round_{r['round']}"
        assert r["in"] == r["kept"] + r["dropped"] and r["dropped"] > 0
        assert len(_records(rdir / "kept")) == r["kept"] and len(_records(rdir / "dropped")) == r["dropped"]
        assert all(s["perplexity"] <= r["threshold"] for s in _records(rdir / "kept"))
        assert json.loads((rdir / "stats.json").read_text()) == r
        assert not (rdir / "scored").exists()
    assert rounds[0]["eval_model"] != rounds[1]["eval_model"]  # retrained on round 1's kept docs


def test_report_files(two_rounds: dict) -> None:
    import matplotlib.image

    for k in (1, 2):
        rdir = two_rounds["root"] / "sc" / f"round_{k}"
        png = rdir / "histogram.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        report = (rdir / "report.md").read_text()
        assert f"round {k}" in report and "histogram.png" in report and "threshold" in report
        for name, kept in (("kept", True), ("dropped", False)):
            review = [json.loads(x) for x in (rdir / f"review_{name}.jsonl").read_text().splitlines()]
            assert 0 < len(review) <= 5
            assert all(r["kept"] is kept and r["perplexity"] > 0 and r["text"] for r in review)
            assert [r["perplexity"] for r in review] == sorted(
                (r["perplexity"] for r in review), reverse=True
            )


def test_mlflow_has_per_round_metrics(two_rounds: dict) -> None:
    from mlflow.tracking import MlflowClient

    tracker = two_rounds["tracker"]
    client = MlflowClient(tracker.uri)
    for key in ("selfclean/threshold", "selfclean/in", "selfclean/kept", "selfclean/dropped"):
        history = client.get_metric_history(tracker.run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
    kept = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "selfclean/kept")}
    assert kept == {r["round"]: r["kept"] for r in two_rounds["result"]["rounds"]}
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id, "selfclean/round_1")}
    assert "selfclean/round_1/histogram.png" in artifacts and "selfclean/round_1/report.md" in artifacts


def test_rerun_skips_finished_rounds(two_rounds: dict) -> None:
    root = two_rounds["root"]
    marker = root / "sc" / "round_1" / "eval_model" / "run" / "results.json"
    before = marker.stat().st_mtime_ns
    again = run_selfclean([two_rounds["raw"]], root / "sc", two_rounds["config"], tasks=2)
    assert again == two_rounds["result"]
    assert marker.stat().st_mtime_ns == before  # nothing retrained


def test_given_checkpoint_and_absolute_threshold(two_rounds: dict, tmp_path: Path) -> None:
    eval_model = two_rounds["result"]["rounds"][0]["eval_model"]
    config = SelfCleanConfig(
        rounds=1, quantile=None, max_perplexity=1e9, eval_model=eval_model, review_samples=2
    )
    result = run_selfclean([two_rounds["raw"]], tmp_path / "sc", config)
    (stats,) = result["rounds"]
    assert stats["eval_model"] == eval_model and stats["threshold"] == 1e9
    assert stats["dropped"] == 0 and stats["kept"] == stats["in"]
    assert not (tmp_path / "sc" / "round_1" / "eval_model").exists()


def test_batched_scores_equal_one_window_at_a_time() -> None:
    from pretrain.models.transnormer import TransNormerConfig

    torch.manual_seed(0)
    model = TransNormerConfig(
        vocab_size=64, d_model=16, n_layers=2, n_heads=2, glu_dim=32, attention_block_size=8
    ).build()
    model.eval()
    rng = random.Random(1)
    docs = [[3] + [rng.randrange(4, 64) for _ in range(n)] for n in (0, 1, 5, 17, 40, 9)]
    one = score_token_lists(model, docs, window=8, batch_windows=1)
    many = score_token_lists(model, docs, window=8, batch_windows=7)
    assert one[0] == (float("inf"), 0)
    assert [n for _, n in many] == [len(d) - 1 for d in docs]
    np.testing.assert_allclose([p for p, _ in one[1:]], [p for p, _ in many[1:]], rtol=1e-5)
    # a window of the whole document equals the plain mean NLL
    ids = torch.tensor([docs[4]])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids[:, :-1])[0], ids[0, 1:])
    (ppl, _), *_ = score_token_lists(model, [docs[4]], window=64, batch_windows=4)
    assert ppl == pytest.approx(float(torch.exp(nll)), rel=1e-5)


def test_windows_predict_every_token_once() -> None:
    ids = list(range(20))
    windows = windows_of(ids, 6)
    assert [w[0] for w in windows] == [0, 6, 12, 18]
    assert sum(len(w) - 1 for w in windows) == 19
    assert windows_of([3], 6) == [[3]]


def test_config_needs_exactly_one_threshold() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        SelfCleanConfig.from_dict({"max_perplexity": 100.0}, source="x.yaml")
    with pytest.raises(ConfigError, match="key 'rounds'"):
        SelfCleanConfig.from_dict({"rounds": 0}, source="x.yaml")
