"""A stand-in rank for submission tests: ``python -m tests.cluster.rank_probe train CONFIG [--set ...]``.

Writes what the rank sees (rank, world size, rendezvous, argv) to
``<run_dir>/ranks/<rank>.json``; ``$PROBE_SLEEP`` seconds of sleep follow. No torch."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from cluster.env import ProcessEnv


def main(argv: list[str]) -> int:
    sets = dict(a.split("=", 1) for a in argv if "=" in a)
    run_dir = Path(sets["run_dir"])
    env = ProcessEnv.from_environ()
    out = run_dir / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "rank": env.rank,
        "world_size": env.world_size,
        "job": env.slurm_job_id,
        "master_addr": os.environ.get("MASTER_ADDR"),
        "master_port": os.environ.get("MASTER_PORT"),
        "argv": argv,
    }
    (out / f"{env.rank}.json").write_text(json.dumps(record))
    print(f"rank {env.rank}/{env.world_size} ready", flush=True)
    time.sleep(float(os.environ.get("PROBE_SLEEP", 0)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
