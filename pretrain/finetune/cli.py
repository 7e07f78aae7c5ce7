"""``pretrain finetune CONFIG`` and ``pretrain ckpt register|list|show|pull|export|lineage``.

Wired into ``pretrain.cli`` by :func:`add_finetune_commands`; each handler returns an exit code.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from checkpoints.manifest import CheckpointError
from pretrain.config import add_overrides_argument


def _add_registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry",
        type=Path,
        default=Path("runs/registry"),
        help="registry store directory (default: runs/registry)",
    )
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow registry URI (default: sqlite:///<registry>/registry.db)"
    )


def _registry(args: argparse.Namespace):
    from checkpoints.registry import CheckpointRegistry

    return CheckpointRegistry(args.registry, args.tracking_uri)


def add_finetune_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``finetune`` and ``ckpt`` (with its sub-commands) to ``pretrain``'s sub-parsers."""
    p = subparsers.add_parser(
        "finetune",
        help="run a finetuning stage (continued pretraining, SFT, LoRA) on a saved checkpoint",
        description="Run the stage CONFIG describes, starting from its init_from checkpoint. "
        "Re-running the same command resumes the stage.",
    )
    p.add_argument("config", type=Path, help="stage config YAML, e.g. configs/sft-tiny.yaml")
    add_overrides_argument(p, help="override a config key, e.g. --set train.lr=2e-5 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_finetune)

    ckpt = subparsers.add_parser("ckpt", help="register, list, show, pull, export checkpoints; show lineage")
    sub = ckpt.add_subparsers(dest="ckpt_command", required=True, metavar="ACTION")
    p = sub.add_parser("register", help="register a checkpoint (or a run's latest) as a new model version")
    p.add_argument("name", help="registered model name")
    p.add_argument("path", help="checkpoint, checkpoints or run directory")
    p.add_argument("--alias", action="append", default=[], help="also point this alias at it (e.g. stable)")
    _add_registry_args(p)
    p.set_defaults(handler=_cmd_register)
    p = sub.add_parser("list", help="list registered versions")
    p.add_argument("name", nargs="?", default=None)
    _add_registry_args(p)
    p.set_defaults(handler=_cmd_list)
    p = sub.add_parser("show", help="show one version (NAME[:VERSION|ALIAS])")
    p.add_argument("ref")
    _add_registry_args(p)
    p.set_defaults(handler=_cmd_show)
    p = sub.add_parser("pull", help="copy a version to DEST, verifying every file's checksum")
    p.add_argument("ref")
    p.add_argument("dest", type=Path)
    _add_registry_args(p)
    p.set_defaults(handler=_cmd_pull)
    p = sub.add_parser("export", help="export a checkpoint or version as a Hugging Face directory")
    p.add_argument("ref", help="checkpoint/run directory or NAME[:VERSION|ALIAS]")
    p.add_argument("dest", type=Path)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None, help="cast the weights")
    p.add_argument("--overwrite", action="store_true")
    _add_registry_args(p)
    p.set_defaults(handler=_cmd_export)
    p = sub.add_parser("lineage", help="print the chain back to the first pretraining run")
    p.add_argument("ref", help="checkpoint/run directory, exported HF directory or NAME[:VERSION|ALIAS]")
    p.add_argument("--json", action="store_true", help="print JSON")
    _add_registry_args(p)
    p.set_defaults(handler=_cmd_lineage)


def _guarded(fn):
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (CheckpointError, ValueError, FileExistsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


@_guarded
def _cmd_finetune(args: argparse.Namespace) -> int:
    from pretrain.finetune.config import StageConfig
    from pretrain.finetune.run import run_stage

    stage = StageConfig.from_yaml(args.config, args.overrides)
    results = run_stage(stage, config_path=args.config, progress=not args.no_progress)
    print(
        json.dumps({k: results.get(k) for k in ("final_loss", "heldout_loss", "checkpoint", "mlflow_run_id")})
    )
    return 0


@_guarded
def _cmd_register(args: argparse.Namespace) -> int:
    from pretrain.inference import resolve_checkpoint

    info = _registry(args).register(args.name, resolve_checkpoint(args.path), aliases=args.alias)
    print(f"registered {info.name} version {info.version} ({info.manifest_sha256[:16]}) at {info.path}")
    return 0


@_guarded
def _cmd_list(args: argparse.Namespace) -> int:
    for v in _registry(args).list(args.name):
        aliases = f" [{', '.join(v.aliases)}]" if v.aliases else ""
        print(f"{v.name}:{v.version}{aliases}  step={v.tags.get('step')}  stage={v.tags.get('stage')}  "
              f"sha256={v.manifest_sha256[:16]}  {v.path}")  # fmt: skip
    return 0


@_guarded
def _cmd_show(args: argparse.Namespace) -> int:
    print(json.dumps(_registry(args).resolve(args.ref).to_dict(), indent=2))
    return 0


@_guarded
def _cmd_pull(args: argparse.Namespace) -> int:
    dest = _registry(args).pull(args.ref, args.dest)
    print(f"pulled {args.ref} to {dest} (all files verified)")
    return 0


@_guarded
def _cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from checkpoints.export import export_hf
    from pretrain.finetune.lineage import resolve_checkpoint_ref

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype or "")
    registry = None if Path(args.ref).exists() else _registry(args)
    with tempfile.TemporaryDirectory() as work:
        ckpt, kw = resolve_checkpoint_ref(args.ref, registry, Path(work))
        out = export_hf(ckpt, args.dest, dtype=dtype, overwrite=args.overwrite, source_ref=kw["ref"])
    print(f"exported {args.ref} to {out}")
    return 0


@_guarded
def _cmd_lineage(args: argparse.Namespace) -> int:
    import tempfile

    from pretrain.finetune.lineage import format_chain, lineage_chain

    registry = _registry(args) if (args.registry.is_dir() or not Path(args.ref).exists()) else None
    with tempfile.TemporaryDirectory() as work:
        chain = lineage_chain(args.ref, registry, Path(work))
    print(json.dumps(chain, indent=2) if args.json else format_chain(chain))
    return 0
