"""Peak memory: the device allocator's high-water mark on GPU, peak RSS on CPU."""

from __future__ import annotations

import resource
import sys

import torch

from pretrain.trainer.callbacks.base import Callback


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


class MemoryMonitorCallback(Callback):
    """Records ``memory/peak_gib`` every logging window."""

    def post_step(self, step: int) -> None:
        if step % self.trainer.log_interval == 0 or step == self.trainer.max_steps:
            self.trainer.record_metric("memory/peak_gib", peak_memory_bytes(self.trainer.device) / 2**30)

    def post_train(self) -> None:
        self.trainer.results["peak_memory_gib"] = peak_memory_bytes(self.trainer.device) / 2**30
