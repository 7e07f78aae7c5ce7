"""A data run: one YAML file describing raw text -> cleaned -> self-cleaned -> tokenizer -> shards
-> blend, run stage by stage locally or on SLURM (datatrove executors).

Stages (each recorded in ``<output_dir>/stages/<name>.json`` with its parameters, which include
those of the stages before it; a re-run skips a stage whose record matches, a stage that was
interrupted resumes its unfinished datatrove tasks, and a stage whose parameters changed starts
over in a clean directory)::

    corpus     the Python standard library corpus, when inputs.stdlib      -> corpus/stdlib.jsonl
    clean      data_pipeline.clean.run_clean (rules, filters, exact dedup) -> clean/
    selfclean  data_pipeline.selfclean.run_selfclean, when enabled       -> selfclean/round_<k>/
    tokenizer  SentencePiece BPE on the final documents                    -> tokenizer/tokenizer.model
    tokenize   Megatron .bin/.idx in executor.tasks tasks                  -> tokens/<output_name>
    blend      data.paths / data.weights for training                      -> blend.json, run_config.yaml

Everything is recorded in one MLflow run per data job (``tracking``): the resolved config as
params, the clean/tokenize counts, and per self-cleaning round (the round is the step) the
threshold and in/kept/dropped counts; the round reports are logged as artifacts.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from data_pipeline.blend import BlendConfig, BlendEntry, resolve_blend
from data_pipeline.clean import CleanConfig
from data_pipeline.executors import ExecutorFactory, SlurmExecutorFactory, wait_for_slurm
from data_pipeline.selfclean.config import SelfCleanConfig
from data_pipeline.tokenize import PipelineRunner, TokenizeConfig
from data_pipeline.tokenizer import TokenizerConfig
from pretrain.config import Config
from pretrain.tracking import TrackingConfig

logger = logging.getLogger(__name__)

__all__ = ["DataRunConfig", "ExecutorConfig", "InputsConfig", "run_data_pipeline", "wait_for_slurm"]


class InputsConfig(Config):
    """Where the raw documents come from."""

    paths: list[str] = Field(default_factory=list)
    """JSONL files (plain or gzip, ``{"id", "text", ...}``) or directories of them."""
    stdlib: bool = False
    """Also use the Python standard library corpus (docstrings and sources; no download)."""
    stdlib_max_bytes: int = Field(8_000_000, ge=1000)
    """Text budget of the standard library corpus."""


class ExecutorConfig(Config):
    """Where datatrove tasks run: ``local`` processes, or ``slurm`` job arrays.

    With ``slurm`` each datatrove stage is submitted as a job array (plus datatrove's stats job)
    by ``SlurmPipelineExecutor`` and this process waits for its tasks' completion markers before
    the next stage; the ``clean`` stage's datatrove stages (clean, dedup, MinHash) are submitted
    together, each job array ``afterok`` on the one before. The driver itself (tokenizer
    training, and the short training of the evaluation model) runs where it was started. Logs
    (datatrove's and SLURM's) go under each stage's logging directory in the output directory.
    """

    kind: Literal["local", "slurm"] = "local"
    """``local``: a process pool on this machine; ``slurm``: datatrove's SLURM job arrays."""
    tasks: int = Field(1, ge=1)
    """Datatrove tasks per stage (input shards)."""
    workers: int = Field(1, ge=1)
    """Tasks running at once (local: 1 runs in this process, more use a forkserver pool, so the
    entry script needs a ``__main__`` guard; slurm: the job array's ``%`` limit)."""
    partition: str | None = None
    """SLURM partition (required for ``slurm``)."""
    time: str = "24:00:00"
    """SLURM time limit per task (``HH:MM:SS``)."""
    cpus_per_task: int = Field(1, ge=1)
    """SLURM CPUs per task."""
    mem_per_cpu_gb: int = Field(2, ge=1)
    """SLURM memory per CPU in GB (datatrove passes ``--mem-per-cpu``)."""
    venv_path: str | None = None
    """``.../bin/activate`` of the environment the SLURM tasks source; unset: the virtual
    environment running the driver (when it runs in one)."""
    qos: str | None = None
    """SLURM quality of service (none when unset)."""
    job_name: str = "data"
    """Prefix of the SLURM job names (``<job_name>-<stage>``)."""
    sbatch_args: dict[str, str] = Field(default_factory=dict)
    """Extra ``#SBATCH`` options, e.g. ``{account: proj, signal: USR1@60}``."""
    poll_seconds: float = Field(30.0, gt=0)
    """How often the driver checks a submitted stage for completion."""
    wait_timeout_s: float | None = Field(None, gt=0)
    """``slurm``: stop waiting for a stage (cancel its queued jobs and fail) after this many
    seconds; ``None`` waits as long as the jobs stay queued."""

    @model_validator(mode="after")
    def _slurm_needs_partition(self) -> ExecutorConfig:
        if self.kind == "slurm" and not self.partition:
            raise ValueError("executor.partition is required when executor.kind is slurm")
        return self

    def factory(self) -> ExecutorFactory:
        """Builds and runs the datatrove executors of the stages (see :mod:`data_pipeline.executors`)."""
        if self.kind == "local":
            return ExecutorFactory()
        assert self.partition is not None  # checked by the validator
        return SlurmExecutorFactory(
            partition=self.partition,
            time=self.time,
            cpus_per_task=self.cpus_per_task,
            mem_per_cpu_gb=self.mem_per_cpu_gb,
            venv_path=self.venv_path,
            qos=self.qos,
            job_name=self.job_name,
            sbatch_args=dict(self.sbatch_args),
            poll_seconds=self.poll_seconds,
            wait_timeout_s=self.wait_timeout_s,
        )

    def build(self, pipeline: list[Any], *, logging_dir: Path, tasks: int, name: str) -> Any:
        """The datatrove executor of one stage (``SlurmPipelineExecutor`` only for ``slurm``)."""
        return self.factory().build(
            pipeline, name=name, tasks=tasks, workers=self.workers, logging_dir=Path(logging_dir)
        )

    def runner(self) -> PipelineRunner:
        """Runs one stage to completion (submits and waits on SLURM)."""
        factory = self.factory()

        def run(pipeline: list[Any], logging_dir: Path, tasks: int) -> None:
            name = Path(logging_dir).name
            executor = factory.build(
                pipeline, name=name, tasks=tasks, workers=self.workers, logging_dir=Path(logging_dir)
            )
            from loguru import logger as datatrove_logger

            datatrove_logger.disable("datatrove")  # its per-task logs are still written to logging_dir
            try:
                factory.run_chain([executor])
            finally:
                datatrove_logger.enable("datatrove")

        return run


class DataRunConfig(Config):
    """A whole data job."""

    name: str = "data"
    """Job name: names the output directory and the MLflow run."""
    output_dir: str | None = None
    """Where every stage writes; ``None`` means ``runs/data/<name>``."""
    inputs: InputsConfig = Field(default_factory=InputsConfig)
    """Raw documents."""
    clean: CleanConfig = Field(default_factory=CleanConfig)
    """Rule-based cleaning, filters and exact dedup (its ``tasks``/``workers`` come from ``executor``)."""
    selfclean: SelfCleanConfig = Field(default_factory=SelfCleanConfig)
    """The self-cleaning loop (perplexity filtering with a small evaluation model)."""
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    """The SentencePiece tokenizer trained on the final documents."""
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    """Megatron shards."""
    blend: BlendConfig = Field(default_factory=BlendConfig)
    """The training blend."""
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    """Where datatrove tasks run (local processes or SLURM job arrays)."""
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="data"))
    """MLflow tracking (one run per data job)."""

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not v or not all(c.isalnum() or c in "._-" for c in v):
            raise ValueError("use letters, digits, '.', '_' and '-' only (it names a directory)")
        return v

    @model_validator(mode="after")
    def _has_inputs(self) -> DataRunConfig:
        if not self.inputs.paths and not self.inputs.stdlib:
            raise ValueError("inputs: give inputs.paths or set inputs.stdlib: true")
        return self

    @property
    def resolved_output_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / "data" / self.name


def _run_stage(
    out: Path, name: str, params: dict[str, Any], fn: Callable[[], dict[str, Any]], dirs: list[Path]
) -> tuple[dict[str, Any], bool]:
    """Run ``fn`` unless a finished record with the same ``params`` exists; returns ``(result, reused)``.

    A started-but-unfinished stage with other parameters has its ``dirs`` removed first, so
    datatrove's completion markers of the old parameters are never trusted.
    """
    record, started = out / "stages" / f"{name}.json", out / "stages" / f"{name}.started.json"
    params = json.loads(json.dumps(params, default=str))
    if record.is_file():
        saved = json.loads(record.read_text())
        if saved.get("params") == params:
            return saved["result"], True
    previous = json.loads(started.read_text()) if started.is_file() else None
    if previous is not None and previous != params:
        for d in dirs:
            logger.warning("stage %s: parameters changed, removing %s", name, d)
            shutil.rmtree(d, ignore_errors=True)
    record.unlink(missing_ok=True)
    started.parent.mkdir(parents=True, exist_ok=True)
    started.write_text(json.dumps(params, indent=2))
    start = time.perf_counter()
    result = fn()
    seconds = round(time.perf_counter() - start, 2)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(
        json.dumps({"params": params, "result": result, "seconds": seconds}, indent=2, default=str)
    )
    tmp.replace(record)
    return result, False


def run_data_pipeline(config: DataRunConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run every configured stage into ``config.resolved_output_dir`` (see the module docstring).

    Returns:
        The summary also written to ``<output_dir>/summary.json``: ``stages`` (per stage:
        ``result``, ``reused``, ``seconds``), ``documents`` (raw, cleaned, per round kept,
        tokenized), ``tokens``, ``blend``, ``mlflow_run_id``, ``mlflow_tracking_uri``.
    """
    from data_pipeline.selfclean.tracking import DataTracker

    out = config.resolved_output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_config.yaml").write_text(config.to_yaml())
    tracker = DataTracker(config.tracking, out, run_name=config.name, params=config.to_dict())
    runner = config.executor.runner()
    tasks = config.executor.tasks
    stages: dict[str, dict[str, Any]] = {}
    names = ["corpus", "clean", "selfclean", "tokenizer", "tokenize", "blend"]
    bar = _progress_bar(names, progress)

    def stage(name: str, params: dict[str, Any], fn: Callable[[], dict[str, Any]], dirs: list[Path]) -> dict:
        bar.set_description(name)
        start = time.perf_counter()
        result, reused = _run_stage(out, name, params, fn, dirs)
        stages[name] = {"result": result, "reused": reused, "seconds": round(time.perf_counter() - start, 2)}
        logger.info("stage %-9s %s in %.1fs", name, "reused" if reused else "done", stages[name]["seconds"])
        bar.update(1)
        return result

    # 1. corpus
    raw = [Path(p) for p in config.inputs.paths]
    params: dict[str, Any] = {"inputs": [str(p.resolve()) for p in raw]}
    if config.inputs.stdlib:
        from data_pipeline.corpus import build_stdlib_corpus

        path, budget = out / "corpus" / "stdlib.jsonl", config.inputs.stdlib_max_bytes
        stage("corpus", {"stdlib": budget}, lambda: build_stdlib_corpus(path, max_bytes=budget), [])
        raw.append(path)
        params["stdlib"] = budget
    else:
        bar.update(1)

    # 2. clean
    from data_pipeline.clean import run_clean

    clean_cfg = config.clean.model_copy(update={"tasks": tasks, "workers": config.executor.workers})
    params = {"upstream": params, "clean": clean_cfg.to_dict()}
    params["clean"].pop("workers")
    factory = config.executor.factory()
    clean = stage(
        "clean",
        params,
        lambda: run_clean(raw, out / "clean", clean_cfg, executor_factory=factory),
        [out / "clean"],
    )
    tracker.log_metrics({f"clean/{k}": v for k, v in clean.get("totals", {}).items()}, step=0)
    docs = [out / "clean" / "output"]

    # 3. self-cleaning
    if config.selfclean.enabled:
        from data_pipeline.selfclean.loop import run_selfclean

        params = {"upstream": params, "selfclean": config.selfclean.to_dict()}
        sc_dir = out / "selfclean"

        def selfclean() -> dict[str, Any]:
            return run_selfclean(
                docs,
                sc_dir,
                config.selfclean,
                runner=runner,
                tasks=tasks,
                on_round=tracker.log_round,
                progress=progress,
            )

        result = stage("selfclean", params, selfclean, [sc_dir])
        if stages["selfclean"]["reused"]:
            for stats in result["rounds"]:
                tracker.log_round(stats["round"], stats, sc_dir / f"round_{stats['round']}")
        docs = [Path(result["output"])]

    # 4-5. tokenizer and shards
    params = {"upstream": params, "tokenizer": config.tokenizer.to_dict()}
    tok_prefix = out / "tokenizer" / "tokenizer"
    tok = stage(
        "tokenizer",
        params,
        lambda: {"model": str(config.tokenizer.train(docs, tok_prefix))},
        [out / "tokenizer"],
    )
    from data_pipeline.tokenize import tokenize_parallel

    params = {"upstream": params, "tokenize": config.tokenize.to_dict(), "tasks": tasks}
    prefix = out / "tokens" / config.tokenize.output_name
    tokens = stage(
        "tokenize",
        params,
        lambda: tokenize_parallel(
            docs, Path(tok["model"]), prefix, tasks=tasks, config=config.tokenize, runner=runner
        ),
        [out / "tokens"],
    )
    tracker.log_metrics(
        {"tokenize/documents": tokens["documents"], "tokenize/tokens": tokens["tokens"]}, step=0
    )

    # 6. blend
    params = {"upstream": params, "blend": config.blend.to_dict()}
    blend = stage("blend", params, lambda: _blend(config.blend, tokens["prefixes"], tok["model"], out), [])
    bar.close()

    summary = {
        "output_dir": str(out),
        "stages": stages,
        "documents": {
            "cleaned": clean.get("totals", {}).get("kept"),
            "rounds": [r["kept"] for r in stages.get("selfclean", {}).get("result", {}).get("rounds", [])],
            "tokenized": tokens["documents"],
        },
        "tokens": tokens["tokens"],
        "tokenizer": tok["model"],
        "blend": blend,
        **tracker.finish([out / "blend.json", *(p for p in [out / "run_config.yaml"] if p.is_file())]),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def _blend(cfg: BlendConfig, prefixes: list[str], tokenizer: str, out: Path) -> dict[str, Any]:
    own = [BlendEntry(path=p, weight=cfg.output_weight / len(prefixes)) for p in prefixes]
    resolved = resolve_blend([*(own if cfg.include_output else []), *cfg.entries], tokenizer=tokenizer)
    resolved.write_json(out / "blend.json")
    result: dict[str, Any] = {
        "paths": resolved.paths,
        "weights": resolved.weights,
        "file": str(out / "blend.json"),
    }
    if cfg.run_config:
        from data_pipeline.selfclean.loop import _train_config_path
        from pretrain.run_config import RunConfig

        run_config = RunConfig.from_yaml(_train_config_path(cfg.run_config), cfg.run_overrides)
        (out / "run_config.yaml").write_text(resolved.apply(run_config).to_yaml())
        result["run_config"] = str(out / "run_config.yaml")
    return result


class _NoBar:
    def set_description(self, _: str) -> None: ...
    def update(self, _: int) -> None: ...
    def close(self) -> None: ...


def _progress_bar(names: list[str], enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=len(names), unit="stage", desc="data", leave=True)
