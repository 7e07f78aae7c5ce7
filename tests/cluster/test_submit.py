"""Submission: rendering, validation against hostile input, real jobs on the local cluster."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cluster.health import check_node
from cluster.health import main as health_main
from cluster.sbatch_script import SubmitOptions, render_sbatch
from cluster.submit import submit
from pretrain.config import ConfigError

from .conftest import run_cli, wait_state

CONFIG = Path("configs/tnl-tiny.yaml")
HOSTILE = [
    "x; touch {p}/semicolon",
    "$(touch {p}/dollar)",
    "`touch {p}/backtick`",
    "a'b\"c$(touch {p}/quotes)'",
    "line\ntouch {p}/newline",
    "${{IFS}}&&touch${{IFS}}{p}/ifs",
]


def _hostile(p: Path) -> list[str]:
    return [h.format(p=p) for h in HOSTILE]


def test_dry_run_renders_a_valid_quoted_script(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    sets = [f"tracking.run_name={h}" for h in _hostile(tmp_path)] + [f"run_dir={tmp_path / 'run'}"]
    argv = ["submit", str(CONFIG), "--dry-run", "--time", "01:00:00", "--partition", "debug"]
    argv += ["--job-name", "tiny.run-1", "--ntasks-per-node", "2"] + [a for s in sets for a in ("--set", s)]
    assert run_cli(argv) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --job-name=tiny.run-1" in script
    assert "#SBATCH --signal=B:USR1@120" in script and "#SBATCH --requeue" in script
    assert "#SBATCH --time=01:00:00" in script and "#SBATCH --partition=debug" in script
    assert f"#SBATCH --output={tmp_path / 'run'}/slurm/%j.out" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
    # Each hostile value reaches the program as one literal argument: parse the srun line as
    # bash would and compare.
    line = next(ln for ln in script.split("\n#")[-1].split("srun --kill-on-bad-exit=1 ")[1:2])
    words = subprocess.run(
        ["bash", "-c", f'for w in {line.rsplit(" &", 1)[0]}; do printf "%s\\0" "$w"; done'],
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for s in sets:
        assert s in words
    assert not list(tmp_path.glob("*"))  # bash parsed every word without running anything


@pytest.mark.parametrize(
    "field,value",
    [
        ("job_name", "x;touch /tmp/pwn"),
        ("job_name", "$(id)"),
        ("job_name", "a b"),
        ("job_name", "a\nb"),
        ("job_name", "`id`"),
        ("partition", "debug;id"),
        ("partition", "debug\n#SBATCH --uid=0"),
        ("account", "a'b"),
        ("time", "1:00:00; id"),
        ("time", "forever"),
        ("overrides", ["x; id=1"]),
        ("overrides", ["novalue"]),
        ("nodes", 0),
    ],
)
def test_hostile_options_are_rejected(field: str, value: object, tmp_path: Path) -> None:
    options = SubmitOptions(**{field: value})
    with pytest.raises(ConfigError):
        render_sbatch(
            config_path=CONFIG, run_dir=tmp_path, job_name="ok", options=options, workdir=Path.cwd()
        )


def test_paths_that_sbatch_would_split_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="#SBATCH"):
        render_sbatch(
            config_path=CONFIG,
            run_dir=tmp_path / "a b%j",
            job_name="ok",
            options=SubmitOptions(),
            workdir=Path.cwd(),
        )


def test_config_typos_fail_at_submission(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="stpes"):
        submit(CONFIG, SubmitOptions(overrides=["train.stpes=3"]), dry_run=True)


def test_two_ranks_get_rank_world_and_rendezvous(tmp_path: Path, jobs: list[str]) -> None:
    run_dir = tmp_path / "probe"
    hostile = _hostile(tmp_path)
    options = SubmitOptions(
        ntasks_per_node=2,
        entry_module="tests.cluster.rank_probe",
        overrides=[f"run_dir={run_dir}"] + [f"tracking.run_name={h}" for h in hostile],
        min_free_gb=0.01,
    )
    result = submit(CONFIG, options)
    jobs.append(result.job_id)
    assert result.script_path.is_file() and result.script_path.parent == run_dir / "sbatch"
    info = wait_state(result.job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=90)
    log = result.output_path.read_text()
    assert info.state == "COMPLETED", log
    assert "[health] node" in log and "healthy" in log
    ranks = [json.loads((run_dir / "ranks" / f"{r}.json").read_text()) for r in (0, 1)]
    assert {r["rank"] for r in ranks} == {0, 1} and {r["world_size"] for r in ranks} == {2}
    port = 20000 + int(result.job_id) % 20000
    assert all(r["master_addr"] and r["master_port"] == str(port) for r in ranks)
    for h in hostile:  # every hostile argument arrived intact, and none ran
        assert f"tracking.run_name={h}" in ranks[0]["argv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["probe"]


def test_cancel_and_status_of_a_running_job(
    tmp_path: Path, jobs: list[str], capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROBE_SLEEP", "120")  # sbatch passes the environment on
    options = SubmitOptions(
        entry_module="tests.cluster.rank_probe",
        overrides=[f"run_dir={tmp_path}"],
        min_free_gb=0.01,
    )
    result = submit(CONFIG, options)
    jobs.append(result.job_id)
    wait_state(result.job_id, {"RUNNING"}, timeout=60)
    assert run_cli(["status"]) == 0
    assert result.job_id in capsys.readouterr().out
    assert run_cli(["cancel", result.job_id]) == 0
    info = wait_state(result.job_id, {"CANCELLED"}, timeout=60)
    assert run_cli(["status", result.job_id]) == 0
    assert "CANCELLED" in capsys.readouterr().out and info.finished
    assert run_cli(["status", "12x; id"]) == 1  # not a job id: refused before any command runs


def test_health_check_names_the_bad_node(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    report = check_node(tmp_path, min_free_gb=1e9, min_memory_gb=1e9, gpus=8)
    assert not report.ok and len(report.problems) == 3
    assert report.node in str(report) and "GPUs visible, 8 expected" in str(report)
    assert health_main(["--run-dir", str(tmp_path), "--min-free-gb", "1e9"]) == 1
    assert "UNHEALTHY" in capsys.readouterr().err
    assert check_node(tmp_path, min_free_gb=0.001, min_memory_gb=0.001).ok


def test_every_command_has_help(capsys: pytest.CaptureFixture) -> None:
    for cmd in (["submit"], ["status"], ["logs"], ["cancel"], ["mlflow", "serve"], ["monitor"]):
        with pytest.raises(SystemExit) as exc:
            run_cli([*cmd, "--help"])
        assert exc.value.code == 0
        assert "usage: pretrain" in capsys.readouterr().out


def test_local_cluster_start_is_idempotent(slurm_cluster: Path) -> None:
    import time

    from cluster.local_slurm import node_state, start

    t0 = time.monotonic()
    cluster = start()
    assert cluster.conf == slurm_cluster and time.monotonic() - t0 < 10
    assert node_state(cluster).rstrip("*") in {"idle", "mixed", "allocated"}
    conf = slurm_cluster.read_text()
    assert "AuthInfo=cred_expire=10" in conf and "JobCompType=jobcomp/filetxt" in conf
