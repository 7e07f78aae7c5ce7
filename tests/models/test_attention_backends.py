"""The Triton linear-attention backends against the masked quadratic reference.

Without a GPU the authors' ``lightning-attn`` kernels run under Triton's CPU interpreter, in fp32
(bf16 arithmetic is wrong there). ``TRITON_INTERPRET`` must be set before Triton is imported,
so those checks run in a subprocess: this module, run as ``python -m
tests.models.test_attention_backends``, prints the measured relative errors as JSON.

fla-core's kernels do not run under the interpreter; they, and ``lightning`` in bf16, are
compared with the torch backend by the ``gpu`` tests on a CUDA device.
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

from pretrain.models.transnormer.attention import linear_attention, linear_attention_naive

REPO = Path(__file__).resolve().parents[2]

# (n, d, e): n not a multiple of the kernels' block of 64; d, e not powers of two (padded);
# d > 128 (split into slices, as LRPE's doubled head width needs).
INTERPRETER_CASES = [(100, 8, 5), (64, 16, 16), (1, 32, 24), (70, 160, 8)]
SLOPE = [0.5, 0.03, 1e-5]  # fast, medium and almost no decay


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def _compare_with_naive(backend: str, n: int, d: int, e: int, state: bool, device: str = "cpu") -> dict:
    """Forward and backward of one backend against the fp64 naive form (plus initial/final state)."""
    slope = torch.tensor(SLOPE, device=device)
    q, k = torch.randn(2, 3, n, d, device=device), torch.randn(2, 3, n, d, device=device)
    v, grad = torch.randn(2, 3, n, e, device=device), torch.randn(2, 3, n, e, device=device)
    s0 = torch.randn(2, 3, d, e, device=device) if state else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    if state:
        out, kv = linear_attention(*leaves, slope, backend=backend, initial_state=s0, return_state=True)
    else:
        out = linear_attention(*leaves, slope, backend=backend)
    (out * grad).sum().backward()

    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = linear_attention_naive(*ref_leaves, slope.double())
    if state:
        pos = torch.arange(1, n + 1, device=device, dtype=torch.float64)
        age = torch.exp(-slope.double()[:, None] * (n - pos))[:, :, None]  # lambda^(n - 1 - t)
        ref_kv = (k.double() * age).transpose(-1, -2) @ v.double()
        ref = ref + (ref_leaves[0] * torch.exp(-slope.double()[:, None] * pos)[:, :, None]) @ s0.double()
        ref_kv = ref_kv + torch.exp(-slope.double() * n)[:, None, None] * s0.double()
    (ref * grad.double()).sum().backward()
    errors = {"o": _rel_err(out, ref)}
    errors.update({f"d{name}": _rel_err(a.grad, b.grad) for name, a, b in zip("qkv", leaves, ref_leaves)})
    if state:
        errors["state"] = _rel_err(kv, ref_kv)
    return errors


def _interpreter_main() -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    results = {
        f"{n},{d},{e}": _compare_with_naive("lightning", n, d, e, state=False)
        for n, d, e in INTERPRETER_CASES
    }
    results["state"] = _compare_with_naive("lightning", 37, 16, 8, state=True)
    print(json.dumps(results))


def _run_interpreted(module: str) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", module], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


needs_lightning = pytest.mark.skipif(
    importlib.util.find_spec("lightning_attn") is None or importlib.util.find_spec("triton") is None,
    reason="needs lightning-attn and triton (pip install -e .[kernels])",
)


@needs_lightning
def test_lightning_kernels_match_naive_under_triton_interpreter() -> None:
    results = _run_interpreted("tests.models.test_attention_backends")
    assert set(results) == {f"{n},{d},{e}" for n, d, e in INTERPRETER_CASES} | {"state"}
    for case, errors in results.items():
        # The kernels are tested against their own reference at ~4e-4; in fp32 they reach ~1e-6.
        assert max(errors.values()) < 1e-4, (case, errors)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _available(backend: str) -> bool:
    module = {"lightning": "lightning_attn", "fla": "fla"}[backend]
    return importlib.util.find_spec(module) is not None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["lightning", "fla"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n", "d"), [(1000, 64), (333, 128), (256, 256)])
def test_gpu_backend_matches_torch_backend(backend: str, dtype: torch.dtype, n: int, d: int) -> None:
    if not _available(backend):
        pytest.skip(f"needs the {backend} package")
    slope = torch.tensor([2 ** (-8 * j / 4) for j in range(1, 5)], device="cuda")
    q, k, v = (torch.randn(2, 4, n, d, device="cuda") / d**0.5 for _ in range(3))
    grad = torch.randn(2, 4, n, d, device="cuda")
    outs, grads = {}, {}
    for name in ("torch", backend):
        leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        out = linear_attention(*leaves, slope, backend=name)
        assert out.dtype == dtype
        (out.float() * grad).sum().backward()
        outs[name], grads[name] = out.float(), [t.grad.float() for t in leaves]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
    assert _rel_err(outs[backend], outs["torch"]) < tol
    for a, b in zip(grads[backend], grads["torch"]):
        assert _rel_err(a, b) < tol


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", ["lightning", "fla"])
def test_gpu_backend_continues_from_a_state(backend: str) -> None:
    if not _available(backend):
        pytest.skip(f"needs the {backend} package")
    errors = _compare_with_naive(backend, 200, 64, 64, state=True, device="cuda")
    assert max(errors.values()) < 1e-3, errors


if __name__ == "__main__":
    _interpreter_main()
