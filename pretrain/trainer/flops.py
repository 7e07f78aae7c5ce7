"""Peak FLOP/s of a device, for model FLOPs utilisation.

GPUs: dense bf16 tensor-core peak from the device name. CPUs: cores x clock x FLOPs per cycle
of the widest fp32 FMA units the CPU reports (an estimate: MFU on CPU compares runs on the
same machine, not machines with each other).
"""

from __future__ import annotations

import os
import re

import torch

# Dense bf16 peak FLOP/s (no sparsity), by a substring of torch.cuda.get_device_name().
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "V100": 125e12,
}


def _cpu_flops_per_cycle(flags: set[str]) -> int:
    if "avx512f" in flags:
        return 64  # 2 FMA units x 16 fp32 lanes x 2 FLOPs
    if "avx2" in flags and "fma" in flags:
        return 32
    return 8


def cpu_peak_flops() -> float:
    flags: set[str] = set()
    mhz = 0.0
    try:
        text = open("/proc/cpuinfo").read()
        if m := re.search(r"^flags\s*:\s*(.*)$", text, re.M):
            flags = set(m.group(1).split())
        if m := re.search(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M):
            mhz = float(m.group(1))
    except OSError:
        pass
    cores = torch.get_num_threads() or os.cpu_count() or 1
    return cores * (mhz or 2500.0) * 1e6 * _cpu_flops_per_cycle(flags)


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of one ``device``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value
        return 312e12  # unknown GPU: A100-class assumption, said in the docs
    return cpu_peak_flops()
