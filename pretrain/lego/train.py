"""Localized Lego-MT training: language-centric groups trained one after another.

The schedule is a list of *phases* ``(stage, group)``: for each stage in ``train.stages``, for each
round, for each group. During a phase only that group's two branches plus the shared embedding,
main encoder and m2m decoder are in memory; every other branch is a partition on disk
(:mod:`pretrain.lego.store`). Stage 1 runs Enc-Flow + Mix-Flow, stage 2 freezes the main encoder
and the embedding and runs Dec-Flow (:mod:`pretrain.lego.stages`). Every encoder branch starts
as a copy of the initial main encoder; a decoder branch starts as a copy of the m2m decoder the
first time it becomes resident.

Resuming is exact: batches and dropout/layerdrop randomness are pure functions of the seed and
the global step, and the checkpoint holds the optimizer of the current phase. Each phase starts
a fresh AdamW and warmup/cosine schedule.

Under ``torchrun``/``srun`` with ``parallel.engine=deepspeed`` every process builds the same
resident model and each phase runs data parallel under ZeRO 0-3 (:mod:`pretrain.lego.parallelize`);
with ``parallel.engine=megatron`` the blocks are also split over ``parallel.tp`` ranks. Rank 0
writes partitions, checkpoints and metrics, in the single-process layout, so a run can resume
under another number of processes, ZeRO stage or tensor-parallel degree.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field, model_validator

from checkpoints import Checkpointer, load_checkpoint
from cluster.env import ProcessEnv
from parallel.config import ParallelConfig
from parallel.topology import Topology
from pretrain.config import Config
from pretrain.lego.data import batch_indices, collate, load_pairs, read_meta
from pretrain.lego.parallelize import PhaseStep, StepSettings, build_phase_step, check_lego_layout
from pretrain.lego.stages import STAGE_FLOWS, set_trainable
from pretrain.lego.store import SHARED_PARTS, PartitionStore, partition_name, state_of
from pretrain.models.lego_mt import LegoMT, LegoMTConfig
from pretrain.tracking import (
    TrackingConfig,
    default_artifact_location,
    flatten_params,
    get_or_create_experiment,
    resolve_tracking_uri,
)
from pretrain.trainer.train_module import cosine_with_warmup

logger = logging.getLogger(__name__)


class LegoTrainConfig(Config):
    """The localized training schedule and optimizer."""

    data_dir: str = "data/lego"
    """Directory of ``<group>.jsonl`` tokenized pairs and ``meta.json`` (``pretrain lego-data``)."""
    stages: list[int] = Field(default_factory=lambda: [1, 2])
    """Stages to run, in order (1: Enc+Mix flows, 2: frozen main encoder, Dec flow)."""
    rounds: int = Field(default=1, gt=0)
    """Passes over the groups within each stage."""
    stage1_steps: int = Field(default=100, gt=0)
    """Optimizer steps per group per round in stage 1."""
    stage2_steps: int = Field(default=100, gt=0)
    """Optimizer steps per group per round in stage 2."""
    batch_size: int = Field(default=16, gt=0)
    """Pairs per step."""
    max_len: int = Field(default=64, gt=1)
    """Tokens per side (specials included); longer sides are cut."""
    lr: float = Field(default=5e-4, gt=0)
    """Peak learning rate of each phase."""
    warmup: int = Field(default=10, ge=0)
    """Warmup steps of each phase."""
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    """Final LR of each phase's cosine, as a fraction of ``lr``."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Clip the global grad norm of the trainable parameters to this (0 = off)."""
    seed: int = 0
    """Seed of the initialisation, the batch order and dropout/layerdrop."""
    checkpoint_interval: int = Field(default=50, gt=0)
    """Save a resumable checkpoint every this many global steps (and at every phase end)."""
    device: str = "cpu"
    """Torch device."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute precision: ``bf16`` autocasts (one process) or runs DeepSpeed's bf16 weights
    against fp32 masters; saved partitions and optimizer state are fp32 either way."""
    init_from: str | None = None
    """A multilingual model to start from: a flow directory (``lego detach``, or a ``lego baseline``
    run). Its embedding, encoder and decoder initialise the shared embedding, the main encoder and
    the m2m decoder, and through them every branch (the paper starts all branches from one
    multilingual model). It must have this run's shape and tokenizer. ``None``: random init."""

    @model_validator(mode="after")
    def _check(self) -> LegoTrainConfig:
        if not self.stages or any(s not in STAGE_FLOWS for s in self.stages):
            raise ValueError(f"train.stages must be a list of 1/2, got {self.stages}")
        return self


class LegoRunConfig(Config):
    """A Lego-MT training run."""

    name: str = "lego-mt"
    """Run name (MLflow run name)."""
    model: LegoMTConfig = Field(default_factory=LegoMTConfig)
    """Model shape and language groups."""
    train: LegoTrainConfig = Field(default_factory=LegoTrainConfig)
    """Schedule and optimizer."""
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="lego-mt"))
    """MLflow tracking (sqlite in the run directory by default)."""
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    """Data parallelism and ZeRO (``engine: deepspeed``), or tensor x data parallelism
    (``engine: megatron``, ``tp``); activation checkpointing; pp=cp=1."""


def phases(cfg: LegoRunConfig) -> list[tuple[int, str]]:
    return [
        (stage, group)
        for stage in cfg.train.stages
        for _ in range(cfg.train.rounds)
        for group in cfg.model.groups
    ]


def _phase_steps(cfg: LegoRunConfig, stage: int) -> int:
    return cfg.train.stage1_steps if stage == 1 else cfg.train.stage2_steps


class _Tracker:
    """Minimal MLflow sink: one run per run directory, metrics sent in batches."""

    def __init__(self, cfg: LegoRunConfig, run_dir: Path, *, enabled: bool = True) -> None:
        self.client = None
        self.buffer: list[Any] = []
        if not (enabled and cfg.tracking.enabled):  # off, or not rank 0
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        uri = resolve_tracking_uri(cfg.tracking, run_dir)
        self.client = MlflowClient(uri)
        id_file = run_dir / "mlflow_run_id"
        self.run_id = id_file.read_text().strip() if id_file.is_file() else None
        if self.run_id is None:
            exp_id = get_or_create_experiment(
                self.client, cfg.tracking.experiment, default_artifact_location(uri)
            )
            run = self.client.create_run(exp_id, run_name=cfg.tracking.run_name or cfg.name)
            self.run_id = run.info.run_id
            id_file.write_text(self.run_id)
            params = flatten_params(cfg.to_dict())
            items = [mlflow.entities.Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i : i + 100])
        self.uri = uri

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.buffer.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())

    def flush(self) -> None:
        if self.client is not None and self.buffer:
            for i in range(0, len(self.buffer), 1000):
                self.client.log_batch(self.run_id, metrics=self.buffer[i : i + 1000])
            self.buffer = []

    def finish(self) -> None:
        self.flush()
        if self.client is not None:
            self.client.set_terminated(self.run_id)


class LocalizedTrainer:
    """Runs (or resumes) the phase schedule of ``cfg`` in ``run_dir`` (every rank of a job)."""

    def __init__(self, cfg: LegoRunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.env = ProcessEnv.from_environ()
        check_lego_layout(
            cfg.parallel, self.env.world_size, device=cfg.train.device, precision=cfg.train.precision
        )
        self.device = torch.device(cfg.train.device)
        self.topo: Topology | None = None
        if cfg.parallel.engine != "native":
            from parallel.apply import init_process_group

            init_process_group(self.env)
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.env.local_rank)
                torch.cuda.set_device(self.device)
        if cfg.parallel.engine == "megatron":
            from pretrain.lego.tensor_parallel import check_tensor_parallel_shape

            check_tensor_parallel_shape(cfg.model, cfg.parallel.tp)
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            self.topo = Topology.from_config(cfg.parallel, self.env.world_size, backend=backend)
        self.store = PartitionStore(self.run_dir / "parts")
        self.state_ckpt = Checkpointer(self.run_dir / "state", keep_last=2)
        self.meta = read_meta(Path(cfg.train.data_dir), vocab_size=cfg.model.vocab_size)
        self.phases = phases(cfg)
        self.results: dict[str, Any] = {"losses": {}, "resident": [], "peak_params": 0}

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    # ---- persistence ---------------------------------------------------------------
    def _init_run(self) -> None:
        torch.manual_seed(self.cfg.train.seed)
        model = self.cfg.model.build(resident=[])
        if self.cfg.train.init_from:
            self._load_multilingual(model, Path(self.cfg.train.init_from))
        parts = {"shared": 0}
        self.store.save("shared", 0, {p: state_of(getattr(model, p)) for p in SHARED_PARTS})
        main = state_of(model.main)
        for g in self.cfg.model.groups:  # every encoder branch = the initial main encoder
            self.store.save(partition_name("enc", g), 0, {"encoder": main})
            parts[partition_name("enc", g)] = 0
        state = {"phase": 0, "step_in_phase": 0, "global_step": 0, "partitions": parts}
        self.state_ckpt.save(0, {}, metadata=state)

    def _load_multilingual(self, model: LegoMT, path: Path) -> None:
        from pretrain.lego.detach import load_initial_flow

        flow = load_initial_flow(path, self.cfg.model, self.meta, Path(self.cfg.train.data_dir))
        model.embed.load_state_dict(flow.embed.state_dict())
        model.main.load_state_dict(flow.encoder.state_dict())
        model.m2m.load_state_dict(flow.decoder.state_dict())
        logger.info("initialised shared parts and every branch from %s", path)

    def _load_state(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        if self.env.is_main and self.state_ckpt.latest() is None:
            self._init_run()
        self._barrier()
        ckpt = load_checkpoint(self.state_ckpt.latest())
        return ckpt.metadata, ckpt.state.get("optimizer")

    def _build_resident(self, state: dict[str, Any], group: str) -> LegoMT:
        model = self.cfg.model.build(resident=[])
        parts = state["partitions"]
        shared = self.store.load("shared", parts["shared"])
        for p in SHARED_PARTS:
            getattr(model, p).load_state_dict(shared[p])
        model.add_group(group)  # dec branch = m2m copy unless a saved one exists
        enc, dec = partition_name("enc", group), partition_name("dec", group)
        model.enc_branches[group].load_state_dict(self.store.load(enc, parts[enc])["encoder"])
        if dec in parts:
            model.dec_branches[group].load_state_dict(self.store.load(dec, parts[dec])["decoder"])
        return model.to(self.device)

    def _save(
        self, step: PhaseStep, stage: int, group: str, state: dict[str, Any], *, with_optimizer: bool
    ) -> dict[str, Any]:
        """Write the partitions this stage changes, then the state (the commit point).

        A collective under ZeRO (full weights and optimizer state are gathered on every rank);
        rank 0 writes."""
        model, at = step.model, state["global_step"]
        parts = dict(state["partitions"])
        writes: list[tuple[str, dict[str, Any]]] = []
        if stage == 1:
            writes.append(("shared", {p: step.module_state(getattr(model, p)) for p in SHARED_PARTS}))
            writes.append(
                (partition_name("enc", group), {"encoder": step.module_state(model.enc_branches[group])})
            )
        else:
            writes.append(
                (partition_name("dec", group), {"decoder": step.module_state(model.dec_branches[group])})
            )
        payload = {"optimizer": step.optimizer_state()} if with_optimizer else {}
        for name, _ in writes:
            parts[name] = at
        state = {**state, "partitions": parts}
        if state["step_in_phase"] >= _phase_steps(self.cfg, stage):  # phase done: next phase
            state = {**state, "phase": state["phase"] + 1, "step_in_phase": 0}
        if self.env.is_main:
            for name, tensors in writes:
                self.store.save(name, at, tensors)
            self.state_ckpt.save(at, payload, metadata=state)
        self._barrier()
        return state

    # ---- loop ----------------------------------------------------------------------
    def run(self, *, stop_after: int | None = None) -> dict[str, Any]:
        """Train to the end of the schedule (or until ``stop_after`` global steps, without
        saving, as if killed). Returns ``{"losses": {step: loss}, "resident": [...], ...}``."""
        tcfg = self.cfg.train
        state, opt_state = self._load_state()
        tracker = _Tracker(self.cfg, self.run_dir, enabled=self.env.is_main)
        settings = StepSettings(
            tcfg.weight_decay, tcfg.grad_clip, tcfg.batch_size, self.device, precision=tcfg.precision
        )
        if self.topo is not None:
            self.topo.build()
        try:
            while state["phase"] < len(self.phases):
                stage, group = self.phases[state["phase"]]
                model = self._build_resident(state, group)
                model.train()
                self.results["resident"].append((state["phase"], model.resident))
                self.results["peak_params"] = max(
                    self.results["peak_params"], sum(p.numel() for p in model.parameters())
                )
                step = build_phase_step(
                    model, set_trainable(model, stage, group), settings, self.cfg.parallel, self.topo
                )
                if opt_state is not None and state["step_in_phase"] > 0:
                    step.load_optimizer_state(opt_state)
                opt_state = None
                pairs = load_pairs(Path(tcfg.data_dir), group, reverse=stage == 2)
                total = _phase_steps(self.cfg, stage)
                flows = STAGE_FLOWS[stage]
                while state["step_in_phase"] < total:
                    if stop_after is not None and state["global_step"] >= stop_after:
                        return self.results
                    k = state["step_in_phase"]
                    idx = batch_indices(len(pairs), tcfg.batch_size, k, tcfg.seed * 1000 + state["phase"])
                    batch = collate([pairs[i] for i in idx], self.meta, tcfg.max_len)
                    lr = tcfg.lr * cosine_with_warmup(
                        k, warmup=tcfg.warmup, total=total, min_ratio=tcfg.min_lr_ratio
                    )
                    torch.manual_seed(tcfg.seed * 1_000_003 + state["global_step"])
                    metrics = step.step(batch, flows=flows, group=group, lr=lr)
                    state = {**state, "step_in_phase": k + 1, "global_step": state["global_step"] + 1}
                    self.results["losses"][state["global_step"]] = metrics["loss"]
                    metrics.update({"lr": lr, "stage": stage, "phase": state["phase"]})
                    metrics[f"loss_{group}"] = metrics["loss"]
                    tracker.log(state["global_step"], metrics)
                    if (
                        state["step_in_phase"] < total
                        and state["global_step"] % tcfg.checkpoint_interval == 0
                    ):
                        state = self._save(step, stage, group, state, with_optimizer=True)
                        tracker.flush()
                state = self._save(step, stage, group, state, with_optimizer=False)
                step.close()
                del model, step
                tracker.flush()
            if self.env.is_main:
                self.store.write_index(state["partitions"], self.cfg.model.to_dict())
                (self.run_dir / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=1))
            self._barrier()
        finally:
            tracker.finish()
            if self.topo is not None:  # megatron's groups are process-global
                self.topo.destroy()
        self.results["global_step"] = state["global_step"]
        if tracker.client is not None:
            self.results["mlflow_run_id"] = tracker.run_id
            self.results["mlflow_tracking_uri"] = tracker.uri
        return self.results


def train(cfg: LegoRunConfig, run_dir: Path, *, stop_after: int | None = None) -> dict[str, Any]:
    """Run or resume localized training of ``cfg`` in ``run_dir``."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return LocalizedTrainer(cfg, Path(run_dir)).run(stop_after=stop_after)
