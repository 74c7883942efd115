"""Rank x worker sharding, epochs and exact resume of the SOMA source (and a SOMA + h5ad mixture).

Two gloo ranks (forked, or spawned when the pytest process already holds TileDB state) run
the real loaders and write what they saw; the parent asserts. Setup: the tiny atlas's
450 training cells as a SOMA experiment (joinid == cell_index); chunk_size 15 -> 30 chunks,
15 per rank = 225 cells = 9 batches of 25 per rank, so an epoch covers all 450 cells exactly.
shuffle_buffer 75 -> lanes of 3 batches, super-buffers of 6 (the last one partial).

In each rank, in order: epochs 0 and 1 with 2 workers; a partial epoch (K_STOP batches,
2 workers); its resume from the saved state with 1 and with 3 workers; the same for a
mixture of the experiment and a filtered view of it (weights 1 : 2; SOMA + h5ad mixtures
are tested in tests/unit/test_soma_source.py); finally epoch 0 of both without workers (in-process reads
come last: TileDB is not fork-safe, so a process that read SOMA itself must not fork readers).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from soma_fixtures import tiny_soma  # noqa: F401

from _batches import check_tokens, take
from _spawn import run_distributed

pytestmark = pytest.mark.distributed

BATCH = 25
N_BATCHES = 9  # per rank per epoch
N_CELLS = 450
K_STOP = 4  # batches consumed before the "crash" (inside the first super-buffer of 6)
MIX_FILTER = "tissue in ['tissue_0', 'tissue_1']"


def _soma_cfg(uri):
    from scldm_scale.data.config import DataConfig, SourceKind

    return DataConfig(
        source=SourceKind.SOMA, path=uri, batch_size=BATCH, chunk_size=15, shuffle_buffer=75, max_genes=24, seed=3
    )


def _mixture_cfg(uri):
    from scldm_scale.data.config import DataConfig, SourceKind, SourceSpec

    return DataConfig(
        source=SourceKind.MIXTURE,
        batch_size=BATCH,
        chunk_size=15,
        shuffle_buffer=75,
        max_genes=24,
        seed=3,
        sources=[
            SourceSpec(source=SourceKind.SOMA, path=uri, weight=1.0),
            SourceSpec(source=SourceKind.SOMA, path=uri, weight=2.0, value_filter=MIX_FILTER),
        ],
    )


def _loader(cfg, atlas, num_workers, validate=False):
    from scldm_scale.data.labels import LabelTables
    from scldm_scale.data.loader import StatefulLoader, build_dataset
    from scldm_scale.data.vocab import GeneVocab

    vocab = GeneVocab.load(os.path.join(atlas, "vocab.json"))
    labels = LabelTables.load(os.path.join(atlas, "labels.json"))
    return StatefulLoader(build_dataset(cfg, vocab, labels, validate=validate), num_workers=num_workers)


def _ranks(rank, world, uri, atlas, out):
    import torch.distributed as dist

    assert dist.get_world_size() == world == 2
    res = {}
    cfg = _soma_cfg(uri)
    loader = _loader(cfg, atlas, num_workers=2)
    assert loader.batches_per_epoch == N_BATCHES
    it = iter(loader)
    batches, res["ep0"], res["ep0_fp"] = take(it, N_BATCHES)
    _, res["ep1"], _ = take(it, N_BATCHES)
    assert loader.state_dict() == {"epoch": 1, "batches_consumed": N_BATCHES}
    del it
    check_tokens(atlas, batches[0])
    assert batches[0]["labels_na"].shape == (BATCH, 3)
    for ep in (0, 1):  # the documented plan is what the workers produced
        np.testing.assert_array_equal(loader.dataset.rank_joinids(ep, rank, world), res[f"ep{ep}"])

    partial = _loader(cfg, atlas, num_workers=2)
    it = iter(partial)
    _, res["part"], res["part_fp"] = take(it, K_STOP)
    state = partial.state_dict()
    del it
    for workers in (1, 3):
        resumed = _loader(cfg, atlas, num_workers=workers)
        resumed.load_state_dict(state)
        it = iter(resumed)
        _, res[f"rest_w{workers}"], res[f"rest_w{workers}_fp"] = take(it, N_BATCHES - K_STOP)
        assert resumed.state_dict() == {"epoch": 0, "batches_consumed": N_BATCHES}
        _, res[f"next_w{workers}"], _ = take(it, 1)  # the next batch opens epoch 1
        del it

    mix_cfg = _mixture_cfg(uri)
    mix_partial = _loader(mix_cfg, atlas, num_workers=2)
    n_mix = mix_partial.batches_per_epoch
    it = iter(mix_partial)
    _, res["mix_part"], res["mix_part_fp"] = take(it, K_STOP)
    mix_state = mix_partial.state_dict()
    del it
    mix_resumed = _loader(mix_cfg, atlas, num_workers=3)
    mix_resumed.load_state_dict(mix_state)
    it = iter(mix_resumed)
    _, res["mix_rest"], res["mix_rest_fp"] = take(it, n_mix - K_STOP)
    del it

    # last, without workers: from here on this rank reads TileDB itself
    _, res["ep0_inproc"], _ = take(iter(_loader(cfg, atlas, num_workers=0)), N_BATCHES)
    mix_inproc = _loader(mix_cfg, atlas, num_workers=0)
    _, res["mix_ep0"], res["mix_ep0_fp"] = take(iter(mix_inproc), n_mix)
    res["mix_choices"] = mix_inproc.dataset.choices(0)
    np.savez(os.path.join(out, f"rank{rank}.npz"), n_mix=n_mix, **res)


@pytest.fixture(scope="module")
def runs(tiny_soma, tiny_atlas, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("soma_sharding")
    out = str(tmp / "out")
    os.makedirs(out)
    import scldm_scale.data.soma_source as soma_source

    # Fork the ranks (after importing the heavy modules once here) unless this pytest process
    # has read SOMA itself (e.g. unit tests ran first): TileDB is not fork-safe, spawn then.
    clean = soma_source._TILEDB_PID is None
    run_distributed(
        _ranks,
        tmp,
        world_size=2,
        args=(tiny_soma, str(tiny_atlas), out),
        preload=("anndata", "tiledbsoma", "scldm_scale.data.soma_source") if clean else (),
        start_method="fork" if clean else "spawn",
    )
    return [dict(np.load(os.path.join(out, f"rank{r}.npz"))) for r in range(2)]


def test_one_epoch_covers_the_selection_once(runs):
    for ep in ("ep0", "ep1"):
        per_rank = [r[ep] for r in runs]
        assert [len(p) for p in per_rank] == [N_BATCHES * BATCH] * 2
        cells = np.concatenate(per_rank)
        assert len(np.unique(cells)) == len(cells) == N_CELLS  # no duplicates within or across ranks
        np.testing.assert_array_equal(np.sort(cells), np.arange(N_CELLS))  # union == selection


def test_epochs_are_reshuffled_globally(runs):
    for r in runs:
        assert not np.array_equal(r["ep0"], r["ep1"])
    # the global chunk order changes: ranks see different cells in the next epoch, not a reordering
    assert set(runs[0]["ep0"].tolist()) != set(runs[0]["ep1"].tolist())


def test_resume_with_other_worker_counts_yields_exactly_the_rest(runs):
    for r in runs:
        np.testing.assert_array_equal(r["part"], r["ep0"][: K_STOP * BATCH])
        for workers in (1, 3):
            resumed = np.concatenate([r["part"], r[f"rest_w{workers}"]])
            np.testing.assert_array_equal(resumed, r["ep0"])  # same cells, same order, none repeated/skipped
            fp = np.concatenate([r["part_fp"], r[f"rest_w{workers}_fp"]])
            np.testing.assert_array_equal(fp, r["ep0_fp"])  # and the same tokens (seeded per batch)
            np.testing.assert_array_equal(r[f"next_w{workers}"], r["ep1"][:BATCH])


def test_in_process_iteration_matches_workers(runs):
    for r in runs:
        np.testing.assert_array_equal(r["ep0_inproc"], r["ep0"])


def test_mixture_resume_and_proportions(runs):
    from scldm_scale.data.mixture import split_counts

    for r in runs:
        n_mix = int(r["n_mix"])
        assert n_mix > N_BATCHES  # 9 batches of the whole experiment + those of the filtered member
        assert np.bincount(r["mix_choices"]).tolist() == split_counts(n_mix, [1, 2]).tolist()
        assert len(r["mix_ep0"]) == n_mix * BATCH
        for key in ("mix_part", "mix_rest"):
            assert len(r[key])
        np.testing.assert_array_equal(np.concatenate([r["mix_part"], r["mix_rest"]]), r["mix_ep0"])
        np.testing.assert_array_equal(np.concatenate([r["mix_part_fp"], r["mix_rest_fp"]]), r["mix_ep0_fp"])
