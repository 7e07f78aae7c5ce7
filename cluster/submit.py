"""Submits a training run to SLURM: validate, render, store the script with the run, ``sbatch``.

The script lands in ``<run_dir>/sbatch/<timestamp>.sh`` and the job's output in
``<run_dir>/slurm/<job id>.out`` (appended to across requeues). A resubmitted run continues
its MLflow run, which is tagged with the new job id; a first submission is tagged when the
job starts (see :mod:`cluster.run_tags`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from cluster.sbatch_script import SubmitOptions, render_sbatch
from cluster.slurm import SlurmError, check_job_id, slurm
from pretrain.config import ConfigError

logger = logging.getLogger(__name__)


@dataclass
class Submission:
    script: str
    """The rendered batch script."""
    script_path: Path | None
    """Where it was stored; ``None`` on a dry run."""
    run_dir: Path
    job_id: str | None = None
    """SLURM's job id; ``None`` on a dry run."""

    @property
    def output_path(self) -> Path | None:
        return None if self.job_id is None else self.run_dir / "slurm" / f"{self.job_id}.out"


def submit(
    config_path: Path, options: SubmitOptions, *, dry_run: bool = False, workdir: Path | None = None
) -> Submission:
    """Render the run's batch script and (unless ``dry_run``) submit it with ``sbatch``.

    The config and overrides are validated first, so a typo fails here and not in the queue.
    """
    from pretrain.run_config import RunConfig

    options.validate()
    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"config not found: {config_path}")
    config = RunConfig.from_yaml(config_path, list(options.overrides))
    workdir = (workdir or Path.cwd()).resolve()
    run_dir = (workdir / config.resolved_run_dir).resolve()
    job_name = options.job_name or config.name
    script = render_sbatch(
        config_path=config_path.resolve(),
        run_dir=run_dir,
        job_name=job_name,
        options=options,
        workdir=workdir,
    )
    if dry_run:
        return Submission(script=script, script_path=None, run_dir=run_dir)

    (run_dir / "slurm").mkdir(parents=True, exist_ok=True)  # sbatch does not create --output dirs
    script_dir = run_dir / "sbatch"
    script_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**6:06d}"
    script_path = script_dir / f"{stamp}.sh"
    script_path.write_text(script)
    out = slurm("sbatch", "--parsable", str(script_path)).strip()
    job_id = check_job_id(out.split(";")[0])
    with (script_dir / "jobs.jsonl").open("a") as f:
        f.write(json.dumps({"job_id": job_id, "script": str(script_path), "time": time.time()}) + "\n")
    logger.info("submitted job %s (%s)", job_id, script_path)
    _tag_existing_run(config, run_dir, job_id)
    return Submission(script=script, script_path=script_path, run_dir=run_dir, job_id=job_id)


def _tag_existing_run(config, run_dir: Path, job_id: str) -> None:
    """Tag the run's MLflow run with the job id when it already exists (a resubmission)."""
    run_id_file = run_dir / "mlflow_run_id"
    if not config.tracking.enabled or not run_id_file.is_file():
        return
    from mlflow.tracking import MlflowClient

    from pretrain.tracking import resolve_tracking_uri

    try:
        client = MlflowClient(resolve_tracking_uri(config.tracking, run_dir))
        client.set_tag(run_id_file.read_text().strip(), "slurm_job_id", job_id)
    except Exception as exc:  # the job is queued; a tracking outage must not hide that
        logger.warning("could not tag the MLflow run with job %s: %s", job_id, exc)


__all__ = ["ConfigError", "SlurmError", "Submission", "SubmitOptions", "submit"]
