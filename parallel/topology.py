"""The one owner of process groups: degrees, their validation, and megatron-core's groups.

:class:`Topology` is built once from the ``parallel`` config and the world size. Validation is
pure arithmetic (no process group needed), so an impossible layout fails before any work
starts. :meth:`Topology.build` is the only place in the platform that calls megatron-core's
``parallel_state.initialize_model_parallel``; everything else receives the groups it needs
(``tp_group``, ``dp_group``, ... or :attr:`Topology.pgs`) as arguments.

Rank layout is megatron's default order ``tp-cp-ep-dp-pp`` (tp varies fastest, so a TP group
is a run of consecutive ranks, which on a GPU node sits on NVLink)::

    rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from parallel.config import ParallelConfig
    from pretrain.models.transnormer.config import TransNormerConfig


@dataclass(frozen=True)
class RankCoords:
    """Position of one rank on each parallel axis."""

    tp: int
    cp: int
    dp: int
    pp: int


class Topology:
    """Parallel degrees of one run and, once built, the process groups that realise them.

    Create with :meth:`from_config` (validates the arithmetic), optionally check a model with
    :meth:`validate_for_model`, then call :meth:`build` once ``torch.distributed`` is
    initialised. :meth:`destroy` tears megatron's groups down again.

    Args:
        tp, pp, cp: tensor-, pipeline- and context-parallel degrees.
        world_size: number of processes.
        backend: ``torch.distributed`` backend of the groups (``"gloo"`` on CPU, ``"nccl"`` on GPUs).
    """

    def __init__(self, *, tp: int, pp: int, cp: int, world_size: int, backend: str = "gloo") -> None:
        for name, value in (("tp", tp), ("pp", pp), ("cp", cp), ("world_size", world_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if world_size % (tp * pp * cp):
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = {tp}*{pp}*{cp} = {tp * pp * cp}: "
                "change parallel.tp/pp/cp or the number of processes"
            )
        self.tp, self.pp, self.cp = tp, pp, cp
        self.world_size = world_size
        self.dp = world_size // (tp * pp * cp)
        self.backend = backend
        self._groups: dict[str, Any] | None = None
        self._pgs: Any = None

    @classmethod
    def from_config(cls, config: ParallelConfig, world_size: int, backend: str = "gloo") -> Topology:
        """Degrees from the ``parallel`` config section; raises ValueError if they do not fit ``world_size``."""
        return cls(tp=config.tp, pp=config.pp, cp=config.cp, world_size=world_size, backend=backend)

    def __repr__(self) -> str:
        built = "built" if self._groups is not None else "not built"
        return f"Topology(tp={self.tp}, pp={self.pp}, cp={self.cp}, dp={self.dp}, world_size={self.world_size}, {built})"

    # ---- pure arithmetic -------------------------------------------------------------------

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def coords(self, rank: int) -> RankCoords:
        """Axis coordinates of global ``rank`` in megatron's ``tp-cp-ep-dp-pp`` order."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} out of range for world size {self.world_size}")
        tp_rank = rank % self.tp
        cp_rank = (rank // self.tp) % self.cp
        dp_rank = (rank // (self.tp * self.cp)) % self.dp
        pp_rank = rank // (self.tp * self.cp * self.dp)
        return RankCoords(tp=tp_rank, cp=cp_rank, dp=dp_rank, pp=pp_rank)

    def validate_for_model(
        self, model_config: TransNormerConfig, *, seq_len: int | None = None, sequence_parallel: bool = False
    ) -> None:
        """Check that the model's shapes split evenly over this layout.

        Args:
            model_config: the model section.
            seq_len: training sequence length, checked against ``cp`` (and ``tp`` with sequence parallelism).
            sequence_parallel: whether Megatron sequence parallelism splits the sequence over TP ranks.

        Raises:
            ValueError: listing every shape that does not divide, and what to change.
        """
        problems = []
        if model_config.n_heads % self.tp:
            problems.append(
                f"model.n_heads={model_config.n_heads} is not divisible by parallel.tp={self.tp} "
                "(heads are split across TP ranks): change n_heads or tp"
            )
        if model_config.glu_dim % self.tp:
            problems.append(
                f"model.glu_dim={model_config.glu_dim} is not divisible by parallel.tp={self.tp}: change glu_dim or tp"
            )
        if model_config.vocab_size % self.tp:
            problems.append(
                f"model.vocab_size={model_config.vocab_size} is not divisible by parallel.tp={self.tp}: pad the "
                f"vocabulary to a multiple of tp (e.g. {-(-model_config.vocab_size // self.tp) * self.tp}) or change tp"
            )
        if model_config.n_layers % self.pp:
            problems.append(
                f"model.n_layers={model_config.n_layers} is not divisible by parallel.pp={self.pp}: "
                "change n_layers or pp"
            )
        if seq_len is not None:
            if seq_len % self.cp:
                problems.append(
                    f"data.seq_len={seq_len} is not divisible by parallel.cp={self.cp}: change seq_len or cp"
                )
            if sequence_parallel and seq_len % (self.tp * self.cp):
                problems.append(
                    f"data.seq_len={seq_len} is not divisible by tp*cp={self.tp * self.cp} "
                    "(sequence parallelism splits the sequence over TP ranks): change seq_len or turn it off"
                )
        if problems:
            raise ValueError("parallel layout does not fit the model:\n  " + "\n  ".join(problems))

    # ---- process groups -------------------------------------------------------------------

    def build(self) -> Topology:
        """Create megatron-core's groups over the already-initialised default process group.

        Returns ``self``. Raises RuntimeError if ``torch.distributed`` is not initialised or its
        world size differs from this topology's.
        """
        from megatron.core import parallel_state

        if not dist.is_initialized():
            raise RuntimeError(
                "Topology.build() needs torch.distributed initialised (init_process_group) first"
            )
        if dist.get_world_size() != self.world_size:
            raise RuntimeError(
                f"Topology was made for world size {self.world_size} but torch.distributed has {dist.get_world_size()}"
            )
        if self._groups is not None:
            return self
        if parallel_state.model_parallel_is_initialized():
            raise RuntimeError(
                "megatron's model-parallel groups already exist: call destroy() on the old Topology"
            )
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=self.tp,
            pipeline_model_parallel_size=self.pp,
            context_parallel_size=self.cp,
            create_gloo_process_groups=False,
        )
        self._groups = {
            "tp": parallel_state.get_tensor_model_parallel_group(),
            "pp": parallel_state.get_pipeline_model_parallel_group(),
            "cp": parallel_state.get_context_parallel_group(),
            "dp": parallel_state.get_data_parallel_group(),
            "dp_cp": parallel_state.get_data_parallel_group(with_context_parallel=True),
            "mp": parallel_state.get_model_parallel_group(),
        }
        self._pgs = self._make_pgs()
        return self

    def _make_pgs(self) -> Any:
        """megatron-core's ``ProcessGroupCollection`` of the groups above (the way new megatron
        APIs take their groups, ``pg_collection=``)."""
        from megatron.core.process_groups_config import ProcessGroupCollection

        g = self._groups
        assert g is not None
        return ProcessGroupCollection(
            tp=g["tp"], pp=g["pp"], cp=g["cp"], dp=g["dp"], dp_cp=g["dp_cp"], mp=g["mp"]
        )

    def destroy(self) -> None:
        """Tear down megatron's groups (the default process group stays)."""
        from megatron.core import parallel_state

        if self._groups is not None:
            parallel_state.destroy_model_parallel()
            self._groups = None
            self._pgs = None

    @property
    def is_built(self) -> bool:
        return self._groups is not None

    def _group(self, name: str) -> Any:
        if self._groups is None:
            raise RuntimeError("Topology.build() has not been called")
        return self._groups[name]

    @property
    def tp_group(self) -> Any:
        return self._group("tp")

    @property
    def pp_group(self) -> Any:
        return self._group("pp")

    @property
    def cp_group(self) -> Any:
        return self._group("cp")

    @property
    def dp_group(self) -> Any:
        """Data-parallel group (ranks holding the same model shard and sequence part)."""
        return self._group("dp")

    @property
    def dp_cp_group(self) -> Any:
        """Data x context parallel group: where gradients are summed when ``cp > 1``."""
        return self._group("dp_cp")

    @property
    def mp_group(self) -> Any:
        """Model-parallel group (tp x pp)."""
        return self._group("mp")

    @property
    def pgs(self) -> Any:
        """megatron-core ``ProcessGroupCollection`` with ``tp, pp, cp, dp, dp_cp, mp``."""
        self._group("tp")
        return self._pgs

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.tp_group)

    @property
    def pp_rank(self) -> int:
        return dist.get_rank(self.pp_group)

    @property
    def cp_rank(self) -> int:
        return dist.get_rank(self.cp_group)

    @property
    def dp_rank(self) -> int:
        return dist.get_rank(self.dp_group)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def global_rank(self, group: Any, group_rank: int) -> int:
        """Global rank of ``group_rank`` within ``group``."""
        return dist.get_global_rank(group, group_rank)

    @property
    def device(self) -> torch.device:
        """This rank's device: ``cuda:LOCAL_RANK`` when CUDA is present, else CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
