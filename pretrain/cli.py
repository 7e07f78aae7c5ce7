"""The ``pretrain`` command line.

    pretrain quickstart [--out DIR] [--input PATH ...] [--set KEY=VALUE ...]
    pretrain train CONFIG [--set KEY=VALUE ...]
    pretrain generate CHECKPOINT --prompt TEXT [sampling options]
    pretrain config CONFIG [--set KEY=VALUE ...]     (print the resolved config)
    pretrain config --reference                      (document every config key)

This is the only module that exits the process; library code raises.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from pretrain.config import ConfigError, add_overrides_argument


def _add_set(p: argparse.ArgumentParser) -> None:
    add_overrides_argument(
        p, help="override a config key, e.g. --set train.lr=3e-4 --set data.seq_len=512 (repeatable)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pretrain", description="Pretrain TransNormerLLM and friends.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "quickstart",
        help="raw text -> cleaned corpus -> tokenizer -> shards -> trained tiny TNL -> sample",
        description="Run the main job end to end on embedded defaults (CPU, local, sqlite MLflow). "
        "A re-run reuses finished stages and resumes training.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("runs/quickstart"),
        help="output directory (default: runs/quickstart)",
    )
    p.add_argument(
        "--input",
        type=Path,
        nargs="+",
        default=None,
        help="your own JSONL files, text files or directories instead of the Python stdlib corpus",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_set(p)

    p = sub.add_parser(
        "train",
        help="train (or resume) the run a config describes",
        description="Train the run described by CONFIG. Re-running the same command resumes from "
        "the run's latest checkpoint.",
    )
    p.add_argument("config", type=Path, help="run config YAML, e.g. configs/tnl-tiny.yaml")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc-per-node",
        type=int,
        default=1,
        metavar="N",
        help="start N local processes (torch.distributed.run); under torchrun or srun leave it at 1",
    )
    _add_set(p)

    p = sub.add_parser(
        "generate",
        help="stream a completion from a checkpoint with the recurrent decoder",
        description="Generate text from a checkpoint (a checkpoint dir, a checkpoints dir or a run dir).",
    )
    p.add_argument("checkpoint", help="checkpoint, checkpoints or run directory")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    p.add_argument("--greedy", action="store_true", help="argmax decoding")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop when TEXT is produced (repeatable)"
    )
    p.add_argument("--device", default="cpu")

    p = sub.add_parser(
        "config",
        help="print a resolved config, or the reference of every key",
        description="Validate CONFIG with its overrides and print the resolved YAML.",
    )
    p.add_argument("config", type=Path, nargs="?", help="run config YAML")
    p.add_argument(
        "--reference",
        action="store_true",
        help="print every config key with its type, default and doc (Markdown)",
    )
    _add_set(p)

    from cluster.cli import add_cluster_commands
    from data_pipeline.cli import add_data_commands
    from pretrain.finetune.cli import add_finetune_commands

    add_data_commands(sub)
    add_finetune_commands(sub)
    add_cluster_commands(sub)

    from pretrain.lego.cli import add_lego_commands

    add_lego_commands(sub)
    return parser


def _setup_logging(verbose: bool) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=True)],
    )
    # megatron-core warns on import that apex/Transformer Engine are absent; on CPU that is expected
    # (its torch fallbacks are what runs), so say it once in the README instead of on every run.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "datatrove", "megatron", "megatron.core"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _cmd_quickstart(args: argparse.Namespace) -> int:
    from pretrain.quickstart import print_summary, run_quickstart

    summary = run_quickstart(
        args.out, inputs=args.input, overrides=args.overrides, progress=not args.no_progress
    )
    print_summary(summary)
    print(f"summary: {args.out / 'summary.json'}")
    return 0


def _launch_local(args: argparse.Namespace) -> int:
    """Re-run this command under ``torch.distributed.run`` with N processes on this node."""
    from cluster.env import relaunch_local

    cmd = ["pretrain.cli", "train", str(args.config)]
    cmd += [x for s in args.overrides for x in ("--set", s)]
    if args.no_progress:
        cmd.append("--no-progress")
    return relaunch_local(args.nproc_per_node, cmd)


def _cmd_train(args: argparse.Namespace) -> int:
    import os

    from pretrain.run_config import RunConfig
    from pretrain.train import run_training

    config = RunConfig.from_yaml(args.config, args.overrides)  # fail on typos before launching
    if args.nproc_per_node > 1 and "RANK" not in os.environ:
        return _launch_local(args)
    results = run_training(config, config_path=args.config, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        print(
            json.dumps({k: v for k, v in results.items() if not isinstance(v, dict)}, indent=2, default=str)
        )
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pretrain.generate import SamplingConfig, generate
    from pretrain.inference import load_model

    loaded = load_model(args.checkpoint, device=args.device)
    tok = loaded.tokenizer
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        greedy=args.greedy,
        seed=args.seed,
        stop_token_ids=(tok.eod,),
    )
    ids = tok.encode(args.prompt)
    sys.stdout.write(args.prompt)
    new: list[int] = []
    shown = ""
    for token in generate(loaded.model, ids, sampling):
        new.append(token)
        text = tok.decode(new)
        cut = min((text.find(s) for s in args.stop if s in text), default=-1)
        if cut >= 0:
            sys.stdout.write(text[len(shown) : cut])
            break
        sys.stdout.write(text[len(shown) :])  # stream: print only what is new
        sys.stdout.flush()
        shown = text
    sys.stdout.write("\n")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from pretrain.run_config import RunConfig

    if args.reference:
        from pretrain.config_reference import config_reference

        print(config_reference(RunConfig))
        return 0
    if args.config is None:
        raise ConfigError("give a CONFIG file, or --reference")
    print(RunConfig.from_yaml(args.config, args.overrides).to_yaml(), end="")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    from data_pipeline.cli import cmd_data

    return cmd_data(args)


COMMANDS: dict[str, Any] = {
    "quickstart": _cmd_quickstart,
    "train": _cmd_train,
    "generate": _cmd_generate,
    "config": _cmd_config,
    "data": _cmd_data,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return (getattr(args, "handler", None) or COMMANDS[args.command])(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


def _exit(code: int) -> None:
    """Leave the process. A multi-process run first tears its process group down and then skips
    interpreter shutdown: torch + gloo can abort at exit otherwise (SIGABRT in most runs)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        import multiprocessing.util
        import os

        try:
            if code == 0:
                dist.barrier()
            dist.destroy_process_group()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            multiprocessing.util._exit_function()
            os._exit(code)
    sys.exit(code)


def run() -> None:
    """Console entry point (``pretrain``)."""
    _exit(main())


if __name__ == "__main__":
    run()
