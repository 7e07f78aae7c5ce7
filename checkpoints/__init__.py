"""Checkpoints: atomic, checksummed, pickle-free save/load of named training state.

``Checkpointer`` (built from ``CheckpointConfig``) writes ``root/step_XXXXXXXX/`` directories with
``<part>.safetensors`` + ``state.json`` + ``manifest.json`` and a ``latest`` pointer;
``load_checkpoint`` verifies and reads them back without unpickling anything.
"""

from checkpoints.load import LoadedCheckpoint, load_checkpoint, verify_checkpoint
from checkpoints.manifest import FORMAT_VERSION, CheckpointError, code_version
from checkpoints.save import CheckpointConfig, Checkpointer
from checkpoints.state import flatten_state, unflatten_state

__all__ = [
    "FORMAT_VERSION",
    "CheckpointConfig",
    "CheckpointError",
    "Checkpointer",
    "LoadedCheckpoint",
    "code_version",
    "flatten_state",
    "load_checkpoint",
    "unflatten_state",
    "verify_checkpoint",
]
