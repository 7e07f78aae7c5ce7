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
from pretrain.data.loader import SampleLoader, build_gpt_datasets
from pretrain.run_config import RunConfig
from pretrain.tracking import resolve_tracking_uri
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

    tracking_uri = resolve_tracking_uri(config.tracking, run_dir)
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
    callbacks = {
        "checkpoint": CheckpointCallback(
            config.checkpoint.build(config.checkpoint_dir),
            config.checkpoint.interval,
            metadata=metadata,
            files={"tokenizer.model": Path(config.data.tokenizer), "config.yaml": resolved_path},
        ),
        # Throughput counts the global batch; MFU divides by the peak of every device in the job.
        "speed": SpeedMonitorCallback(
            config.model.flops_per_token(config.data.seq_len),
            tc.micro_batch_size * tc.grad_accum * config.data.seq_len * setup.dp_size,
            tc.peak_flops * env.world_size if tc.peak_flops else None,
            devices=env.world_size,
        ),
        "memory": MemoryMonitorCallback(),
        "stability": StabilityCallback(tc.spike_factor),
        "evaluation": EvaluationCallback(eval_batches, tc.eval_interval),
        "progress": ProgressCallback(progress and env.is_main),
        "metrics_file": MetricsFileCallback(run_dir / "metrics.jsonl"),
    }
    if config.tracking.enabled:
        artifacts = {"config": [resolved_path] + ([config_path] if config_path else [])}
        artifacts["tokenizer"] = [Path(config.data.tokenizer)]
        callbacks["mlflow"] = MLflowCallback(
            tracking_uri=tracking_uri,
            experiment=config.tracking.experiment,
            run_name=config.tracking.run_name or config.name,
            params=config.to_dict(),
            artifacts=artifacts,
            tags=run_tags(config),
            run_id_file=run_dir / "mlflow_run_id",
            system_metrics=config.tracking.system_metrics,
        )
        # A requeued job reopens its MLflow run: refresh job id, restart count and node list.
        callbacks["run_tags"] = RunTagsCallback(run_tags(config))
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
