"""Rank x worker sharding, epochs and elastic resume of the h5ad and latent-cache sources.

Gloo processes (file rendezvous) run the real sources; each rank writes what it saw to files and
the parent asserts. Stage A: 2 ranks x 2 dataloader workers take 9 steps (576 stream cells: the
450 cells of epoch 0 and the start of epoch 1) and save the position after 3 steps (192 cells).
Stage B resumes that position on 1 rank (2 workers), stage C on 3 ranks (1 worker): both must
continue with exactly the stream of stage A from cell 192 on - the cells not yet seen, none
repeated, none skipped, with the same tokens. Every stage also runs the inference pass.
The h5ad source draws each batch from 2 shards (``shards_per_batch=2``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from _elastic import global_stream, load, saved_state, stage
from _spawn import run_distributed

pytestmark = pytest.mark.distributed

BATCH = 32
N_CELLS = 450
STEPS_A, SAVE_AT = 9, 3  # 2 ranks: 64 cells per step
RESUMED = {1: 12, 3: 4}  # steps after the resume on 1 and 3 ranks: up to stream cell 576
N_TOKENS, D_LATENT = 3, 2


def _specs(atlas, cache):
    from scldm_scale.data.config import DataConfig, SourceKind

    return {
        "h5ad": {"cfg": DataConfig(path=atlas, batch_size=BATCH, max_genes=24, seed=3, shards_per_batch=2)},
        "latents": {"cfg": DataConfig(source=SourceKind.LATENTS, path=cache, batch_size=BATCH, seed=3)},
    }


def _checked_stage(rank, world, atlas, cache, out, tag, plan):
    """:func:`_elastic.stage`, plus checks of the batches' contents in the first steps."""
    from _batches import check_tokens
    from _elastic import make_source

    specs = _specs(atlas, cache)
    if tag == "a":
        h5ad = make_source(specs["h5ad"])
        batch = next(h5ad.batches(num_workers=1))
        check_tokens(atlas, batch)  # tokens are the cells' expressed genes
        assert batch["labels_na"].shape == (BATCH, 3)
        latents = make_source(specs["latents"])
        it = latents.batches(num_workers=1)
        for _ in range(3):  # latents were written as z = cell id: data and ids travel together
            batch = next(it)
            assert (batch["z_nmz"][:, 0, 0] == batch["cell_index_n"].float()).all()
        del it
    stage(rank, world, specs, out, tag, plan)


def _write_latent_cache(path, n_cells, world=2, run_id="test"):
    from scldm_scale.data.latent_cache import LatentCacheWriter, finalize_latent_cache

    ids = np.random.default_rng(0).permutation(n_cells)  # "encode" visits cells in any order
    for rank, chunk in enumerate(np.array_split(ids, world)):
        with LatentCacheWriter(path, rank, N_TOKENS, D_LATENT, ["cell_type"], run_id=run_id, world_size=world,
                               part_cells=40) as w:
            for sub in np.array_split(chunk, 7):
                z = np.broadcast_to(sub[:, None, None], (len(sub), N_TOKENS, D_LATENT)).astype(np.float32)
                w.write(z, np.zeros((len(sub), 1), dtype=np.int64), sub)
    return finalize_latent_cache(path, {"mean": np.zeros(D_LATENT), "std": np.ones(D_LATENT)}, world_size=world,
                                 run_id=run_id)


@pytest.fixture(scope="module")
def runs(tiny_atlas, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharding")
    cache = str(tmp / "latents")
    _write_latent_cache(cache, N_CELLS)
    out = str(tmp / "out")
    os.makedirs(out)
    names = ("h5ad", "latents")
    plans = {
        "a": (2, {n: {"steps": STEPS_A, "workers": 2, "save_at": SAVE_AT, "resume": False} for n in names}),
        "b": (1, {n: {"steps": RESUMED[1], "workers": 2, "save_at": 0, "resume": True} for n in names}),
        "c": (3, {n: {"steps": RESUMED[3], "workers": 1, "save_at": 0, "resume": True} for n in names}),
    }
    preload = ("cellarium.ml.data", "anndata")  # ranks fork from this process after one cellarium import
    for tag, (world, plan) in plans.items():
        run_distributed(_checked_stage, tmp, world_size=world, args=(str(tiny_atlas), cache, out, tag, plan),
                        preload=preload)
    return out, {tag: load(out, tag, world) for tag, (world, _) in plans.items()}


@pytest.mark.parametrize("source", ["h5ad", "latents"])
def test_one_epoch_is_the_selection_exactly_once(runs, source):
    _, res = runs
    stream = global_stream(res["a"], f"{source}_cells")
    assert len(stream) == STEPS_A * 2 * BATCH == 576
    np.testing.assert_array_equal(np.sort(stream[:N_CELLS]), np.arange(N_CELLS))  # epoch 0: every cell once
    epoch1 = stream[N_CELLS:]
    assert len(np.unique(epoch1)) == len(epoch1)  # epoch 1 goes on, reshuffled
    assert not np.array_equal(epoch1[:64], stream[:64])
    ranks = [set(r[f"{source}_cells"].reshape(-1)[: 3 * BATCH].tolist()) for r in res["a"]]
    assert not ranks[0] & ranks[1]  # the ranks read different cells


@pytest.mark.parametrize("source", ["h5ad", "latents"])
@pytest.mark.parametrize("world", [1, 3])
def test_resume_on_another_number_of_ranks_yields_exactly_the_rest(runs, source, world):
    out, res = runs
    state = saved_state(out, source, 2)
    assert {k: state[k] for k in ("epoch", "cells_consumed", "cells_per_epoch", "world_size")} == {
        "epoch": 0, "cells_consumed": SAVE_AT * 2 * BATCH, "cells_per_epoch": N_CELLS, "world_size": 2}
    seen = SAVE_AT * 2 * BATCH
    before = global_stream(res["a"], f"{source}_cells")
    resumed = global_stream(res["b" if world == 1 else "c"], f"{source}_cells")
    assert len(resumed) == RESUMED[world] * world * BATCH == 576 - seen
    np.testing.assert_array_equal(resumed, before[seen:])  # the same cells in the same order
    rest_of_epoch = resumed[: N_CELLS - seen]
    np.testing.assert_array_equal(np.sort(np.r_[before[:seen], rest_of_epoch]), np.arange(N_CELLS))
    fp_before = global_stream(res["a"], f"{source}_fp")
    np.testing.assert_array_equal(global_stream(res["b" if world == 1 else "c"], f"{source}_fp"), fp_before[seen:])


@pytest.mark.parametrize("source", ["h5ad", "latents"])
def test_inference_pass_covers_every_cell_once(runs, source):
    _, res = runs
    for tag, world in (("a", 2), ("b", 1), ("c", 3)):
        cells = np.concatenate([r[f"{source}_inference"] for r in res[tag]])
        np.testing.assert_array_equal(cells if source == "h5ad" else np.sort(cells), np.arange(N_CELLS))
        sizes = [len(r[f"{source}_inference"]) for r in res[tag]]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == N_CELLS
        assert all((r[f"{source}_inference_sizes"][:-1] == 40).all() for r in res[tag])


# ---------------------------------------------------------------------------------------------
# latent cache, single process (no process group)


def test_latent_cache_round_trip_and_atomicity(tmp_path):
    from scldm_scale.data.latent_cache import (
        LatentCacheSource,
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
    w = LatentCacheWriter(path, 0, N_TOKENS, D_LATENT, ["cell_type", "tissue"], run_id="r1", world_size=1,
                          part_cells=16)
    for lo in range(0, 50, 7):
        w.write(z[lo : lo + 7], labels[lo : lo + 7], cells[lo : lo + 7])
    with pytest.raises(ValueError, match="shape"):
        w.write(z[:2, :1], labels[:2], cells[:2])
    with pytest.raises(ScldmError, match="manifest.json.*encode"):
        LatentCacheSource(path, batch_size=8)  # not finalized: not readable yet
    w.close()
    assert [p["n_cells"] for p in w.parts] == [16, 16, 16, 2]
    with pytest.raises(ScldmError, match=r"written by another encode run \(run 'r1' on 1 ranks, expected run 'r1' on 2"):
        finalize_latent_cache(path, {}, world_size=2, run_id="r1")
    os.rename(path / "manifest_rank0.json", path / "manifest_rank0.json.kept")
    with pytest.raises(ScldmError, match="latent manifest of rank 0 of 1 is missing"):
        finalize_latent_cache(path, {}, world_size=1, run_id="r1")
    os.rename(path / "manifest_rank0.json.kept", path / "manifest_rank0.json")
    with pytest.raises(ScldmError, match="written by another encode run"):
        finalize_latent_cache(path, {}, world_size=1, run_id="r2")
    manifest = finalize_latent_cache(path, {"mean": np.full(D_LATENT, 0.5), "std": np.ones(D_LATENT)},
                                     world_size=1, run_id="r1")
    assert manifest["n_cells"] == 50 and manifest["label_attributes"] == ["cell_type", "tissue"]
    assert (manifest["run_id"], manifest["world_size"]) == ("r1", 1)
    assert not [f for f in os.listdir(path) if ".tmp-" in f]
    stats = read_latent_stats(path)
    np.testing.assert_array_equal(stats["mean"], np.full(D_LATENT, 0.5, dtype=np.float32))
    assert (stats["n_cells"], stats["n_tokens"], stats["d_latent"]) == (50, N_TOKENS, D_LATENT)

    from scldm_scale.data.source import Source

    ds = LatentCacheSource(path, batch_size=8, shuffle=False)
    assert isinstance(ds, Source) and ds.vocab is None
    assert (ds.n_cells, ds.n_tokens, ds.d_latent) == (50, N_TOKENS, D_LATENT)
    batches = list(ds.inference_batches(0, 1, 8))
    assert [len(b["cell_index_n"]) for b in batches] == [8] * 6 + [2]
    np.testing.assert_array_equal(np.concatenate([b["z_nmz"].numpy() for b in batches]), z)
    np.testing.assert_array_equal(np.concatenate([b["labels_na"].numpy() for b in batches]), labels)
    np.testing.assert_array_equal(np.concatenate([b["cell_index_n"].numpy() for b in batches]), cells)
    it = ds.batches()
    stream = np.concatenate([next(it)["cell_index_n"].numpy() for _ in range(7)])  # no shuffle: rows in order
    np.testing.assert_array_equal(stream, np.r_[cells, cells[:6]])
    # random access across part boundaries keeps the requested order
    ids = np.array([49, 3, 17, 16, 40, 0])
    np.testing.assert_array_equal(ds.gather(ids)["z_nmz"], z[ids])
    with pytest.raises(ScldmError, match="holds no counts"):
        ds.library_size_stats()


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssFile of /proc/self/status (Linux)")
def test_latent_cache_batches_do_not_grow_the_resident_set(tmp_path):
    """Random batches over a cache read rows without mapping its pages: the file-backed resident set of
    the process stays put (with memory maps it grew by about the cache size), and repeated, unordered
    ids across parts come back in the order asked for."""
    from scldm_scale.data.latent_cache import LatentCacheSource, LatentCacheWriter, finalize_latent_cache
    from scldm_scale.errors import ScldmError

    n, m, z = 40_000, 32, 16  # 80 MB of latents in 4 parts per rank
    path = tmp_path / "cache"
    for rank in range(2):
        with LatentCacheWriter(path, rank, m, z, ["cell_type"], run_id="big", world_size=2,
                               part_cells=5_000) as w:
            ids = np.arange(rank * n // 2, (rank + 1) * n // 2)
            w.write(np.broadcast_to(ids[:, None, None], (len(ids), m, z)).astype(np.float32),
                    (ids % 7)[:, None], ids)
    finalize_latent_cache(path, {"mean": np.zeros(m * z), "std": np.ones(m * z)}, world_size=2, run_id="big")
    source = LatentCacheSource(path, batch_size=256, seed=1)
    batches = source.batches()
    next(LatentCacheSource(path, batch_size=1, shuffle=False).batches())  # code paths loaded: one row read
    before = _rss_file_kb()
    for _ in range(300):  # ~77k random rows: about every page of the cache
        batch = next(batches)
        assert (batch["z_nmz"][:, -1, -1] == batch["cell_index_n"].float()).all()
    assert _rss_file_kb() - before < 16_384  # kB; with memory maps: about the cache's 80,000
    ids = np.array([39_999, 3, 3, 25_001, 0, 19_999, 20_000, 3])
    got = source.gather(ids)
    np.testing.assert_array_equal(got["cell_index_n"], ids)
    np.testing.assert_array_equal(got["z_nmz"][:, 0, 0], ids.astype(np.float32))
    np.testing.assert_array_equal(got["labels_na"][:, 0], ids % 7)
    part = path / source.parts[-1]["latents"]
    os.truncate(part, os.path.getsize(part) - 100)
    with pytest.raises(ScldmError, match="truncated; re-run `scldm-scale encode`"):
        LatentCacheSource(path, batch_size=8).gather(np.array([source.n_cells - 1]))


def test_latent_cache_writer_holds_at_most_one_part(tmp_path):
    """Parts are cut exactly and in order from batches of any size, and the writer's memory stays within
    one part (it held up to three: the batches, their concatenation and the rest of the previous one)."""
    import tracemalloc

    from scldm_scale.data.latent_cache import LatentCacheWriter

    m, z, part = 8, 8, 1000
    part_bytes = part * (m * z * 4 + 8 + 8)  # latents, one label, cell id
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 700, 40)
    batches = [(np.full((k, m, z), i, dtype=np.float32), np.full((k, 1), i), np.arange(k) + 1000 * i)
               for i, k in enumerate(sizes)]
    tracemalloc.start()
    try:
        with LatentCacheWriter(tmp_path, 0, m, z, ["cell_type"], run_id="mem", world_size=1, part_cells=part) as w:
            for batch in batches:
                w.write(*batch)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1.5 * part_bytes
    total = int(sizes.sum())
    assert [p["n_cells"] for p in w.parts] == [part] * (total // part) + [total % part]
    cells = np.concatenate([np.load(tmp_path / p["cell_index"]) for p in w.parts])
    np.testing.assert_array_equal(cells, np.concatenate([b[2] for b in batches]))
    z_all = np.concatenate([np.load(tmp_path / p["latents"]) for p in w.parts])
    np.testing.assert_array_equal(z_all[:, 0, 0], np.repeat(np.arange(len(sizes)), sizes))


def test_stale_manifests_of_an_earlier_run_with_more_ranks_are_never_merged(tmp_path):
    from scldm_scale.data.latent_cache import LatentCacheSource, LatentCacheWriter, finalize_latent_cache
    from scldm_scale.errors import ScldmError

    path = tmp_path / "cache"
    _write_latent_cache(path, 90, world=3, run_id="old")  # an earlier encode on 3 ranks
    assert LatentCacheSource(path, batch_size=8).n_cells == 90
    # a new encode on 2 ranks of 60 cells: only its own manifests and parts are merged
    manifest = _write_latent_cache(path, 60, world=2, run_id="new")
    assert manifest["n_cells"] == 60 and {p["rank"] for p in manifest["parts"]} == {0, 1}
    assert all("_new_" in p["latents"] for p in manifest["parts"])
    source = LatentCacheSource(path, batch_size=8)
    np.testing.assert_array_equal(np.sort(source.gather(np.arange(60))["cell_index_n"]), np.arange(60))
    left = sorted(os.listdir(path))
    assert "manifest_rank2.json" not in left and not [f for f in left if "_old_" in f]  # stale files removed
    # a new run whose rank 1 did not finish: rank 1's manifest is the earlier run's, so finalize refuses
    with LatentCacheWriter(path, 0, N_TOKENS, D_LATENT, ["cell_type"], run_id="crashed", world_size=2) as w:
        w.write(np.zeros((4, N_TOKENS, D_LATENT)), np.zeros((4, 1), dtype=np.int64), np.arange(4))
    with pytest.raises(ScldmError, match=r"manifest_rank1.json: written by another encode run \(run 'new' on 2"):
        finalize_latent_cache(path, {}, world_size=2, run_id="crashed")
    assert LatentCacheSource(path, batch_size=8).n_cells == 60  # the finalized cache is still the last good one


def test_in_process_resume_semantics(tmp_path):
    """Positions without a process group or workers."""
    from scldm_scale.data.latent_cache import LatentCacheSource
    from scldm_scale.errors import ScldmError

    path = str(tmp_path / "cache")
    _write_latent_cache(path, 100)
    ds = LatentCacheSource(path, batch_size=10, seed=1)
    it = ds.batches()
    full = [next(it)["cell_index_n"].numpy() for _ in range(13)]
    assert ds.state_dict() == {"epoch": 1, "cells_consumed": 30, "cells_per_epoch": 100, "batch_size": 10,
                               "world_size": 1}
    np.testing.assert_array_equal(np.sort(np.concatenate(full[:10])), np.arange(100))
    resumed = LatentCacheSource(path, batch_size=10, seed=1)
    resumed.load_state_dict({"epoch": 0, "cells_consumed": 40})
    it = resumed.batches()
    np.testing.assert_array_equal(np.concatenate([next(it)["cell_index_n"].numpy() for _ in range(9)]),
                                  np.concatenate(full[4:13]))
    # another batch size continues after the same cells
    other = LatentCacheSource(path, batch_size=7, seed=1)
    other.load_state_dict({"epoch": 0, "cells_consumed": 40, "batch_size": 10})
    np.testing.assert_array_equal(next(other.batches())["cell_index_n"].numpy(), np.concatenate(full[4:5])[:7])
    # positions of earlier versions (batches of a world size) continue after the same number of cells
    old = LatentCacheSource(path, batch_size=10, seed=1)
    old.load_state_dict({"epoch": 0, "batches_consumed": 2, "world_size": 2})
    assert old.state_dict()["cells_consumed"] == 40
    with pytest.raises(ScldmError, match="does not fit"):
        ds.load_state_dict({"epoch": 0, "cells_consumed": 101})
    with pytest.raises(ScldmError, match="lacks integer 'epoch'"):
        ds.load_state_dict({"position": 3})
    with pytest.raises(ScldmError, match="exceeds the 100 cells of an epoch"):
        next(LatentCacheSource(path, batch_size=200).batches())
