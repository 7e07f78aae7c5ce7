"""Pre-flight node health check, run once per node before training starts.

    python -m cluster.health --run-dir DIR [--min-free-gb 1] [--min-memory-gb 1] [--gpus N]

Checks free disk space in the run directory, available memory and (when GPUs are asked for)
the visible GPU count. Prints one line naming the node and every problem, and exits 1 when
there is any, so the batch script fails early instead of training on a bad node.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class HealthReport:
    node: str
    problems: list[str] = field(default_factory=list)
    facts: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        facts = ", ".join(f"{k}={v:g}" for k, v in self.facts.items())
        if self.ok:
            return f"node {self.node}: healthy ({facts})"
        return f"node {self.node}: UNHEALTHY: {'; '.join(self.problems)} ({facts})"


def available_memory_gb() -> float:
    """MemAvailable from /proc/meminfo (falls back to total physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def check_node(
    run_dir: Path, *, min_free_gb: float = 1.0, min_memory_gb: float = 1.0, gpus: int = 0
) -> HealthReport:
    """Check this node; ``run_dir`` is created if missing (its disk is what is measured)."""
    report = HealthReport(node=os.environ.get("SLURMD_NODENAME") or socket.gethostname())
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(run_dir).free / 2**30
        report.facts["disk_free_gb"] = round(free, 2)
        if free < min_free_gb:
            report.problems.append(f"{free:.2f} GiB free in {run_dir} < {min_free_gb:g} GiB")
        if not os.access(run_dir, os.W_OK):
            report.problems.append(f"{run_dir} is not writable")
    except OSError as exc:
        report.problems.append(f"run directory {run_dir}: {exc}")
    mem = available_memory_gb()
    report.facts["memory_available_gb"] = round(mem, 2)
    if mem < min_memory_gb:
        report.problems.append(f"{mem:.2f} GiB memory available < {min_memory_gb:g} GiB")
    if gpus > 0:
        found = gpu_count()
        report.facts["gpus"] = found
        if found < gpus:
            report.problems.append(f"{found} GPUs visible, {gpus} expected")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.health", description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--min-free-gb", type=float, default=1.0)
    parser.add_argument("--min-memory-gb", type=float, default=1.0)
    parser.add_argument("--gpus", type=int, default=0, help="GPUs expected on this node")
    args = parser.parse_args(argv)
    report = check_node(
        args.run_dir, min_free_gb=args.min_free_gb, min_memory_gb=args.min_memory_gb, gpus=args.gpus
    )
    print(f"[health] {report}", file=sys.stdout if report.ok else sys.stderr, flush=True)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
