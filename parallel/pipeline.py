"""Pipeline parallelism for TransNormerLLM: one stage per ``pp`` rank, driven by megatron-core's
1F1B schedule (``get_forward_backward_func``).

:func:`apply_pipeline_parallel` keeps this rank's contiguous run of ``n_layers / pp`` decoder
layers of a built model (tensor/context parallel already applied, or plain) and drops the rest:
the embedding lives on the first stage, the final norm and ``lm_head`` on the last. Parameter
names stay those of the plain model (``model.layers.<global index>...``), so a stage's state
dict is a subset of the single-process one and the stages' dicts together are all of it.

Between stages the activations travel sequence first, ``(n, b, d)`` (``(n / tp, b, d)`` with
sequence parallelism, each rank's chunk ``n / cp`` with context parallelism), which is the
layout megatron's p2p communication allocates receive buffers for.

Tied input/output embeddings would need their gradients summed between the first and last
stage (megatron's embedding group); that is not done here, so tied models are refused with pp > 1.

:func:`run_schedule` calls megatron's schedule with the groups passed in (a ``P2PCommunicator``
on ``topo.pp_group`` and a ``ProcessGroupCollection``; no global group lookups). On CPU the
schedule needs :func:`parallel.cpu_shims.apply_cpu_shims` (its ``device="cuda"`` literals).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from megatron.core.enums import ModelType
from megatron.core.model_parallel_config import ModelParallelConfig
from torch import Tensor, nn

from parallel.cpu_shims import apply_cpu_shims
from parallel.topology import Topology


def stage_layers(n_layers: int, pp: int, pp_rank: int, *, vp: int = 1, vp_stage: int = 0) -> range:
    """Global indices of the decoder layers of model chunk ``vp_stage`` on pipeline rank ``pp_rank``.

    With ``vp`` virtual stages (interleaved schedule) the layers are cut into ``pp * vp`` chunks
    and rank ``r`` holds chunks ``r, r + pp, ...`` (megatron's layout).
    """
    if n_layers % (pp * vp):
        what = f"parallel.pp={pp}" if vp == 1 else f"pp * virtual stages = {pp} * {vp}"
        raise ValueError(f"model.n_layers={n_layers} is not divisible by {what}")
    per = n_layers // (pp * vp)
    chunk = vp_stage * pp + pp_rank
    return range(chunk * per, (chunk + 1) * per)


@dataclass
class ScheduleConfig(ModelParallelConfig):
    """megatron's ``ModelParallelConfig`` plus the three ``TransformerConfig`` fields its
    pipeline schedules read unguarded (a full ``TransformerConfig`` would describe a GPT)."""

    hidden_size: int = 0
    """Width of the activations passed between stages."""
    calculate_per_token_loss: bool = True
    """True: the loss function normalises itself (here: by the global token count)."""
    fine_grained_activation_offloading: bool = False
    """Not used."""


class _StageBody(nn.Module):
    """The ``model`` submodule of a stage: the plain model's names, only this stage's parts."""


class PipelineStage(nn.Module):
    """This rank's part of a TransNormerLLM, callable the way megatron's schedules expect.

    ``forward(tokens)`` embeds ``tokens`` on the first stage and otherwise runs on the tensor
    given through :meth:`set_input_tensor` (the previous stage's output). It returns the
    activations ``(n, b, d)`` sequence first, or on the last stage the logits ``(b, n, V / tp)``.

    Attributes:
        config: megatron's ``ModelParallelConfig`` for the schedule (pipeline dtype, shapes).
        model_type: megatron's model type (decoder only).
    """

    def __init__(
        self, full: nn.Module, layers: range, *, first: bool, last: bool, sequence_parallel: bool,
        config: ScheduleConfig,
    ) -> None:  # fmt: skip
        super().__init__()
        self.is_first, self.is_last = first, last
        self.sequence_parallel = sequence_parallel
        self.embed_scale = full.model.embed_scale
        self.model = _StageBody()
        if first:
            self.model.embed_tokens = full.model.embed_tokens
        self.model.layers = nn.ModuleDict({str(i): full.model.layers[i] for i in layers})
        if last:
            self.model.final_norm = full.model.final_norm
            self.lm_head = full.lm_head
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.input_tensor: Tensor | None = None

    def set_input_tensor(self, tensor: Tensor | list[Tensor] | None) -> None:
        """Called by megatron's schedule with the activations received from the previous stage."""
        self.input_tensor = tensor[0] if isinstance(tensor, list) else tensor

    def forward(self, tokens: Tensor) -> Tensor:
        if self.is_first:
            x = self.model.embed_tokens(tokens) * self.embed_scale  # (b, n, d), or (n/tp, b, d) with SP
        else:
            assert self.input_tensor is not None, "set_input_tensor() was not called on a later stage"
            x = self.input_tensor if self.sequence_parallel else self.input_tensor.transpose(0, 1)
        for layer in self.model.layers.values():
            x = layer(x)
        if self.is_last:
            return self.lm_head(self.model.final_norm(x))
        return x if self.sequence_parallel else x.transpose(0, 1).contiguous()


class PipelineModel(nn.Module):
    """Everything this rank holds of the model, under the plain model's parameter names.

    ``chunks`` are the :class:`PipelineStage` views (one, or one per virtual stage) handed to
    megatron's schedule; they share these modules and are not registered again, so the state
    dict and ``parameters()`` have each tensor once.
    """

    def __init__(self, full: nn.Module, chunks: list[PipelineStage]) -> None:
        super().__init__()
        self.model = _StageBody()
        if chunks[0].is_first:
            self.model.embed_tokens = full.model.embed_tokens
        layers = sorted((int(i), m) for c in chunks for i, m in c.model.layers.items())
        self.model.layers = nn.ModuleDict({str(i): m for i, m in layers})
        if chunks[-1].is_last:
            self.model.final_norm = full.model.final_norm
            self.lm_head = full.lm_head
        self.chunks = chunks

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("a pipeline-parallel model runs through run_schedule(), not a direct call")


def apply_pipeline_parallel(
    model: nn.Module, topo: Topology, *, sequence_parallel: bool = False, virtual_stages: int = 1
) -> PipelineModel:
    """This rank's part of ``model`` (a built TransNormerLLM, TP/CP already applied) for
    ``topo.pp`` pipeline stages, each cut into ``virtual_stages`` model chunks (> 1: megatron's
    interleaved 1F1B schedule).

    Raises:
        ValueError: if the layers do not split evenly or the embeddings are tied.
    """
    cfg = model.config
    if cfg.tie_word_embeddings:
        raise ValueError(
            "pipeline parallelism with model.tie_word_embeddings=true is not supported (the shared "
            "matrix would live on the first and the last stage): set tie_word_embeddings=false or parallel.pp=1"
        )
    apply_cpu_shims()
    dtype = model.lm_head.weight.dtype
    config = ScheduleConfig(
        hidden_size=cfg.d_model,
        tensor_model_parallel_size=topo.tp,
        pipeline_model_parallel_size=topo.pp,
        context_parallel_size=topo.cp,
        sequence_parallel=sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        batch_p2p_comm=False,
        virtual_pipeline_model_parallel_size=virtual_stages if virtual_stages > 1 else None,
    )
    chunks = []
    for v in range(virtual_stages):
        layers = stage_layers(cfg.n_layers, topo.pp, topo.pp_rank, vp=virtual_stages, vp_stage=v)
        chunk = PipelineStage(
            model, layers, first=topo.is_first_stage and v == 0,
            last=topo.is_last_stage and v == virtual_stages - 1,
            sequence_parallel=sequence_parallel, config=config,
        )  # fmt: skip
        if virtual_stages > 1:
            chunk.vp_stage = v
        chunks.append(chunk)
    return PipelineModel(model, chunks)


def run_schedule(
    model: PipelineModel,
    topo: Topology,
    forward_step: Callable[[Iterator[Any], PipelineStage], tuple[Tensor, Callable]],
    data: Callable[[], Iterator[Any]],
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool = False,
) -> list[Any]:
    """One pass of megatron's 1F1B schedule (interleaved with virtual stages) over
    ``num_microbatches``; returns what the last stage's loss function reported per micro-batch
    (``[]`` on other ranks). ``data()`` makes a fresh iterator over the micro-batches (one per
    model chunk). ``seq_length`` is the full sequence length (megatron divides by cp, and by tp with SP).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.process_groups_config import ProcessGroupCollection

    pgs = ProcessGroupCollection(
        tp=topo.tp_group, pp=topo.pp_group, cp=topo.cp_group, dp_cp=topo.dp_cp_group, embd=None, pos_embd=None
    )
    chunks = model.chunks
    config = chunks[0].config
    p2p = P2PCommunicator(pp_group=topo.pp_group, config=config)
    fb = get_forward_backward_func(pp_size=topo.pp, vp_size=config.virtual_pipeline_model_parallel_size)
    return fb(
        forward_step_func=forward_step,
        data_iterator=[data() for _ in chunks],
        model=chunks,
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        p2p_communicator=p2p,
        pg_collection=pgs,
    )
