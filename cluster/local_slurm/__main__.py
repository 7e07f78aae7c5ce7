"""``python -m cluster.local_slurm start|stop|status [--root DIR] [--restart]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cluster.local_slurm import LocalSlurmError, start, status, stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cluster.local_slurm", description="A real single-node SLURM cluster here."
    )
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--root", type=Path, default=None, help="state dir (default $PRETRAIN_SLURM_ROOT)")
    parser.add_argument("--restart", action="store_true", help="restart even if it is running")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            cluster = start(args.root, restart=args.restart)
            print(f"export SLURM_CONF={cluster.conf}")
        elif args.action == "stop":
            stop(args.root)
        else:
            print(status(args.root))
    except LocalSlurmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
