"""Run a finetuning stage: the parent's weights, the stage's data, the shared trainer.

Same assembly as :func:`pretrain.train.run_training` (train module from ``parallel.apply``,
``SampleLoader``, the standard callbacks, ``Trainer``), with three differences: the weights come
from ``init_from`` instead of a random init, the data is token shards (``continued``) or an
instruction mixture with masked prompts (``sft``/``lora``), and every checkpoint records its
lineage. Re-running the same config resumes from the stage's own latest checkpoint.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from checkpoints import code_version
from cluster.env import ProcessEnv
from data_pipeline.tokenizer import SentencePieceTokenizer
from parallel.apply import build_train_module, check_layout
from pretrain.config import ConfigError
from pretrain.data.loader import SampleLoader, build_gpt_datasets
from pretrain.finetune.config import StageConfig
from pretrain.finetune.data import build_instruction_datasets
from pretrain.finetune.instructions import build_mixture
from pretrain.finetune.lineage import LineageCallback, Parent, resolve_init_from
from pretrain.finetune.lora import apply_lora, lora_metadata
from pretrain.run_config import RunConfig
from pretrain.train import build_callbacks
from pretrain.trainer.train_module import resolve_device
from pretrain.trainer.trainer import Trainer, seed_everything

logger = logging.getLogger(__name__)


def stage_run_config(stage: StageConfig, parent: Parent, tokenizer: Path) -> RunConfig:
    """The :class:`RunConfig` a stage trains under (recorded in its checkpoints, so that
    ``load_model``/export find the model shape as for any run)."""
    model = parent.model_config
    if stage.attention_block_size:
        model = model.model_copy(update={"attention_block_size": stage.attention_block_size})
    # For sft/lora, data.paths names the instruction files (recorded, never read as shards).
    files = [str(f) for f in stage.instructions.files()] if stage.instructions else []
    data = stage.data.model_dump() if stage.data else {"paths": files, "seq_len": stage.seq_len}
    data["tokenizer"] = str(tokenizer)
    return RunConfig.from_dict(
        {
            "name": stage.name,
            "run_dir": str(stage.resolved_run_dir),
            "data": data,
            "model": model.to_dict(),
            "train": stage.train.to_dict(),
            "parallel": stage.parallel.to_dict(),
            "checkpoint": stage.checkpoint.to_dict(),
            "tracking": stage.tracking.to_dict(),
        },
        source=f"finetune stage {stage.name}",
    )


def _tokenizer_for(stage: StageConfig, parent: Parent) -> Path:
    if stage.stage == "continued" and stage.data.tokenizer:
        given = Path(stage.data.tokenizer)
        if parent.tokenizer is not None and given.is_file():
            if SentencePieceTokenizer(given).sha256 != SentencePieceTokenizer(parent.tokenizer).sha256:
                raise ConfigError(
                    f"data.tokenizer={given} is not the parent's tokenizer ({parent.tokenizer}); "
                    "continued pretraining must use the parent's"
                )
        return given
    if parent.tokenizer is None:
        raise ConfigError(
            f"init_from={stage.init_from} ships no tokenizer.model; the stage needs the parent's"
        )
    return parent.tokenizer


def _datasets(stage: StageConfig, run_cfg: RunConfig, tokenizer: SentencePieceTokenizer, run_dir: Path):
    tc = stage.train
    if stage.stage == "continued":
        run_cfg.data.check_files()
        train_ds, valid_ds = build_gpt_datasets(
            run_cfg.data,
            tokenizer,
            train_samples=tc.steps * tc.micro_batch_size * tc.grad_accum,
            valid_samples=tc.eval_batches * tc.micro_batch_size,
            cache_dir=Path(run_cfg.data.cache_dir) if run_cfg.data.cache_dir else run_dir / "data_cache",
        )
        summary = {"kind": "tokens", "paths": run_cfg.data.paths, "seq_len": run_cfg.data.seq_len}
        return train_ds, valid_ds, summary
    cfg = stage.instructions
    examples, summary = build_mixture(cfg)
    train_ds, eval_ds = build_instruction_datasets(
        tokenizer, examples, cfg.seq_len, packing=cfg.packing, eval_examples=cfg.eval_examples
    )
    summary.update(
        seq_len=cfg.seq_len, packing=cfg.packing, samples=len(train_ds), target_tokens=train_ds.target_tokens
    )
    return train_ds, eval_ds, summary


def run_stage(
    stage: StageConfig, *, config_path: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) the finetuning stage ``stage``; returns the trainer's results plus
    ``checkpoint``, ``run_dir``, ``parent``."""
    env = ProcessEnv.from_environ()
    check_layout(stage.parallel, env.world_size)
    run_dir = stage.resolved_run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    stage_path = run_dir / "stage.yaml"
    stage_path.write_text(stage.to_yaml())
    tc = stage.train
    if tc.threads:
        torch.set_num_threads(tc.threads)
    seed_everything(tc.seed)
    device = resolve_device(tc.device)

    registry = stage.registry.build() if not Path(stage.init_from).exists() else None
    parent = resolve_init_from(stage.init_from, registry, run_dir / "parent")
    tok_path = _tokenizer_for(stage, parent)
    run_cfg = stage_run_config(stage, parent, tok_path)
    resolved_path = run_dir / "config.yaml"
    resolved_path.write_text(run_cfg.to_yaml())
    tokenizer = SentencePieceTokenizer(tok_path)
    if tokenizer.vocab_size > run_cfg.model.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} tokens, the parent model {run_cfg.model.vocab_size}"
        )
    train_ds, valid_ds, data_summary = _datasets(stage, run_cfg, tokenizer, run_dir)

    model = run_cfg.model.build()
    model.load_state_dict(parent.state)
    metadata: dict[str, Any] = {}
    if stage.stage == "lora":
        wrapped = apply_lora(model, stage.lora)
        metadata["lora"] = {**lora_metadata(stage.lora), "modules": len(wrapped)}
    model.to(device)
    seq_len = stage.seq_len
    setup = build_train_module(
        model, tc, stage.parallel, device, env, seq_len=seq_len, model_config=run_cfg.model
    )
    loader = SampleLoader(train_ds, tc.micro_batch_size, dp_rank=setup.dp_rank, dp_size=setup.dp_size)
    eval_batches = []
    if valid_ds is not None and len(valid_ds):
        eval_loader = SampleLoader(
            valid_ds, tc.micro_batch_size, dp_rank=setup.dp_rank, dp_size=setup.dp_size
        )
        eval_batches = [eval_loader.next_micro_batch() for _ in range(tc.eval_batches)]

    lineage = {
        "stage": stage.stage,
        "init_from": stage.init_from,
        "data": data_summary,
        "config_hash": stage.config_hash(),
        "mlflow_run_id": None,
        "parent": parent.entry,
        "chain": parent.chain,
    }
    metadata.update(
        model_family="transnormer",
        config=run_cfg.to_dict(),
        stage_config=stage.to_dict(),
        config_hash=stage.config_hash(),
        tokenizer={"file": "tokenizer.model", **tokenizer.unique_identifiers},
        code_version=code_version(),
        layout={"engine": stage.parallel.engine, "world_size": env.world_size, "tp": stage.parallel.tp,
                "pp": stage.parallel.pp, "cp": stage.parallel.cp, "dp": setup.dp_size},
        lineage=lineage,
    )  # fmt: skip
    callbacks = build_callbacks(
        run_cfg,
        env=env,
        dp_size=setup.dp_size,
        eval_batches=eval_batches,
        metadata=metadata,
        files={"tokenizer.model": tok_path, "config.yaml": resolved_path, "stage.yaml": stage_path},
        params=stage.to_dict(),
        artifacts={"config": [stage_path, resolved_path] + ([config_path] if config_path else [])},
        tags={
            "code_version": metadata["code_version"],
            "config_hash": stage.config_hash(),
            "stage": stage.stage,
        },
        progress=progress,
    )
    callbacks["lineage"] = LineageCallback(lineage)
    trainer = Trainer(
        train_module=setup.train_module,
        loader=loader,
        callbacks=callbacks,
        max_steps=tc.steps,
        grad_accum=tc.grad_accum,
        log_interval=tc.log_interval,
        is_main=env.is_main,
    )
    results = trainer.fit()
    results.update(run_dir=str(run_dir), checkpoint_dir=str(run_cfg.checkpoint_dir), parent=parent.entry,
                   data=data_summary, device=str(device))  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results
