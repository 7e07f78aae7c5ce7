"""Renders the sbatch script of a training run; every user value is validated or shell-quoted.

Values on ``#SBATCH`` lines are never seen by a shell, but sbatch parses them itself, so they
must match strict patterns (no spaces, quotes or newlines). Values in the script body are
passed through :func:`shlex.quote`. A job name or ``--set`` argument containing ``;``, ``$()``,
backticks, quotes or newlines therefore either is refused or reaches the program as one literal
argument.
"""

from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.config import ConfigError

PARTITION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
ACCOUNT = PARTITION
JOB_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
# [D-]HH:MM:SS, HH:MM:SS, MM:SS or minutes; sbatch's own formats without the ambiguous rest.
TIME = re.compile(r"^(\d{1,3}-)?\d{1,2}:\d{2}:\d{2}$|^\d{1,2}:\d{2}$|^\d{1,6}$")
# Paths on #SBATCH lines: sbatch splits on spaces and expands % patterns, so allow neither.
SBATCH_PATH = re.compile(r"^/[A-Za-z0-9_./+@,=~-]*$")
OVERRIDE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


@dataclass
class SubmitOptions:
    """How to run a config on SLURM (``pretrain submit`` options)."""

    nodes: int = 1
    ntasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None
    time: str | None = None
    """Time limit, ``[D-]HH:MM:SS``; the job gets SIGUSR1 ``signal_grace`` seconds before it."""
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    """``None`` uses the run config's name."""
    overrides: list[str] = field(default_factory=list)
    """``KEY=VALUE`` config overrides passed to every rank's ``pretrain train``."""
    signal_grace: int = 120
    """Seconds between the time-limit warning (SIGUSR1) and the kill; a save must fit in it."""
    requeue: bool = True
    max_restarts: int = 3
    """Restarts without progress (same resume step) before the job stops requeueing itself."""
    min_free_gb: float = 1.0
    """Health check: free disk space needed in the run directory on every node."""
    min_memory_gb: float = 1.0
    """Health check: available memory needed on every node."""
    entry_module: str = "pretrain.cli"
    """The Python module each rank runs as ``python -m MODULE train CONFIG``."""
    python: str = field(default_factory=lambda: sys.executable)

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the option whose value is not allowed."""
        for name in ("nodes", "ntasks_per_node"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.gpus_per_node < 0 or (self.cpus_per_task is not None and self.cpus_per_task < 1):
            raise ConfigError("--gpus-per-node must be >= 0 and --cpus-per-task >= 1")
        checks = (
            ("time", TIME, "[D-]HH:MM:SS"),
            ("partition", PARTITION, "letters, digits, '_', '.', '-'"),
            ("account", ACCOUNT, "letters, digits, '_', '.', '-'"),
            ("job_name", JOB_NAME, "letters, digits, '_', '.', '+', '-' (at most 128)"),
        )
        for name, pattern, what in checks:
            value = getattr(self, name)
            if value is not None and not pattern.match(value):
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not allowed: use {what}")
        if not 0 < self.signal_grace <= 65535 or self.max_restarts < 0:
            raise ConfigError("signal_grace must be in 1..65535 s and max_restarts >= 0")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", self.entry_module):
            raise ConfigError(f"entry module {self.entry_module!r} is not a module name")
        for item in self.overrides:
            key = item.split("=", 1)[0]
            if "=" not in item or not OVERRIDE_KEY.match(key):
                raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key")


def sbatch_path(path: Path, what: str) -> str:
    """An absolute path safe on an ``#SBATCH`` line."""
    text = str(Path(path).resolve())
    if not SBATCH_PATH.match(text):
        raise ConfigError(
            f"{what} {text!r} cannot go on an #SBATCH line: use a path without spaces, quotes or '%'"
        )
    return text


def render_sbatch(
    *, config_path: Path, run_dir: Path, job_name: str, options: SubmitOptions, workdir: Path
) -> str:
    """The batch script: health check on every node, then one ``pretrain train`` per task."""
    options.validate()
    if not JOB_NAME.match(job_name):
        raise ConfigError(
            f"job name {job_name!r} is not allowed: pass --job-name with letters, digits, '_', '.', '-'"
        )
    log_dir = sbatch_path(run_dir / "slurm", "run directory")
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={options.nodes}",
        f"#SBATCH --ntasks-per-node={options.ntasks_per_node}",
        f"#SBATCH --output={log_dir}/%j.out",
        f"#SBATCH --chdir={sbatch_path(workdir, 'working directory')}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --signal=B:USR1@{options.signal_grace}",
    ]
    if options.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={options.gpus_per_node}")
    if options.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={options.cpus_per_task}")
    for name in ("time", "partition", "account"):
        if getattr(options, name):
            lines.append(f"#SBATCH --{name}={getattr(options, name)}")
    lines.append("#SBATCH --requeue" if options.requeue else "#SBATCH --no-requeue")

    q = shlex.quote
    train = [options.python, "-m", options.entry_module, "train", str(Path(config_path).resolve())]
    train += ["--no-progress"] + [a for item in options.overrides for a in ("--set", item)]
    health = [options.python, "-m", "cluster.health", "--run-dir", str(Path(run_dir).resolve())]
    health += ["--min-free-gb", str(options.min_free_gb), "--min-memory-gb", str(options.min_memory_gb)]
    health += ["--gpus", str(options.gpus_per_node)]
    lines += [
        "",
        "set -uo pipefail",
        f"export PRETRAIN_MAX_RESTARTS={options.max_restarts}",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "export PYTHONUNBUFFERED=1",
        'echo "[sbatch] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} nodes $SLURM_JOB_NODELIST '
        'master $MASTER_ADDR:$MASTER_PORT"',
        "",
        "# SIGUSR1 (the time-limit warning, delivered to this shell) goes to the training step,",
        "# whose ranks save a checkpoint and requeue the job; before that step has started there",
        "# is nothing to save, so the job just requeues.",
        'step=""',
        'trap \'echo "[sbatch] SIGUSR1"; if [ -n "$step" ]; then kill -USR1 "$step"; '
        'else scontrol requeue "$SLURM_JOB_ID"; fi\' USR1',
        "",
        "# Pre-flight: one health check per node; a bad node fails the job before training starts.",
        'srun --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \\',
        f"    {' '.join(q(a) for a in health)} || {{",
        '    echo "[sbatch] health check failed; not training" >&2; exit 1; }',
        "",
        "# One rank per task.",
        f"srun --kill-on-bad-exit=1 {' '.join(q(a) for a in train)} &",
        "step=$!",
        "while true; do",
        '    wait "$step"; rc=$?',
        '    if [ "$rc" -lt 128 ] || ! kill -0 "$step" 2>/dev/null; then break; fi',
        "done",
        'echo "[sbatch] training step exited with $rc"',
        'exit "$rc"',
        "",
    ]
    return "\n".join(lines)
