"""A data run end to end on a small config, its re-run, config errors, and the executor section."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from data_pipeline.run import DataRunConfig, ExecutorConfig, run_data_pipeline, wait_for_slurm
from pretrain.config import ConfigError
from tests.data_pipeline.test_selfclean import TINY_EVAL, write_corpus_with_garbage

TINY_MODEL = [o for o in TINY_EVAL if o.startswith(("model.", "data.seq_len", "train.threads"))]


def small_config(tmp_path: Path) -> Path:
    raw = write_corpus_with_garbage(tmp_path / "raw.jsonl", max_bytes=100_000, garbage=6)
    data = {
        "name": "small",
        "output_dir": str(tmp_path / "out"),
        "inputs": {"paths": [str(raw)]},
        "selfclean": {"rounds": 1, "quantile": 0.9, "train_config": "tnl-tiny", "train_overrides": TINY_EVAL},
        "tokenizer": {"vocab_size": 512},
        "blend": {
            "run_config": "tnl-tiny",
            "run_overrides": [
                *TINY_MODEL,
                f"run_dir={tmp_path / 'train'}",
                "train.steps=2",
                "tracking.enabled=false",
            ],
        },
        "executor": {"tasks": 2, "workers": 1},
    }
    path = tmp_path / "data.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_data_run_end_to_end_and_rerun(tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from mlflow.tracking import MlflowClient

    from pretrain.run_config import RunConfig
    from pretrain.train import run_training

    config = DataRunConfig.from_yaml(small_config(tmp_path))
    summary = run_data_pipeline(config, progress=False)
    out = tmp_path / "out"
    assert list(summary["stages"]) == ["clean", "selfclean", "tokenizer", "tokenize", "blend"]
    assert not any(s["reused"] for s in summary["stages"].values())
    (round1,) = summary["stages"]["selfclean"]["result"]["rounds"]
    assert round1["in"] == summary["documents"]["cleaned"] == round1["kept"] + round1["dropped"]
    assert summary["documents"]["tokenized"] == round1["kept"]
    ds = IndexedDataset(str(out / "tokens" / "corpus"))
    assert len(ds) == round1["kept"] and int(ds.sequence_lengths.sum()) == summary["tokens"]
    assert json.loads((out / "summary.json").read_text())["tokens"] == summary["tokens"]
    assert (out / "selfclean" / "round_1" / "histogram.png").is_file()
    blend = json.loads((out / "blend.json").read_text())
    assert blend["paths"] == [str(out / "tokens" / "corpus")]

    # the blended run config trains
    run_config = RunConfig.from_yaml(out / "run_config.yaml")
    assert run_config.data.paths == blend["paths"] and run_config.data.tokenizer == summary["tokenizer"]
    assert run_training(run_config, progress=False)["final_loss"] is not None

    # one MLflow run for the job, the round as step
    client = MlflowClient(summary["mlflow_tracking_uri"])
    history = client.get_metric_history(summary["mlflow_run_id"], "selfclean/kept")
    assert [(m.step, m.value) for m in history] == [(1, round1["kept"])]
    assert client.get_run(summary["mlflow_run_id"]).data.params["selfclean.rounds"] == "1"

    # a re-run skips every stage and continues the same MLflow run
    again = run_data_pipeline(config, progress=False)
    assert all(s["reused"] for s in again["stages"].values())
    assert again["mlflow_run_id"] == summary["mlflow_run_id"] and again["tokens"] == summary["tokens"]

    # a changed stage re-runs from there on; the stages before it are reused
    changed = DataRunConfig.from_yaml(
        small_config(tmp_path), ["tokenize.append_eod=false", "tracking.enabled=false"]
    )
    third = run_data_pipeline(changed, progress=False)
    reused = {name: s["reused"] for name, s in third["stages"].items()}
    assert reused == {"clean": True, "selfclean": True, "tokenizer": True, "tokenize": False, "blend": False}
    assert third["tokens"] == summary["tokens"] - round1["kept"]  # no end-of-document ids


def test_config_typo_names_key_and_file(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text("inputs:\n  stdlib: true\nselfclean:\n  roundz: 2\n")
    with pytest.raises(ConfigError) as err:
        DataRunConfig.from_yaml(path)
    message = str(err.value)
    assert (
        str(path) in message
        and "selfclean.roundz" in message
        and "did you mean 'selfclean.rounds'" in message
    )
    path.write_text("inputs:\n  stdlib: true\n")
    with pytest.raises(ConfigError, match=r"\(with --set executor\.tasks=zero\):\n  - key 'executor\.tasks'"):
        DataRunConfig.from_yaml(path, ["executor.tasks=zero"])
    path.write_text("clean:\n  min_chars: 10\n")
    with pytest.raises(ConfigError, match=r"inputs\.paths or set inputs\.stdlib"):
        DataRunConfig.from_yaml(path)


def test_example_config_is_valid() -> None:
    from configs import PRESET_DIR

    config = DataRunConfig.from_yaml(PRESET_DIR / "data-example.yaml")
    assert config.inputs.stdlib and config.selfclean.rounds == 2 and config.executor.kind == "local"
    assert config.resolved_output_dir == Path("runs/data/example")


def test_slurm_executor_construction(tmp_path: Path) -> None:
    from datatrove.executor import SlurmPipelineExecutor

    from data_pipeline.selfclean.steps import CleanJsonlReader

    cfg = ExecutorConfig(
        kind="slurm",
        tasks=4,
        workers=2,
        partition="debug",
        time="01:30:00",
        cpus_per_task=3,
        mem_per_cpu_gb=4,
        venv_path="/opt/venv/bin/activate",
        job_name="mydata",
        sbatch_args={"account": "proj", "signal": "USR1@60"},
    )
    ex = cfg.build(
        [CleanJsonlReader([tmp_path / "x.jsonl"])], logging_dir=tmp_path / "logs", tasks=4, name="score"
    )
    assert isinstance(ex, SlurmPipelineExecutor)
    assert (ex.tasks, ex.workers, ex.partition, ex.time, ex.cpus_per_task, ex.mem_per_cpu_gb) == (
        4,
        2,
        "debug",
        "01:30:00",
        3,
        4,
    )
    assert ex.job_name == "mydata-score" and ex.skip_completed
    args = ex.get_sbatch_args(max_array=4)
    assert args["partition"] == "debug" and args["array"] == "0-3%2" and args["cpus-per-task"] == 3
    assert args["mem-per-cpu"] == "4G" and args["account"] == "proj" and args["signal"] == "USR1@60"
    script = ex.get_launch_file_contents(args, "echo run")
    assert "source /opt/venv/bin/activate" in script and "#SBATCH --partition=debug" in script
    assert ex.job_id is None  # nothing was submitted

    local = ExecutorConfig(tasks=3, workers=8).build([], logging_dir=tmp_path / "l", tasks=3, name="x")
    assert type(local).__name__ == "LocalPipelineExecutor" and local.workers == 3
    with pytest.raises(ConfigError, match=r"executor\.partition is required"):
        DataRunConfig.from_dict({"inputs": {"stdlib": True}, "executor": {"kind": "slurm"}}, source="d.yaml")


class _FakeExecutor:
    def __init__(self, incomplete: list[list[int]], job_id: str | None = "42") -> None:
        self.incomplete, self.job_id = incomplete, job_id

        class _Dir:
            def resolve_paths(self, _: str) -> str:
                return "/logs"

        self.logging_dir = _Dir()

    def get_incomplete_ranks(self) -> list[int]:
        return self.incomplete.pop(0) if len(self.incomplete) > 1 else self.incomplete[0]


def test_wait_for_slurm() -> None:
    sleeps: list[float] = []
    # tasks finish while the job is queued
    wait_for_slurm(_FakeExecutor([[0, 1], [1], []]), 7, in_queue=lambda _: True, sleep=sleeps.append)
    assert sleeps == [7, 7]
    # the job leaves the queue with a task unfinished
    with pytest.raises(RuntimeError, match=r"SLURM job 42 ended with 1 unfinished task\(s\) \[3\]"):
        wait_for_slurm(_FakeExecutor([[3]]), 7, in_queue=lambda _: False, sleep=sleeps.append)
    # markers that land just after the job left the queue
    wait_for_slurm(_FakeExecutor([[3], []]), 7, in_queue=lambda _: False, sleep=sleeps.append)
