"""Activation checkpointing: keep only a module's inputs in the forward, recompute it in the backward.

``full`` recomputes every decoder layer (``TransNormerLayer``), so the memory held for the
backward is about one layer input per layer plus one layer's activations at a time.
``selective`` recomputes only the named module types (by default the GLA token mixer, whose
block-attention intermediates are the largest activations; the cheap-to-keep SGLU is not
recomputed).

The transform swaps each chosen module's class for a subclass whose ``forward`` runs the
original through ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``. Parameter
names, the state dict and ``isinstance`` checks are unchanged, so it composes with the other
transforms (apply it after context/tensor parallelism and before ZeRO, per STYLE section 1) and
with engines that wrap the model from outside:

* native engine: plain autograd, nothing else to do;
* DeepSpeed: the engine only wraps the module; torch's non-reentrant checkpoint is what the
  platform notes report working on CPU with DeepSpeed. Under ZeRO-3 the recomputation calls the
  sub-modules again, so their parameter-gathering hooks fire again (not exercised by this
  module's tests, which use the native engine). ``deepspeed.checkpointing.checkpoint`` may be
  passed as ``checkpoint_fn`` instead (e.g. for its partitioned/CPU-offloaded activations), but
  it is *reentrant*: it needs
  ``deepspeed.checkpointing.configure(...)`` first, takes positional arguments only, and at
  least one input tensor must require grad or no gradient reaches the weights inside it (true
  for decoder layers, whose input is the embedding output, but not for a module fed raw data).

Recomputation repeats any communication inside the module (e.g. the LASP state exchange of
:mod:`parallel.context`); every rank recomputes the same modules in the same order, so the
messages still match. torch stops a recomputation early once the last saved activation it needs
is back; communication that precedes its own saved tensors (as LASP's does) always reruns.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import torch.utils.checkpoint
from torch import nn

__all__ = ["FULL_MODULES", "apply_activation_checkpointing", "is_checkpointed"]

Mode = Literal["none", "full", "selective"]
FULL_MODULES = ("TransNormerLayer",)
"""Module types recomputed in ``full`` mode: the decoder layers."""

CheckpointFn = Callable[..., Any]


def _torch_checkpoint(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, **kwargs)


def is_checkpointed(module: nn.Module) -> bool:
    """Whether ``module`` was transformed by :func:`apply_activation_checkpointing`."""
    return getattr(type(module), "_checkpointed_base", None) is not None


@functools.cache
def _checkpointed_class(base: type) -> type:
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        fn = self._checkpoint_fn
        if fn is _torch_checkpoint:
            return fn(functools.partial(base.forward, self), *args, **kwargs)
        # Reentrant checkpoint functions (DeepSpeed's) take positional arguments only.
        return fn(functools.partial(base.forward, self, **kwargs), *args)

    return type(f"Checkpointed{base.__name__}", (base,), {"forward": forward, "_checkpointed_base": base})


def _type_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def apply_activation_checkpointing(
    model: nn.Module,
    mode: Mode,
    *,
    selective_modules: tuple[str, ...] = ("GatedLinearAttention",),
    checkpoint_fn: CheckpointFn | None = None,
) -> nn.Module:
    """Recompute the chosen modules of ``model`` in the backward pass, in place.

    Args:
        model: A built model (plain, or already transformed for context/tensor parallelism).
        mode: ``"none"`` (no change), ``"full"`` (every ``TransNormerLayer``) or ``"selective"``
            (the module types named in ``selective_modules``).
        selective_modules: Class names (matched against each module's class and its bases, so
            transformed subclasses still match) recomputed in ``selective`` mode.
        checkpoint_fn: ``fn(function, *args)`` that runs ``function`` with recomputation; default
            ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``. See the module
            docstring for ``deepspeed.checkpointing.checkpoint``.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: On an unknown mode, no matching module, or a model already checkpointed.
    """
    if mode not in ("none", "full", "selective"):
        raise ValueError(
            f"unknown activation checkpointing mode {mode!r}: use parallel.activation_checkpointing=none|full|selective"
        )
    if mode == "none":
        return model
    names = set(FULL_MODULES if mode == "full" else selective_modules)
    chosen: list[nn.Module] = []
    for module in model.modules():
        if is_checkpointed(module):
            raise ValueError("apply_activation_checkpointing: the model is already checkpointed")
        if names & _type_names(module) and not any(_contains(c, module) for c in chosen):
            chosen.append(module)
    if not chosen:
        raise ValueError(
            f"apply_activation_checkpointing({mode!r}): no module of type {sorted(names)} in the model"
        )
    for module in chosen:
        module._checkpoint_fn = checkpoint_fn or _torch_checkpoint
        module.__class__ = _checkpointed_class(type(module))
    return model


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())
