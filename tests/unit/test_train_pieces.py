"""Trainer building blocks that need no process group: schedules, decode targets, VAE loss, EMA."""

import math

import pytest
import torch
from scipy import stats

from scldm_scale.config import DecodeGenes, OptimConfig, Schedule
from scldm_scale.train.ema import EMA
from scldm_scale.train.schedules import build_schedule
from scldm_scale.train.stages import decode_targets, vae_loss


def test_cosine_schedule_warmup_and_floor():
    s = build_schedule(OptimConfig(schedule=Schedule.COSINE, warmup_steps=10, min_lr_ratio=0.1), total_steps=110)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    assert all(s(i) >= s(i + 1) for i in range(10, 110))


def test_wsd_schedule_is_flat_then_decays():
    s = build_schedule(OptimConfig(schedule=Schedule.WSD, warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2),
                       total_steps=100)
    assert s(4) == pytest.approx(1.0)
    assert all(s(i) == 1.0 for i in range(5, 80))
    assert s(90) == pytest.approx(0.5) and s(100) == pytest.approx(0.0)


def _batch():
    gene_ids = torch.tensor([[3, 0, 7], [5, 0, 0]])
    counts = torch.tensor([[2.0, 1.0, 4.0], [9.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    return {"gene_ids_ns": gene_ids, "counts_ns": counts, "mask_ns": mask}


def test_decode_targets_all_genes_scatter_counts_exactly():
    t = decode_targets(_batch(), n_genes=10, mode=DecodeGenes.ALL, n_zero_genes=0, generator=None)
    dense = torch.zeros(2, 10)
    dense[0, [3, 0, 7]] = torch.tensor([2.0, 1.0, 4.0])
    dense[1, 5] = 9.0
    assert torch.equal(t["target_nt"], dense)  # gene 0 of cell 0 keeps its count despite padding ids of 0
    assert t["gene_ids_nt"].shape == (2, 10) and t["mask_nt"].all()


def test_decode_targets_sampled_weights_are_unbiased():
    g = torch.Generator().manual_seed(0)
    t = decode_targets(_batch(), n_genes=10, mode=DecodeGenes.SAMPLED, n_zero_genes=6, generator=g)
    weights = (t["weight_nt"] * t["mask_nt"]).sum(1)
    assert torch.allclose(weights, torch.tensor([10.0, 10.0]))  # expressed + reweighted zeros = all genes
    drawn = t["gene_ids_nt"][:, 3:]
    drawn_ok = t["mask_nt"][:, 3:]
    assert not drawn_ok[0][torch.isin(drawn[0], torch.tensor([0, 3, 7]))].any()  # expressed genes are not zeros
    assert torch.all(t["target_nt"][:, 3:] == 0)


def test_vae_loss_is_nb_nll_with_softmax_mean():
    torch.manual_seed(0)
    t = decode_targets(_batch(), n_genes=10, mode=DecodeGenes.ALL, n_zero_genes=0, generator=None)
    logits = torch.randn(2, 10)
    theta = torch.rand(2, 10) + 0.5
    library = torch.tensor([7.0, 9.0])
    out = {"logits_nt": logits, "theta_nt": theta, "log_library_n": torch.log(library)}
    terms = vae_loss(out, t, library, n_genes=10, kl_weight=0.0, library_loss_weight=1.0)
    mu = torch.softmax(logits, 1) * library[:, None]
    k, th, m = t["target_nt"].numpy(), theta.numpy(), mu.numpy()
    ref = -stats.nbinom.logpmf(k, th, th / (th + m)).sum(1).mean()
    assert terms["nll_per_cell"].item() == pytest.approx(ref, rel=1e-4)
    assert terms["library_mse"].item() == pytest.approx(0.0, abs=1e-10)
    assert terms["loss"].item() == pytest.approx(ref / 10, rel=1e-4)


def test_ema_tracks_exponential_average():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(3):
        ema.update()
    expected = 1 - 0.9**3
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), expected))
    state = ema.state_dict()
    other = EMA(model, decay=0.9)
    other.load_state_dict(state)
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])
    assert math.isclose(ema.decay, 0.9)


def test_ema_partitions_round_trip_over_world_sizes(tmp_path):
    """Slices as ZeRO-3 cuts them (flat, zero-padded to a multiple of the world) reassemble exactly, and
    a checkpoint's EMA loads on any number of ranks, sharded or not."""
    from scldm_scale.train.ema import ema_state_for, partition, saved_full_state, unpartition

    full = {"a": torch.arange(7.0).reshape(7), "b": torch.randn(3, 5)}
    shapes = {k: v.shape for k, v in full.items()}
    for world in (1, 2, 3, 4, 8):
        slices = [partition(full, r, world) for r in range(world)]
        assert all(s["a"].numel() == -(-7 // world) for s in slices)
        back = unpartition(slices, shapes)
        assert all(torch.equal(back[k], full[k]) for k in full)
    # a checkpoint written by 3 sharded ranks, read back by 2 sharded ranks and by 1 unsharded one
    files = []
    for r in range(3):
        state = {"world_size": 3, "ema": partition(full, r, 3), "ema_sharded": True,
                 "ema_shapes": {k: list(v) for k, v in shapes.items()}}
        files.append(tmp_path / f"client_rank{r}.pt")
        torch.save(state, files[-1])
    assert all(torch.equal(saved_full_state(files)[k], full[k]) for k in full)

    class Sharded:
        sharded = True

    class Full:
        sharded = False

    for r in range(2):
        got = ema_state_for(Sharded(), files, r, 2)
        assert all(torch.equal(got[k], partition(full, r, 2)[k]) for k in full)
    assert all(torch.equal(ema_state_for(Full(), files, 0, 1)[k], full[k]) for k in full)
    assert torch.equal(ema_state_for(Sharded(), files, 1, 3)["b"], partition(full, 1, 3)["b"])
