"""Assembles a training run from a :class:`RunConfig`: data, model, train module, callbacks,
trainer. ``pretrain train CONFIG`` and the quickstart both come through :func:`run_training`.
Re-running the same config resumes from the run's latest checkpoint."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from checkpoints import code_version
from cluster.env import ProcessEnv
from cluster.run_tags import RunTagsCallback, run_tags
from data_pipeline.tokenizer import SentencePieceTokenizer
from parallel.apply import build_train_module, check_layout
from pretrain.config import ConfigError
from pretrain.data.loader import Batch, SampleLoader, build_gpt_datasets
from pretrain.run_config import RunConfig
from pretrain.tracking import resolve_tracking_uri
from pretrain.trainer.callbacks.base import Callback
from pretrain.trainer.callbacks.checkpoint import CheckpointCallback
from pretrain.trainer.callbacks.evaluation import EvaluationCallback
from pretrain.trainer.callbacks.memory_monitor import MemoryMonitorCallback
from pretrain.trainer.callbacks.metrics_file import MetricsFileCallback
from pretrain.trainer.callbacks.mlflow import MLflowCallback
from pretrain.trainer.callbacks.progress import ProgressCallback
from pretrain.trainer.callbacks.speed_monitor import SpeedMonitorCallback
from pretrain.trainer.callbacks.stability import StabilityCallback
from pretrain.trainer.train_module import resolve_device
from pretrain.trainer.trainer import Trainer, seed_everything

logger = logging.getLogger(__name__)


def build_callbacks(
    config: RunConfig,
    *,
    env: ProcessEnv,
    dp_size: int,
    eval_batches: list[Batch],
    metadata: dict[str, Any],
    files: dict[str, Path],
    params: dict[str, Any],
    artifacts: dict[str, list[Path]],
    tags: dict[str, str],
    progress: bool = True,
) -> dict[str, Callback]:
    """The standard callbacks of a run under ``config`` (pretraining and finetuning stages).

    Args:
        env: this process's place in the job (throughput and MFU count every device).
        dp_size: data-parallel replicas (the global batch is ``dp_size`` local ones).
        eval_batches: held-out micro-batches; none: no evaluation.
        metadata: recorded in every checkpoint's manifest.
        files: copied into every checkpoint (``{name in checkpoint: source}``).
        params: the MLflow run's params (the resolved config).
        artifacts: files logged to the MLflow run, ``{subdir: [paths]}``.
        tags: the MLflow run's tags.
        progress: show a progress bar (on the main rank).

    Returns:
        By name: ``checkpoint``, ``speed``, ``memory``, ``stability``,
        ``evaluation`` (with ``eval_batches``), ``progress``, ``metrics_file`` and ``mlflow``
        (with ``config.tracking`` enabled).
    """
    tc = config.train
    seq_len = config.data.seq_len
    run_dir = config.resolved_run_dir
    callbacks: dict[str, Callback] = {
        "checkpoint": CheckpointCallback(
            config.checkpoint.build(config.checkpoint_dir),
            config.checkpoint.interval,
            metadata=metadata,
            files=files,
        ),
        # Throughput counts the global batch; MFU divides by the peak of every device in the job.
        "speed": SpeedMonitorCallback(
            config.model.flops_per_token(seq_len),
            tc.micro_batch_size * tc.grad_accum * seq_len * dp_size,
            tc.peak_flops * env.world_size if tc.peak_flops else None,
            devices=env.world_size,
        ),
        "memory": MemoryMonitorCallback(),
    }
    callbacks["stability"] = StabilityCallback(tc.spike_factor)
    if eval_batches:
        callbacks["evaluation"] = EvaluationCallback(eval_batches, tc.eval_interval)
    callbacks["progress"] = ProgressCallback(progress and env.is_main)
    callbacks["metrics_file"] = MetricsFileCallback(run_dir / "metrics.jsonl")
    if config.tracking.enabled:
        callbacks["mlflow"] = MLflowCallback(
            tracking_uri=resolve_tracking_uri(config.tracking, run_dir),
            experiment=config.tracking.experiment,
            run_name=config.tracking.run_name or config.name,
            params=params,
            artifacts=artifacts,
            tags=tags,
            run_id_file=run_dir / "mlflow_run_id",
            system_metrics=config.tracking.system_metrics,
        )
    return callbacks


def run_training(
    config: RunConfig, *, config_path: Path | None = None, progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) the run described by ``config``; returns its results.

    Returns:
        ``initial_loss``, ``final_loss``, ``heldout_loss``, ``heldout_perplexity``,
        ``tokens_per_second``, ``mfu_percent``, ``peak_memory_gib``, ``checkpoint``,
        ``checkpoint_dir``, ``run_dir``, ``mlflow_run_id``, ``mlflow_tracking_uri``.
    """
    env = ProcessEnv.from_environ()
    check_layout(config.parallel, env.world_size)
    config.data.check_files()
    run_dir = config.resolved_run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved_path = run_dir / "config.yaml"
    resolved_path.write_text(config.to_yaml())

    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    seed_everything(config.train.seed)
    device = resolve_device(config.train.device)

    tokenizer = SentencePieceTokenizer(config.data.tokenizer)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} tokens ({config.data.tokenizer}): raise model.vocab_size"
        )
    tc = config.train
    train_ds, valid_ds = build_gpt_datasets(
        config.data,
        tokenizer,
        train_samples=tc.steps * tc.micro_batch_size * tc.grad_accum,
        valid_samples=tc.eval_batches * tc.micro_batch_size,
        cache_dir=Path(config.data.cache_dir) if config.data.cache_dir else run_dir / "data_cache",
    )
    # Every rank builds the same weights from the same seed; the engine then shards them.
    model = config.model.build()
    model.init_weights(torch.Generator().manual_seed(tc.seed))
    model.to(device)
    setup = build_train_module(
        model, tc, config.parallel, device, env, seq_len=config.data.seq_len, model_config=config.model
    )
    module = setup.train_module
    loader = SampleLoader(train_ds, tc.micro_batch_size, dp_rank=setup.dp_rank, dp_size=setup.dp_size)
    eval_loader = SampleLoader(valid_ds, tc.micro_batch_size, dp_rank=setup.dp_rank, dp_size=setup.dp_size)
    eval_batches = [eval_loader.next_micro_batch() for _ in range(tc.eval_batches)]

    metadata = {
        "model_family": "transnormer",
        "config": config.to_dict(),
        "config_hash": config.config_hash(),
        "tokenizer": {"file": "tokenizer.model", **tokenizer.unique_identifiers},
        "code_version": code_version(),
        # The root of every finetuning lineage (see pretrain.finetune.lineage).
        "lineage": {
            "stage": "pretrain",
            "data": {"kind": "tokens", "paths": config.data.paths, "seq_len": config.data.seq_len},
            "chain": [],
        },
        # The layout the state was trained under; the saved state itself is layout-free (full).
        "layout": {
            "engine": config.parallel.engine,
            "world_size": env.world_size,
            "tp": config.parallel.tp,
            "pp": config.parallel.pp,
            "cp": config.parallel.cp,
            "dp": setup.dp_size,
            "zero_stage": config.parallel.zero_stage,
        },
    }
    tags = run_tags(config) if config.tracking.enabled else {}
    callbacks = build_callbacks(
        config,
        env=env,
        dp_size=setup.dp_size,
        eval_batches=eval_batches,
        metadata=metadata,
        files={"tokenizer.model": Path(config.data.tokenizer), "config.yaml": resolved_path},
        params=config.to_dict(),
        artifacts={
            "config": [resolved_path] + ([config_path] if config_path else []),
            "tokenizer": [Path(config.data.tokenizer)],
        },
        tags=tags,
        progress=progress,
    )
    if config.tracking.enabled:
        # A requeued job reopens its MLflow run: refresh job id, restart count and node list.
        callbacks["run_tags"] = RunTagsCallback(tags)
    if env.slurm_job_id:
        from cluster.preemption import PreemptionCallback

        callbacks["preemption"] = PreemptionCallback.from_environ(run_dir)
    trainer = Trainer(
        train_module=module,
        loader=loader,
        callbacks=callbacks,
        max_steps=tc.steps,
        grad_accum=tc.grad_accum,
        log_interval=tc.log_interval,
        is_main=env.is_main,
    )
    results = trainer.fit()
    results.update(
        run_dir=str(run_dir),
        checkpoint_dir=str(config.checkpoint_dir),
        num_params=config.model.num_params(),
        device=str(device),
    )
    (run_dir / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results
