"""Interrupted saves never leave a directory that looks like a valid checkpoint."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import checkpoints.save as save_mod
from checkpoints import Checkpointer, load_checkpoint, verify_checkpoint

REPO_ROOT = Path(save_mod.__file__).resolve().parents[1]


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.glob("step_*"))


def test_unserialisable_part_after_others_leaves_nothing(tmp_path: Path) -> None:
    ckpt = Checkpointer(tmp_path)
    first = ckpt.save(1, {"model": {"w": torch.ones(3)}})
    bad = {"model": {"w": torch.ones(3)}, "optimizer": {"x": torch.ones(2)}, "data": {"reader": object()}}
    with pytest.raises(TypeError, match=r"part .data.: state at .reader."):
        ckpt.save(2, bad)
    assert step_dirs(tmp_path) == ["step_00000001"]
    assert ckpt.latest() == first
    assert (tmp_path / "latest").read_text().strip() == first.name
    assert not list(tmp_path.glob(".tmp-*"))


def test_failing_manifest_write_leaves_no_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = Checkpointer(tmp_path)
    first = ckpt.save(1, {"model": {"w": torch.ones(3)}})
    real_write_json = save_mod.write_json

    def failing_write_json(path: Path, data: object, **kwargs: object) -> None:
        if path.name == "manifest.json":
            path.write_text('{"format_version": 1, "st')  # a torn write
            raise OSError("disk full")
        real_write_json(path, data, **kwargs)

    monkeypatch.setattr(save_mod, "write_json", failing_write_json)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save(2, {"model": {"w": torch.zeros(3)}})
    monkeypatch.undo()
    assert step_dirs(tmp_path) == ["step_00000001"]
    assert ckpt.latest() == first and [s for s, _ in ckpt.list()] == [1]
    assert ckpt.save(2, {"model": {"w": torch.zeros(3)}}) == ckpt.latest()


def test_crash_while_replacing_a_step_restores_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = Checkpointer(tmp_path)
    ckpt.save(4, {"trainer": {"v": 1}})
    real_rename = os.rename

    def crash_on_install(src: Path, dst: Path) -> None:
        if Path(src).name.startswith(".tmp-step_"):
            raise OSError("power cut")
        real_rename(src, dst)

    monkeypatch.setattr(save_mod.os, "rename", crash_on_install)
    with pytest.raises(OSError, match="power cut"):
        ckpt.save(4, {"trainer": {"v": 2}})
    monkeypatch.undo()
    assert step_dirs(tmp_path) == []  # the old one is set aside, not visible
    restored = Checkpointer(tmp_path).latest()  # construction moves it back
    assert restored == tmp_path / "step_00000004"
    assert load_checkpoint(restored).state["trainer"] == {"v": 1}


def test_stale_temp_dirs_are_cleaned_by_owner_and_liveness(tmp_path: Path) -> None:
    host = socket.gethostname()
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(done.stdout)
    dead = tmp_path / f".tmp-step_00000009-{host}-{dead_pid}-deadbeef"
    live = tmp_path / f".tmp-step_00000010-{host}-{os.getppid()}-cafef00d"  # e.g. a writer saving now
    remote = tmp_path / ".tmp-step_00000011-other-host-123-0badf00d"
    for path in (dead, live, remote):
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"partial")

    ckpt = Checkpointer(tmp_path)  # a reader: removes only provably dead local leftovers
    assert not dead.exists() and live.exists() and remote.exists()
    ckpt.save(1, {"trainer": {}})  # the writer: also removes other hosts' leftovers
    assert live.exists() and not remote.exists()
    assert [s for s, _ in ckpt.list()] == [1]


CHILD = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from checkpoints import Checkpointer
    root, step = Path(sys.argv[1]), int(sys.argv[2])
    ckpt = Checkpointer(root, keep_last=2, keep_every=3)
    model = {f"layer{i}.weight": torch.randn(512, 1024) for i in range(6)}  # ~12 MB
    while True:
        model["layer0.weight"][0, 0] = step
        ckpt.save(step, {"model": model, "trainer": {"step": step}}, metadata={"step": step})
        print(step, flush=True)
        step += 1
    """
)


def test_sigkill_during_saves_leaves_only_valid_checkpoints(tmp_path: Path) -> None:
    rng = random.Random(int(time.time()))
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    step, delays = 1, []
    for _ in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path), str(step)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            first = proc.stdout.readline()  # one complete save, then kill at a random moment
            assert first.strip(), "child exited before its first save"
            delays.append(rng.uniform(0.0, 0.4))
            time.sleep(delays[-1])
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            proc.stdout.close()

        ckpt = Checkpointer(tmp_path)
        found = ckpt.list()
        assert found, f"delays={delays}"
        for s, path in found:
            manifest = verify_checkpoint(path)
            assert manifest["step"] == s, f"delays={delays}"
        latest = ckpt.latest()
        assert latest is not None
        loaded = load_checkpoint(latest)
        assert loaded.state["model"]["layer0.weight"][0, 0].item() == loaded.step
        assert not list(tmp_path.glob(".tmp-*")), "the killed writer's leftovers survive a new Checkpointer"
        step = found[-1][0] + 1
