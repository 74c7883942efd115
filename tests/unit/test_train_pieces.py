"""Trainer building blocks that need no process group: schedules, decode targets, VAE loss, EMA."""

import math

import numpy as np
import pytest
import scipy.sparse
import torch
from scipy import stats

from scldm_scale.config import DecodeGenes, OptimConfig, Schedule
from scldm_scale.data.tokenize import tokenize_counts
from scldm_scale.train.ema import EMA
from scldm_scale.train.schedules import build_schedule
from scldm_scale.nn.packing import Packing
from scldm_scale.train.vae_loss import decode_targets, token_packing, vae_loss


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
    """Packed: cell 0 expresses genes 3, 0, 7; cell 1 gene 5 (and gene 8, dropped by the max_genes cap)."""
    return {
        "length_n": torch.tensor([3, 1]),
        "gene_ids_t": torch.tensor([3, 0, 7, 5]),
        "counts_t": torch.tensor([2.0, 1.0, 4.0, 9.0]),
        "dropped_length_n": torch.tensor([0, 1]),
        "dropped_gene_ids_e": torch.tensor([8]),
        "dropped_counts_e": torch.tensor([6.0]),
        "max_length": 3,
    }


def test_decode_targets_all_genes_scatter_counts_exactly():
    batch = _batch()
    t = decode_targets(batch, token_packing(batch), n_genes=10, mode=DecodeGenes.ALL, n_zero_genes=0, generator=None)
    dense = torch.zeros(2, 10)
    dense[0, [3, 0, 7]] = torch.tensor([2.0, 1.0, 4.0])
    dense[1, [5, 8]] = torch.tensor([9.0, 6.0])  # the dropped gene keeps its count: never scored as a zero
    assert torch.equal(t["target"], dense)
    assert t["gene_ids"].shape == (2, 10) and (t["weight"] == 1).all() and t["rows"] is None


def test_decode_targets_sampled_weights_are_unbiased():
    g = torch.Generator().manual_seed(0)
    batch = _batch()
    t = decode_targets(batch, token_packing(batch), n_genes=10, mode=DecodeGenes.SAMPLED, n_zero_genes=6, generator=g)
    rows = t["rows"]
    assert rows.lengths.tolist() == [9, 7] and rows.max_len == 9
    ids, w, target = t["gene_ids"], t["weight"], t["target"]
    # rows of a cell: its kept tokens, then its drawn genes
    assert ids[:3].tolist() == [3, 0, 7] and ids[9:10].tolist() == [5]
    assert target[:3].tolist() == [2.0, 1.0, 4.0] and target[9] == 9.0
    assert torch.all(target[3:9] == 0) and torch.all(target[10:] == 0)
    weights = rows.segment_sum(w)
    assert torch.allclose(weights, torch.tensor([10.0, 10.0]))  # expressed + reweighted zeros = all genes
    assert w[9] == 2.0  # cell 1 expresses 2 genes, 1 kept: the kept one stands for both
    drawn0, drawn1 = ids[3:9], ids[10:]
    assert (w[3:9][torch.isin(drawn0, torch.tensor([0, 3, 7]))] == 0).all()  # expressed genes are not zeros
    assert (w[10:][torch.isin(drawn1, torch.tensor([5, 8]))] == 0).all()  # nor is the dropped gene 8


def test_vae_loss_is_nb_nll_with_softmax_mean():
    torch.manual_seed(0)
    batch = _batch()
    t = decode_targets(batch, token_packing(batch), n_genes=10, mode=DecodeGenes.ALL, n_zero_genes=0, generator=None)
    logits = torch.randn(2, 10)
    theta = torch.rand(2, 10) + 0.5
    library = torch.tensor([7.0, 15.0])
    out = {"logits_nt": logits, "theta_nt": theta, "log_library_n": torch.log(library)}
    terms = vae_loss(out, t, library, n_genes=10, kl_weight=0.0, library_loss_weight=1.0)
    mu = torch.softmax(logits, 1) * library[:, None]
    k, th, m = t["target"].numpy(), theta.numpy(), mu.numpy()
    ref = -stats.nbinom.logpmf(k, th, th / (th + m)).sum(1).mean()
    assert terms["nll_per_cell"].item() == pytest.approx(ref, rel=1e-4)
    assert terms["library_mse"].item() == pytest.approx(0.0, abs=1e-10)
    assert terms["loss"].item() == pytest.approx(ref / 10, rel=1e-4)
    # the same rows packed (ALL mode flattened) give the same loss
    rows = Packing.fixed(2, 10)
    packed = {"logits_r": logits.reshape(-1), "theta_r": theta.reshape(-1), "log_library_n": torch.log(library)}
    t_packed = {**t, "rows": rows, "gene_ids": t["gene_ids"].reshape(-1)}
    assert vae_loss(packed, t_packed, library, 10, 0.0, 1.0)["loss"].item() == pytest.approx(terms["loss"].item())


def _real_batch(max_genes: int, n_cells: int = 16, n_genes: int = 1000, seed: int = 0):
    """A compact batch of sparse Poisson-gamma cells tokenized with a max_genes cap, their dense
    counts and rates."""
    rng = np.random.default_rng(seed)
    rates = rng.gamma(0.2, 3.0, (n_cells, n_genes))
    dense = rng.poisson(rates).astype(np.float32)
    batch = tokenize_counts(scipy.sparse.csr_matrix(dense), np.arange(n_genes), np.zeros((n_cells, 1)), max_genes,
                            np.random.default_rng(seed), pad=False)
    return batch, torch.from_numpy(dense), torch.from_numpy(rates).float()


@pytest.mark.parametrize("max_genes", [1000, 100])
def test_sampled_nb_loss_is_unbiased_over_seeds(max_genes):
    """The sampled decode's NB NLL (expressed genes + reweighted zeros), averaged over seeds, is within
    2% of the NLL over all genes, for logits that roughly fit the data (a trained decoder), also when
    the max_genes cap drops most of a cell's expressed genes (~250 expressed, 100 kept)."""
    n_genes, n_cells = 1000, 16
    batch, dense, rates = _real_batch(max_genes)
    assert (batch["dropped_length_n"] > 0).any() == (max_genes < 1000)
    tokens = token_packing(batch)
    g = torch.Generator().manual_seed(0)
    logits_ng = torch.log(rates + 0.05) + 0.5 * torch.randn(n_cells, n_genes, generator=g)
    theta_g = torch.rand(n_genes, generator=g) * 3 + 0.3
    library = dense.sum(1)

    def nll(targets):
        if targets["rows"] is None:
            out = {"logits_nt": logits_ng, "theta_nt": theta_g.expand(n_cells, -1), "log_library_n": library.log()}
        else:
            cell_r, gene_r = targets["rows"].seq_ids, targets["gene_ids"]
            out = {"logits_r": logits_ng[cell_r, gene_r], "theta_r": theta_g[gene_r], "log_library_n": library.log()}
        return vae_loss(out, targets, library, n_genes, 0.0, 0.0)["nll_per_cell"].item()

    full_targets = decode_targets(batch, tokens, n_genes, DecodeGenes.ALL, 0, None)
    assert torch.equal(full_targets["target"], dense)  # dropped genes keep their counts
    full = nll(full_targets)
    sampled = [nll(decode_targets(batch, tokens, n_genes, DecodeGenes.SAMPLED, 128, g)) for _ in range(200)]
    assert abs(np.mean(sampled) - full) < 0.02 * abs(full), (np.mean(sampled), full)


def test_over_max_genes_cells_never_score_dropped_genes_as_zeros():
    n_genes = 1000
    batch, dense, _ = _real_batch(max_genes=60, seed=3)
    tokens = token_packing(batch)
    t = decode_targets(batch, tokens, n_genes, DecodeGenes.SAMPLED, 800, torch.Generator().manual_seed(0))
    rows = t["rows"]
    expressed_n = (dense > 0).sum(1)
    assert (batch["dropped_length_n"] > 0).all()
    for i in range(16):
        lo, hi = int(rows.cu_seqlens[i]), int(rows.cu_seqlens[i + 1])
        kept = int(tokens.lengths[i])
        drawn, w = t["gene_ids"][lo + kept:hi], t["weight"][lo + kept:hi]
        expressed = torch.nonzero(dense[i] > 0).view(-1)
        assert (w[torch.isin(drawn, expressed)] == 0).all()  # neither kept nor dropped genes count as zeros
        assert (w[~torch.isin(drawn, expressed)] > 0).all()
        assert t["weight"][lo:lo + kept].sum().item() == pytest.approx(float(expressed_n[i]), rel=1e-5)
        assert w.sum().item() == pytest.approx(float(n_genes - expressed_n[i]), rel=1e-5)


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
