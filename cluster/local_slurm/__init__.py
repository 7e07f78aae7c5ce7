"""A real single-node SLURM cluster on this machine, for tests and local runs.

    python -m cluster.local_slurm start     # install if missing, configure, start, wait for idle
    python -m cluster.local_slurm stop
    python -m cluster.local_slurm status

Everything (slurm.conf, state, spool, logs, pid files, the completion log) lives under one
directory, ``$PRETRAIN_SLURM_ROOT`` or ``/tmp/pretrain-slurm``. ``start`` is idempotent: a
running, healthy cluster is left alone; a configured but stopped one is started again. Clients
find it through ``SLURM_CONF=<root>/slurm.conf`` (written to ``<root>/env`` as well).
No systemd: munged, slurmctld and slurmd are started by hand (they need root).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/tmp/pretrain-slurm")
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
TEMPLATE = Path(__file__).with_name("slurm.conf.in")
MUNGE_SOCKET = Path("/run/munge/munge.socket.2")


class LocalSlurmError(RuntimeError):
    """The local cluster could not be installed, started or reached."""


@dataclass(frozen=True)
class LocalSlurm:
    """Paths of one local cluster."""

    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def jobcomp(self) -> Path:
        return self.root / "jobcomp.log"

    def env(self) -> dict[str, str]:
        """The process environment with ``SLURM_CONF`` pointing at this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}


def default_root() -> Path:
    return Path(os.environ.get("PRETRAIN_SLURM_ROOT", DEFAULT_ROOT))


def _run(cmd: list[str], *, env: dict[str, str] | None = None, timeout: float = 60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise LocalSlurmError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def install() -> None:
    """``apt-get install`` the daemons and clients when any is missing (needs root)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise LocalSlurmError("SLURM is not installed and installing it needs root (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, capture_output=True, env=env).returncode != 0:
        _run(["apt-get", "update"], env=env, timeout=300)
        _run(cmd, env=env, timeout=600)


def render_conf(root: Path, *, ctld_port: int = 6817, slurmd_port: int = 6818) -> str:
    """slurm.conf for this host: hardware from ``slurmd -C``, 90% of its memory schedulable."""
    hw = _run(["slurmd", "-C"]).splitlines()[0]
    host = socket.gethostname().split(".")[0]
    fields = dict(kv.split("=", 1) for kv in hw.split() if "=" in kv)
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore")
    node_hw = " ".join(f"{k}={fields[k]}" for k in keep if k in fields)
    memory = int(int(fields.get("RealMemory", "1024")) * 0.9)
    values = {
        "ROOT": str(root),
        "HOST": host,
        "CTLD_PORT": str(ctld_port),
        "SLURMD_PORT": str(slurmd_port),
        "NODE_HW": node_hw,
        "MEMORY": str(memory),
    }
    return re.sub(r"@([A-Z_]+)@", lambda m: values[m.group(1)], TEMPLATE.read_text())


def _pid_alive(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def _start_munge() -> None:
    if MUNGE_SOCKET.exists() and subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
        return
    run_dir = MUNGE_SOCKET.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    for d in ("/var/log/munge", "/var/lib/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    _run(["runuser", "-u", "munge", "--", "/usr/sbin/munged", "--force"])


def node_state(cluster: LocalSlurm) -> str | None:
    """The node's state as ``sinfo`` reports it (``idle``, ``mixed``, ``down*``...), or None."""
    proc = subprocess.run(
        ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=cluster.env(), timeout=15
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        return None
    return proc.stdout.split()[0]


def _healthy(cluster: LocalSlurm) -> bool:
    if not (_pid_alive(cluster.root / "slurmctld.pid") and _pid_alive(cluster.root / "slurmd.pid")):
        return False
    state = node_state(cluster)
    return state is not None and state.rstrip("*~#") in {"idle", "mixed", "allocated", "completing"}


def start(root: Path | None = None, *, restart: bool = False, timeout: float = 60) -> LocalSlurm:
    """Install, configure and start the cluster; return once the node accepts jobs.

    A running healthy cluster is reused unless ``restart``; concurrent callers are serialised by
    a lock file under ``root``.
    """
    cluster = LocalSlurm((root or default_root()).resolve())
    cluster.root.mkdir(parents=True, exist_ok=True)
    with (cluster.root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not restart and cluster.conf.is_file() and _healthy(cluster):
            return cluster
        install()
        _stop_daemons(cluster)
        for sub in ("state", "spool", "log"):
            (cluster.root / sub).mkdir(exist_ok=True)
        cluster.conf.write_text(render_conf(cluster.root))
        (cluster.root / "env").write_text(f"export SLURM_CONF={cluster.conf}\n")
        _start_munge()
        env = cluster.env()
        _run(["slurmctld", "-f", str(cluster.conf)], env=env)
        _run(["slurmd", "-f", str(cluster.conf)], env=env)
        _wait_idle(cluster, timeout)
    logger.info("local SLURM up: SLURM_CONF=%s", cluster.conf)
    return cluster


def _wait_idle(cluster: LocalSlurm, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    state = None
    resumed = False
    while time.monotonic() < deadline:
        state = node_state(cluster)
        if state is not None:
            bare = state.rstrip("*~#")
            if bare in {"idle", "mixed", "allocated"}:
                return
            if bare in {"down", "drained", "draining", "drain"} and not resumed:
                host = socket.gethostname().split(".")[0]
                subprocess.run(
                    ["scontrol", "update", f"nodename={host}", "state=resume"],
                    capture_output=True,
                    env=cluster.env(),
                )
                resumed = True
        time.sleep(0.5)
    log = cluster.root / "log" / "slurmctld.log"
    tail = log.read_text()[-1500:] if log.is_file() else ""
    raise LocalSlurmError(f"node not idle after {timeout:.0f} s (state {state}); slurmctld log:\n{tail}")


def _stop_daemons(cluster: LocalSlurm) -> None:
    for name in ("slurmd", "slurmctld"):
        pid_file = cluster.root / f"{name}.pid"
        if not _pid_alive(pid_file):
            continue
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and _pid_alive(pid_file):
            time.sleep(0.2)
        if _pid_alive(pid_file):
            os.kill(pid, signal.SIGKILL)


def stop(root: Path | None = None) -> None:
    """Stop slurmd and slurmctld of the cluster under ``root`` (munged is left for others)."""
    cluster = LocalSlurm((root or default_root()).resolve())
    if cluster.root.is_dir():
        _stop_daemons(cluster)


def status(root: Path | None = None) -> str:
    cluster = LocalSlurm((root or default_root()).resolve())
    if not cluster.conf.is_file():
        return f"not configured ({cluster.root})"
    return f"node {node_state(cluster) or 'unreachable'}; SLURM_CONF={cluster.conf}"
