"""Tensor (+ sequence) parallel TNL equals the single-process model: logits, gradients, resharding.

Each worker builds the same plain model (same seed) as its single-process reference, shards a
copy with ``apply_tensor_parallel`` and compares; fp32 on CPU/gloo.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests._dist import run_distributed

TOL = 1e-5


def _config(**overrides):
    from pretrain.models.transnormer.config import TransNormerConfig

    base = dict(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, glu_dim=48, lrpe_layers=[0], attention_block_size=8
    )
    base.update(overrides)
    return TransNormerConfig(**base)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _batch(vocab: int, seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (2, 16), generator=g)
    labels = torch.randint(0, vocab, (2, 16), generator=g)
    mask = (torch.rand(2, 16, generator=g) > 0.2).float()
    return tokens, labels, mask


def _check_exact(rank: int, topo) -> dict[str, float]:
    """Max relative errors of logits and every parameter gradient, per variant."""
    from parallel.tensor import (
        apply_tensor_parallel,
        gather_full_state_dict,
        gather_logits,
        gather_tensor,
        tp_token_loss,
    )
    from pretrain.trainer.train_module import token_loss

    errors: dict[str, float] = {}
    variants = {
        "tp": (_config(), False),
        "tp_sp": (_config(), True),
        "tp_tied": (_config(tie_word_embeddings=True, lrpe_layers=[1]), False),
    }
    for name, (cfg, sp) in variants.items():
        torch.manual_seed(0)
        plain = cfg.build()
        tp_model = apply_tensor_parallel(copy.deepcopy(plain), topo, sequence_parallel=sp)
        tokens, labels, mask = _batch(cfg.vocab_size)

        ref_logits = plain(tokens)
        token_loss(ref_logits, labels, mask).backward()
        logits = tp_model(tokens)
        errors[f"{name}/logits"] = _rel(gather_logits(logits, topo), ref_logits.detach())
        tp_token_loss(logits, labels, mask).backward()  # overwrites logits in place

        ref_grads = {n: p.grad for n, p in plain.named_parameters()}
        for n, p in tp_model.named_parameters():
            full = gather_tensor(p.grad, p, topo, to_all=True)
            errors[f"{name}/grad/{n}"] = _rel(full, ref_grads[n])
        # the full state dict is the plain one, names and values
        full_state = gather_full_state_dict(tp_model, topo)
        if topo.tp_rank == 0:
            plain_state = plain.state_dict()
            assert set(full_state) == set(plain_state), set(full_state) ^ set(plain_state)
            for k, v in plain_state.items():
                assert torch.equal(full_state[k], v), k
        else:
            assert full_state == {}
    return errors


def _check_reshard(rank: int, topo) -> dict[str, float]:
    """Save at tp=2 (gathered) -> load into a plain model; plain state -> load into a tp=2 model."""
    import io

    import torch.distributed as dist

    from parallel.tensor import (
        apply_tensor_parallel,
        gather_full_state_dict,
        gather_logits,
        load_full_state_dict,
    )

    cfg = _config()
    tokens, _, _ = _batch(cfg.vocab_size)

    # tp=2 -> tp=1: a sharded model whose weights moved away from init, saved, loaded by a plain model
    torch.manual_seed(0)
    tp_model = apply_tensor_parallel(cfg.build(), topo)
    with torch.no_grad():
        for p in tp_model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # rank-specific: shards differ from the init
    full = gather_full_state_dict(tp_model, topo)
    box = [None]
    if rank == 0:
        buf = io.BytesIO()
        torch.save(full, buf)  # the checkpoint file every rank reads
        box = [buf.getvalue()]
    dist.broadcast_object_list(box, src=0)
    plain = cfg.build()
    plain.load_state_dict(torch.load(io.BytesIO(box[0]), weights_only=True))
    errors = {"tp2_to_tp1": _rel(gather_logits(tp_model(tokens), topo), plain(tokens).detach())}

    # tp=1 -> tp=2: a plain model with other weights, loaded shard-wise
    torch.manual_seed(123)
    other = cfg.build()
    load_full_state_dict(tp_model, other.state_dict(), topo)
    errors["tp1_to_tp2"] = _rel(gather_logits(tp_model(tokens), topo), other(tokens).detach())
    with pytest.raises(KeyError, match="missing"):
        load_full_state_dict(tp_model, {}, topo)
    return errors


def _run_all(rank: int, world_size: int) -> dict[str, dict[str, float]]:
    from parallel.topology import Topology

    topo = Topology(tp=world_size, pp=1, cp=1, world_size=world_size).build()
    out = {"exact": _check_exact(rank, topo), "reshard": _check_reshard(rank, topo)}
    topo.destroy()
    return out


@pytest.fixture(scope="module")
def tp2_results() -> list[dict[str, dict[str, float]]]:
    """One 2-process run serves every test below (process start-up dominates the cost)."""
    return run_distributed(_run_all, 2)


def test_shard_unshard_roundtrip_with_stride() -> None:
    from parallel.tensor import shard, unshard

    full = torch.arange(24.0).view(8, 3)
    parts = [shard(full, 0, 4, r, 2) for r in range(2)]
    # stride 4 (q,k,v,u): rank 0 holds rows 0, 2, 4, 6 (first half of each part)
    assert parts[0][:, 0].tolist() == [0.0, 6.0, 12.0, 18.0]
    assert torch.equal(unshard(parts, 0, 4), full)
    assert torch.equal(unshard([shard(full, 1, 1, r, 3) for r in range(3)], 1, 1), full)


def test_tp2_logits_and_grads_match_single_process(tp2_results) -> None:
    errors = [r["exact"] for r in tp2_results]
    for rank_errors in errors:
        bad = {k: v for k, v in rank_errors.items() if v > TOL}
        assert not bad, bad
    # every parameter of the untied model was compared (embedding, lm_head, LRPE theta, ...)
    names = {k.split("/", 2)[2] for k in errors[0] if k.startswith("tp/grad/")}
    assert "lm_head.weight" in names and "model.layers.0.token_mixer.lrpe.theta" in names
    assert len(names) == 2 + 2 * 5 + 1


def test_tp2_checkpoint_reshards_both_ways(tp2_results) -> None:
    for r in tp2_results:
        assert set(r["reshard"]) == {"tp2_to_tp1", "tp1_to_tp2"}
        assert max(r["reshard"].values()) < TOL, r["reshard"]
