"""Rank x worker sharding, epochs and exact resume of the h5ad and latent-cache sources.

Two gloo processes (file rendezvous) run the real loaders; each rank writes what it saw to
files and the parent asserts. Stage A (2 dataloader workers per rank) runs two epochs and a
partial one; stage B, in new processes, resumes the partial epoch from its saved state with
1 (h5ad) / 0 (latents) workers. Setup: the tiny atlas has 450 training cells in 3 shards of
150; batch_size 32, world size 2 -> 225 cells per rank -> 7 full batches = 224 cells per
rank, so one epoch covers exactly 448 distinct cells (the incomplete-batch tail of 2 is dropped).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from _batches import check_tokens, take
from _spawn import run_distributed

pytestmark = pytest.mark.distributed

BATCH = 32
N_BATCHES = 7  # per rank per epoch
EXPECTED_CELLS = 2 * N_BATCHES * BATCH  # 448 of 450
K_STOP = 3  # batches consumed before the "crash"
N_TOKENS, D_LATENT = 3, 2


def _h5ad_cfg(atlas):
    from scldm_scale.data.config import DataConfig

    return DataConfig(path=atlas, batch_size=BATCH, max_genes=24, seed=3)


def _latent_cfg(cache):
    from scldm_scale.data.config import DataConfig, SourceKind

    return DataConfig(source=SourceKind.LATENTS, path=cache, batch_size=BATCH, seed=3)


def _loader(cfg, num_workers):
    from scldm_scale.data.loader import StatefulLoader, build_dataset, load_vocab_and_labels

    vocab, labels = (None, None) if cfg.source == "latents" else load_vocab_and_labels(cfg)
    return StatefulLoader(build_dataset(cfg, vocab, labels), num_workers=num_workers)


def _stage_a(rank, world, atlas, cache, out):
    """Two full epochs and a partial one (2 workers) for both sources; cellarium order check."""
    import torch.distributed as dist

    assert dist.get_world_size() == world == 2
    res = {}
    for name, cfg in (("h5ad", _h5ad_cfg(atlas)), ("latents", _latent_cfg(cache))):
        loader = _loader(cfg, num_workers=2)
        assert loader.batches_per_epoch == N_BATCHES
        it = iter(loader)
        batches, res[f"{name}_ep0"], res[f"{name}_ep0_fp"] = take(it, N_BATCHES)
        assert loader.state_dict() == {"epoch": 0, "batches_consumed": N_BATCHES}
        _, res[f"{name}_ep1"], _ = take(it, N_BATCHES)
        assert loader.state_dict() == {"epoch": 1, "batches_consumed": N_BATCHES}
        del it
        if name == "h5ad":
            check_tokens(atlas, batches[0])
            assert batches[0]["labels_na"].shape == (BATCH, 3)
            # our batch order is cellarium's `same_order` iteration for this rank
            from cellarium.ml.data import IterableDistributedAnnDataCollectionDataset
            from cellarium.ml.utilities.data import AnnDataField

            ds = loader.dataset
            ref = IterableDistributedAnnDataCollectionDataset(
                ds.dadc,
                {"c": AnnDataField(attr="obs", key="cell_index")},
                batch_size=BATCH,
                iteration_strategy="same_order",
                shuffle=True,
                shuffle_seed=3,
                drop_last_indices=True,
                drop_incomplete_batch=True,
            )
            ref.set_epoch(0)
            np.testing.assert_array_equal(np.concatenate([d["c"] for d in ref]), res["h5ad_ep0"])
        else:
            # latents were written as z = cell id, so data and ids travel together
            assert all((b["z_nmz"][:, 0, 0] == b["cell_index_n"].float()).all() for b in batches)
        partial = _loader(cfg, num_workers=2)
        it = iter(partial)
        _, res[f"{name}_part"], res[f"{name}_part_fp"] = take(it, K_STOP)
        del it
        with open(os.path.join(out, f"{name}_state_rank{rank}.json"), "w") as f:
            json.dump(partial.state_dict(), f)
    np.savez(os.path.join(out, f"stage_a_rank{rank}.npz"), **res)


def _stage_b(rank, world, atlas, cache, out):
    """Fresh processes resume the partial epoch from its state with another worker count."""
    res = {}
    for name, cfg, workers in (("h5ad", _h5ad_cfg(atlas), 1), ("latents", _latent_cfg(cache), 0)):
        with open(os.path.join(out, f"{name}_state_rank{rank}.json")) as f:
            state = json.load(f)
        loader = _loader(cfg, num_workers=workers)
        loader.load_state_dict(state)
        it = iter(loader)
        _, res[f"{name}_rest"], res[f"{name}_rest_fp"] = take(it, N_BATCHES - K_STOP)
        assert loader.state_dict() == {"epoch": 0, "batches_consumed": N_BATCHES}
        _, res[f"{name}_next"], _ = take(it, 1)  # the next batch opens epoch 1
        assert loader.state_dict() == {"epoch": 1, "batches_consumed": 1}
        del it
    np.savez(os.path.join(out, f"stage_b_rank{rank}.npz"), **res)


def _write_latent_cache(path, n_cells):
    from scldm_scale.data.latent_cache import LatentCacheWriter, finalize_latent_cache

    ids = np.random.default_rng(0).permutation(n_cells)  # "encode" visits cells in any order
    for rank, chunk in enumerate(np.array_split(ids, 2)):
        with LatentCacheWriter(path, rank, N_TOKENS, D_LATENT, ["cell_type"], part_cells=40) as w:
            for sub in np.array_split(chunk, 7):
                z = np.broadcast_to(sub[:, None, None], (len(sub), N_TOKENS, D_LATENT)).astype(np.float32)
                w.write(z, np.zeros((len(sub), 1), dtype=np.int64), sub)
    finalize_latent_cache(path, {"mean": np.zeros(D_LATENT), "std": np.ones(D_LATENT)}, world_size=2)


@pytest.fixture(scope="module")
def runs(tiny_atlas, tiny_atlas_meta, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    cache = str(tmp / "latents")
    _write_latent_cache(cache, tiny_atlas_meta["n_cells"])
    out = str(tmp / "out")
    os.makedirs(out)
    args = (str(tiny_atlas), cache, out)
    # each stage runs in new rank processes (forked from this one after one cellarium import)
    preload = ("cellarium.ml.data", "anndata")
    run_distributed(_stage_a, tmp, world_size=2, args=args, preload=preload)
    run_distributed(_stage_b, tmp, world_size=2, args=args, preload=preload)
    a = [dict(np.load(os.path.join(out, f"stage_a_rank{r}.npz"))) for r in range(2)]
    b = [dict(np.load(os.path.join(out, f"stage_b_rank{r}.npz"))) for r in range(2)]
    return a, b


@pytest.mark.parametrize("source", ["h5ad", "latents"])
def test_one_epoch_covers_every_cell_once(runs, source):
    a, _ = runs
    for ep in ("ep0", "ep1"):
        per_rank = [r[f"{source}_{ep}"] for r in a]
        assert [len(p) for p in per_rank] == [N_BATCHES * BATCH] * 2
        cells = np.concatenate(per_rank)
        assert len(cells) == EXPECTED_CELLS == 448
        assert len(np.unique(cells)) == EXPECTED_CELLS  # no duplicates within or across ranks
        assert cells.min() >= 0 and cells.max() < 450


@pytest.mark.parametrize("source", ["h5ad", "latents"])
def test_epochs_are_reshuffled(runs, source):
    a, _ = runs
    for r in a:
        assert not np.array_equal(r[f"{source}_ep0"], r[f"{source}_ep1"])


@pytest.mark.parametrize("source", ["h5ad", "latents"])
def test_resume_with_other_worker_count_yields_exactly_the_rest(runs, source):
    a, b = runs
    for ra, rb in zip(a, b):
        assert np.array_equal(ra[f"{source}_part"], ra[f"{source}_ep0"][: K_STOP * BATCH])
        resumed = np.concatenate([ra[f"{source}_part"], rb[f"{source}_rest"]])
        np.testing.assert_array_equal(resumed, ra[f"{source}_ep0"])  # same cells, same order
        fp = np.concatenate([ra[f"{source}_part_fp"], rb[f"{source}_rest_fp"]])
        np.testing.assert_array_equal(fp, ra[f"{source}_ep0_fp"])  # and the same tokens (seeded per batch)
        np.testing.assert_array_equal(rb[f"{source}_next"], ra[f"{source}_ep1"][:BATCH])


# ---------------------------------------------------------------------------------------------
# latent cache, single process (no process group)


def test_latent_cache_round_trip_and_atomicity(tmp_path):
    from scldm_scale.data.latent_cache import (
        LatentCacheDataset,
        LatentCacheWriter,
        finalize_latent_cache,
        read_latent_stats,
    )
    from scldm_scale.errors import ScldmError

    path = tmp_path / "cache"
    rng = np.random.default_rng(0)
    z = rng.normal(size=(50, N_TOKENS, D_LATENT)).astype(np.float32)
    labels = rng.integers(0, 5, (50, 2))
    cells = np.arange(1000, 1050)
    w = LatentCacheWriter(path, 0, N_TOKENS, D_LATENT, ["cell_type", "tissue"], part_cells=16)
    for lo in range(0, 50, 7):
        w.write(z[lo : lo + 7], labels[lo : lo + 7], cells[lo : lo + 7])
    with pytest.raises(ValueError, match="shape"):
        w.write(z[:2, :1], labels[:2], cells[:2])
    with pytest.raises(ScldmError, match="manifest.json.*encode"):
        LatentCacheDataset(path, batch_size=8)  # not finalized: not readable yet
    w.close()
    assert [p["n_cells"] for p in w.parts] == [16, 16, 16, 2]
    with pytest.raises(ScldmError, match="expected 0..1"):
        finalize_latent_cache(path, {}, world_size=2)
    manifest = finalize_latent_cache(path, {"mean": np.full(D_LATENT, 0.5), "std": np.ones(D_LATENT)})
    assert manifest["n_cells"] == 50 and manifest["label_attributes"] == ["cell_type", "tissue"]
    assert not [f for f in os.listdir(path) if ".tmp-" in f]
    stats = read_latent_stats(path)
    np.testing.assert_array_equal(stats["mean"], np.full(D_LATENT, 0.5, dtype=np.float32))
    assert (stats["n_cells"], stats["n_tokens"], stats["d_latent"]) == (50, N_TOKENS, D_LATENT)

    ds = LatentCacheDataset(path, batch_size=8, shuffle=False)
    assert ds.batches_per_epoch == 6 and (ds.n_tokens, ds.d_latent) == (N_TOKENS, D_LATENT)
    batches = list(ds)
    got_z = np.concatenate([b["z_nmz"].numpy() for b in batches])
    np.testing.assert_array_equal(got_z, z[:48])
    np.testing.assert_array_equal(np.concatenate([b["labels_na"].numpy() for b in batches]), labels[:48])
    np.testing.assert_array_equal(np.concatenate([b["cell_index_n"].numpy() for b in batches]), cells[:48])
    # random access across part boundaries keeps the requested order
    ids = np.array([49, 3, 17, 16, 40, 0])
    np.testing.assert_array_equal(ds.gather(ids)["z_nmz"], z[ids])


def test_in_process_resume_semantics(tmp_path):
    """Dataset and StatefulLoader positions without workers (num_workers=0)."""
    from scldm_scale.data.latent_cache import LatentCacheDataset
    from scldm_scale.data.loader import StatefulLoader
    from scldm_scale.errors import ScldmError

    path = str(tmp_path / "cache")
    _write_latent_cache(path, 100)
    ds = LatentCacheDataset(path, batch_size=10, seed=1)
    full = [b["cell_index_n"].numpy() for b in ds]
    assert len(full) == 10 and ds.state_dict() == {"epoch": 0, "batches_consumed": 10}
    ds.load_state_dict({"epoch": 0, "batches_consumed": 4})
    rest = [b["cell_index_n"].numpy() for b in ds]
    np.testing.assert_array_equal(np.concatenate(rest), np.concatenate(full[4:]))
    with pytest.raises(ScldmError, match="does not fit"):
        ds.load_state_dict({"epoch": 0, "batches_consumed": 11})

    loader = StatefulLoader(LatentCacheDataset(path, batch_size=10, seed=1))
    it = iter(loader)
    seen = [next(it)["cell_index_n"].numpy() for _ in range(13)]
    assert loader.state_dict() == {"epoch": 1, "batches_consumed": 3}
    np.testing.assert_array_equal(np.concatenate(seen[:10]), np.concatenate(full))
    resumed = StatefulLoader(LatentCacheDataset(path, batch_size=10, seed=1))
    resumed.load_state_dict(loader.state_dict())
    nxt = next(iter(resumed))["cell_index_n"].numpy()
    np.testing.assert_array_equal(nxt, next(it)["cell_index_n"].numpy())
    with pytest.raises(ScldmError, match="no full batch"):
        next(iter(StatefulLoader(LatentCacheDataset(path, batch_size=200))))
