"""A data run with ``executor.kind: slurm`` against the real local SLURM cluster: every datatrove
stage (clean, dedup, MinHash, tokenize) is submitted with sbatch as a job array chained with
``afterok``, and the outputs equal a local run on the same input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_pipeline.run import DataRunConfig, run_data_pipeline

pytestmark = pytest.mark.slow

JOB_PREFIX = f"dpt{os.getpid()}"


def _partition() -> str:
    out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout
    names = [p.strip() for p in out.split()]
    default = [p for p in names if p.endswith("*")]
    return (default or names)[0].rstrip("*")


def _our_jobs() -> list[str]:
    """Ids of this test's jobs still queued (the names start with ``JOB_PREFIX``)."""
    out = subprocess.run(["squeue", "-h", "-o", "%F %j"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.split()[1:2][0].startswith(JOB_PREFIX)]


def _config(out: Path, executor: dict) -> DataRunConfig:
    return DataRunConfig.from_dict(
        {
            "name": out.name,
            "output_dir": str(out),
            "inputs": {"stdlib": True, "stdlib_max_bytes": 200_000},
            "clean": {"minhash": {"num_buckets": 4}},
            "selfclean": {"enabled": False},
            "tokenizer": {"vocab_size": 400},
            "executor": {"tasks": 2, **executor},
            "tracking": {"enabled": False},
        },
        source="test",
    )


def _kept_ids(out: Path) -> list[str]:
    ids = []
    for path in sorted((out / "clean" / "output").glob("*.jsonl")):
        ids += [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]
    return sorted(ids)


def _print_logs(out: Path) -> None:
    for path in sorted([*out.rglob("slurm_logs/*.out"), *out.rglob("logs/*.log")]):
        print(f"===== {path}\n{path.read_text(errors='replace')[-4000:]}")


def test_data_run_on_slurm_matches_local(slurm_cluster: Path, tmp_path: Path) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    local = run_data_pipeline(_config(tmp_path / "local", {"kind": "local", "workers": 1}), progress=False)

    slurm_out = tmp_path / "slurm"
    executor = {
        "kind": "slurm",
        "workers": 2,
        "partition": _partition(),
        "time": "00:04:00",
        "mem_per_cpu_gb": 1,
        "job_name": JOB_PREFIX,
        "poll_seconds": 1,
        "wait_timeout_s": 150,
    }
    start = time.monotonic()
    try:
        summary = run_data_pipeline(_config(slurm_out, executor), progress=False)
    except BaseException:
        _print_logs(slurm_out)
        raise
    finally:
        leftover = _our_jobs()
        if leftover:  # datatrove's stats jobs may still be queued
            subprocess.run(["scancel", *leftover], check=False)
    seconds = time.monotonic() - start

    # the stages really ran as SLURM job arrays, chained with afterok
    clean_logs = slurm_out / "clean" / "logs"
    stages = ["clean", "dedup", "minhash_signatures", "minhash_buckets", "minhash_cluster", "near_dedup"]
    for stage in stages:
        script = (clean_logs / stage / "launch_script.slurm").read_text()
        assert f"#SBATCH --job-name={JOB_PREFIX}-{stage}" in script and "#SBATCH --array=0-" in script
        assert f"source {Path(sys.prefix) / 'bin' / 'activate'}" in script
        assert list((clean_logs / stage / "slurm_logs").glob("*.out")), stage
        assert len(list((clean_logs / stage / "completions").iterdir())) == (
            4 if stage == "minhash_buckets" else 1 if stage == "minhash_cluster" else 2
        )
    dedup_exec = json.loads((clean_logs / "dedup" / "executor.json").read_text())
    assert dedup_exec["depends_job_id"], "dedup did not wait on clean"
    tok_logs = slurm_out / "tokens" / "corpus_logs"
    assert "launch_pickled_pipeline" in (tok_logs / "launch_script.slurm").read_text()
    assert len(list((tok_logs / "stats").glob("*.json"))) == 2  # (completions go with the merged shards)
    assert list((tok_logs / "slurm_logs").glob("*.out"))

    # stats add up and match the local run
    stats = json.loads((slurm_out / "clean" / "stats.json").read_text())
    totals = stats["totals"]
    assert totals["in"] == totals["kept"] + totals["dropped"] + totals["quarantined"]
    assert totals["in"] > 200 and totals["kept"] > 100
    local_stats = json.loads((tmp_path / "local" / "clean" / "stats.json").read_text())
    assert stats == local_stats

    # same kept documents, same tokens
    kept = _kept_ids(slurm_out)
    assert kept == _kept_ids(tmp_path / "local") and len(kept) == totals["kept"]
    assert summary["documents"] == local["documents"]
    assert summary["tokens"] == local["tokens"] > 0
    ds = IndexedDataset(str(slurm_out / "tokens" / "corpus"))
    assert len(ds) == totals["kept"] and int(ds.sequence_lengths.sum()) == summary["tokens"]
    for suffix in (".bin", ".idx"):
        slurm_bytes = (slurm_out / "tokens" / f"corpus{suffix}").read_bytes()
        assert slurm_bytes == (tmp_path / "local" / "tokens" / f"corpus{suffix}").read_bytes()
    print(f"slurm data run: {seconds:.1f} s, {len(kept)} documents kept, {summary['tokens']} tokens")


def _fail(data, rank: int = 0, world_size: int = 1):
    raise RuntimeError(f"planted failure in task {rank}")


def _noop(data, rank: int = 0, world_size: int = 1):
    yield from data or []


def test_failed_stage_cancels_the_chain(slurm_cluster: Path, tmp_path: Path) -> None:
    """A failing job array raises with its logs named, and the stage queued after it is cancelled."""
    from data_pipeline.executors import SlurmExecutorFactory

    factory = SlurmExecutorFactory(
        partition=_partition(),
        time="00:02:00",
        mem_per_cpu_gb=1,
        job_name=JOB_PREFIX,
        poll_seconds=1,
        wait_timeout_s=90,
    )
    first = factory.build([_fail], name="fails", tasks=2, workers=2, logging_dir=tmp_path / "a")
    second = factory.build(
        [_noop], name="after", tasks=1, workers=1, logging_dir=tmp_path / "b", depends=first
    )
    try:
        with pytest.raises(RuntimeError, match=r"ended with 2 unfinished task\(s\) \[0, 1\]"):
            factory.run_chain([first, second])
        logs = "".join(p.read_text() for p in (tmp_path / "a" / "slurm_logs").glob("*.out"))
        assert "planted failure in task" in logs
        deadline = time.monotonic() + 30
        while str(second.job_id) in [j.split("_")[0] for j in _our_jobs()]:
            assert time.monotonic() < deadline, "the dependent stage stayed queued"
            time.sleep(0.5)
        assert not (tmp_path / "b" / "completions").exists()
    finally:
        leftover = _our_jobs()
        if leftover:
            subprocess.run(["scancel", *leftover], check=False)


def test_wait_for_slurm_deadline() -> None:
    from data_pipeline.executors import wait_for_slurm

    class _Dir:
        def resolve_paths(self, _: str) -> str:
            return "/logs"

    class _Pending:
        job_id, logging_dir = "7", _Dir()

        def get_incomplete_ranks(self) -> list[int]:
            return [0]

    now = iter(range(100))
    with pytest.raises(
        TimeoutError, match=r"SLURM job 7 still has 1 unfinished task\(s\) \[0\] at the deadline"
    ):
        wait_for_slurm(
            _Pending(), 1, in_queue=lambda _: True, sleep=lambda _: None, deadline=3, clock=lambda: next(now)
        )
