"""SRMSNorm: the fused Triton kernels against the plain PyTorch expression, forward and backward.

Without a GPU the kernels run under Triton's CPU interpreter in fp32; ``TRITON_INTERPRET`` must
be set before Triton is imported, so that check runs in a subprocess (this module run as
``python -m tests.models.test_srmsnorm`` prints the errors as JSON).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.models.transnormer.model import SRMSNorm

REPO = Path(__file__).resolve().parents[2]
SHAPES = [(3, 5, 37), (2, 64), (4, 1000), (1, 1, 5120)]


def _errors(shape: tuple[int, ...], device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from pretrain.models.transnormer.kernels.srmsnorm_triton import srmsnorm_triton

    norm = SRMSNorm(1e-6)
    x = (torch.randn(*shape, device=device) * 3 + 0.5).to(dtype)
    grad = torch.randn(*shape, device=device).to(dtype)
    fused_in, plain_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    fused = srmsnorm_triton(fused_in, norm.eps)
    plain = norm.forward_plain(plain_in)
    (fused * grad).sum().backward()
    (plain * grad).sum().backward()
    assert fused.dtype == dtype and fused.shape == x.shape

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()

    return {"y": rel(fused, plain), "dx": rel(fused_in.grad, plain_in.grad)}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton")
def test_fused_srmsnorm_matches_plain_under_triton_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tests.models.test_srmsnorm"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(SHAPES)
    for shape, errors in results.items():
        assert max(errors.values()) < 1e-5, (shape, errors)


def test_cpu_uses_plain_path() -> None:
    x = torch.randn(2, 7, 16, requires_grad=True)
    y = SRMSNorm(1e-6)(x)
    expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(y, expected)
    assert "SRMSNormFunction" not in type(y.grad_fn).__name__


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_srmsnorm_on_cuda(dtype: torch.dtype) -> None:
    x = torch.randn(4, 33, 1024, device="cuda", dtype=dtype)
    assert "SRMSNormFunction" in type(SRMSNorm()(x.requires_grad_()).grad_fn).__name__
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    for shape in SHAPES:
        errors = _errors(shape, "cuda", dtype)
        assert max(errors.values()) < tol, (shape, errors)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    print(json.dumps({str(shape): _errors(shape) for shape in SHAPES}))
