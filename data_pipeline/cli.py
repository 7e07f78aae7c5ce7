"""The ``data`` command group, registered into ``pretrain``'s parser by :func:`add_data_commands`
and dispatched by :func:`cmd_data`::

    pretrain data run CONFIG [--set KEY=VALUE ...] [--no-progress]
    pretrain data clean --input PATH [PATH ...] --output DIR [--workers N] [--tasks N]

``python -m data_pipeline.cli data ...`` runs the same commands without the ``pretrain`` entry
point (the ``__main__`` guard below lets datatrove's forkserver workers re-import this module).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_data_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``data`` with its ``run`` and ``clean`` subcommands on ``subparsers``.

    Returns:
        The ``data`` parser (its sub-command is in ``args.data_command``).
    """
    from pretrain.config import add_overrides_argument

    data = subparsers.add_parser(
        "data",
        help="data pipelines: clean, self-clean, tokenize and blend training data",
        description="Data pipelines on datatrove, locally or on SLURM.",
    )
    sub = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    p = sub.add_parser(
        "run",
        help="run the data job a config describes (re-running skips finished stages)",
        description="Run every stage of the data job CONFIG describes: corpus, clean, self-clean, "
        "tokenizer, tokenize, blend. Re-running skips finished stages and tasks.",
    )
    p.add_argument("config", type=Path, help="data config YAML, e.g. configs/data-example.yaml")
    add_overrides_argument(p, help="override a config key, e.g. --set selfclean.rounds=3 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = sub.add_parser(
        "clean",
        help="clean, filter and deduplicate JSONL with the default settings",
        description="Rule-based cleaning, filters and exact dedup (datatrove). Writes the kept "
        "documents to DIR/output/*.jsonl, counts to DIR/stats.json and bad records to DIR/quarantine/.",
    )
    p.add_argument("--input", type=Path, nargs="+", required=True, help="JSONL files or directories")
    p.add_argument("--output", type=Path, required=True, help="output directory")
    p.add_argument("--workers", type=int, default=1, help="tasks run at once (default 1)")
    p.add_argument("--tasks", type=int, default=None, help="datatrove tasks (default: --workers)")
    return data


def print_summary(summary: dict[str, Any]) -> None:
    """A table of the stages (done or reused, seconds, headline counts) and the outputs."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"data job {summary['output_dir']}")
    for column in ("stage", "status", "seconds", "result"):
        table.add_column(column)
    for name, stage in summary["stages"].items():
        result = stage["result"]
        if name == "clean":
            text = ", ".join(f"{k} {v}" for k, v in result.get("totals", {}).items())
        elif name == "selfclean":
            text = "; ".join(
                f"round {r['round']}: {r['in']} -> {r['kept']} (ppl <= {r['threshold']:.4g})"
                for r in result["rounds"]
            )
        elif name == "blend":
            text = f"{len(result['paths'])} dataset(s) -> {result.get('run_config') or result['file']}"
        else:
            text = ", ".join(f"{k} {v}" for k, v in result.items() if isinstance(v, (int, float, str)))
        table.add_row(name, "reused" if stage["reused"] else "done", f"{stage['seconds']:.1f}", text)
    console = Console()
    console.print(table)
    if summary.get("mlflow_tracking_uri"):
        from pretrain.tracking import ui_command

        console.print(f"MLflow: {ui_command(summary['mlflow_tracking_uri'])}", markup=False)


def cmd_data(args: argparse.Namespace) -> int:
    """Handler of ``data``: runs ``args.data_command``. Raises ``ConfigError`` on a bad config."""
    if args.data_command == "run":
        from data_pipeline.run import DataRunConfig, run_data_pipeline

        config = DataRunConfig.from_yaml(args.config, args.overrides)
        summary = run_data_pipeline(config, progress=not args.no_progress)
        print_summary(summary)
        print(f"summary: {Path(summary['output_dir']) / 'summary.json'}")
        return 0
    from data_pipeline.clean import CleanConfig, run_clean

    if args.workers < 1 or (args.tasks is not None and args.tasks < 1):
        from pretrain.config import ConfigError

        raise ConfigError("--workers and --tasks must be at least 1")
    config = CleanConfig(workers=args.workers, tasks=args.tasks or args.workers)
    stats = run_clean(args.input, args.output, config)
    print(json.dumps(stats["totals"], indent=2))
    print(f"stats: {args.output / 'stats.json'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m data_pipeline.cli data ...``: the ``data`` commands alone."""
    from pretrain.config import ConfigError

    parser = argparse.ArgumentParser(prog="data_pipeline.cli")
    add_data_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    try:
        return cmd_data(args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
