"""Rank x worker sharding, epochs and elastic resume of the SOMA source and of a mixture of two SOMA
members (the whole experiment and a filtered view of it, weights 1 : 2; SOMA + h5ad mixtures are
tested in tests/unit/test_soma_source.py).

Setup: the tiny atlas's 450 training cells as a SOMA experiment (joinid == cell_index); batch 25,
chunk_size 15, shuffle_buffer 75 (lanes of 3 batches, super-buffers of 150 cells). Stage A:
2 ranks x 2 dataloader workers take 12 steps (600 stream cells, or 24 mixture draws) and save the
position after 3 steps; stage B resumes it on 1 rank (2 workers), stage C on 3 ranks (1 worker).
Ranks are forked (or spawned when the pytest process already holds TileDB state).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from soma_fixtures import tiny_soma  # noqa: F401

from _elastic import global_stream, load, saved_state, stage
from _spawn import run_distributed

pytestmark = pytest.mark.distributed

BATCH = 25
N_CELLS = 450
STEPS_A, SAVE_AT = 12, 3
RESUMED = {1: 18, 3: 6}  # steps after the resume: up to stream cell 600 (draw 24)
MIX_FILTER = "tissue in ['tissue_0', 'tissue_1']"


def _specs(uri, atlas):
    from scldm_scale.data.config import DataConfig, SourceKind, SourceSpec

    common = dict(batch_size=BATCH, chunk_size=15, shuffle_buffer=75, max_genes=24, seed=3)
    tables = {"vocab": os.path.join(atlas, "vocab.json"), "labels": os.path.join(atlas, "labels.json")}
    mixture = DataConfig(source=SourceKind.MIXTURE, sources=[
        SourceSpec(source=SourceKind.SOMA, path=uri, weight=1.0),
        SourceSpec(source=SourceKind.SOMA, path=uri, weight=2.0, value_filter=MIX_FILTER),
    ], **common)
    return {"soma": {"cfg": DataConfig(source=SourceKind.SOMA, path=uri, **common), **tables},
            "mixture": {"cfg": mixture, **tables}}


def _checked_stage(rank, world, uri, atlas, out, tag, plan):
    from _batches import check_tokens
    from _elastic import make_source

    specs = _specs(uri, atlas)
    if tag == "a":
        batch = next(make_source(specs["soma"]).batches(num_workers=1))
        check_tokens(atlas, batch)
        assert batch["labels_na"].shape == (BATCH, 3)
    stage(rank, world, specs, out, tag, plan)


@pytest.fixture(scope="module")
def runs(tiny_soma, tiny_atlas, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("soma_sharding")
    out = str(tmp / "out")
    os.makedirs(out)
    import scldm_scale.data.soma_source as soma_source

    # Fork the ranks (after importing the heavy modules once here) unless this pytest process
    # has read SOMA itself (e.g. unit tests ran first): TileDB is not fork-safe, spawn then.
    clean = soma_source._TILEDB_PID is None
    names = ("soma", "mixture")
    plans = {
        "a": (2, {n: {"steps": STEPS_A, "workers": 2, "save_at": SAVE_AT, "resume": False} for n in names}),
        "b": (1, {n: {"steps": RESUMED[1], "workers": 2, "save_at": 0, "resume": True} for n in names}),
        "c": (3, {n: {"steps": RESUMED[3], "workers": 1, "save_at": 0, "resume": True} for n in names}),
    }
    for tag, (world, plan) in plans.items():
        run_distributed(
            _checked_stage, tmp, world_size=world, args=(tiny_soma, str(tiny_atlas), out, tag, plan),
            preload=("anndata", "tiledbsoma", "scldm_scale.data.soma_source") if clean else (),
            start_method="fork" if clean else "spawn",
        )
    return out, {tag: load(out, tag, world) for tag, (world, _) in plans.items()}


def test_one_epoch_is_the_selection_exactly_once(runs):
    _, res = runs
    stream = global_stream(res["a"], "soma_cells")
    assert len(stream) == STEPS_A * 2 * BATCH == 600
    np.testing.assert_array_equal(np.sort(stream[:N_CELLS]), np.arange(N_CELLS))  # union == selection, once
    assert len(np.unique(stream[N_CELLS:])) == 150 and not np.array_equal(stream[N_CELLS:], stream[:150])
    ranks = [set(r["soma_cells"][:3].reshape(-1).tolist()) for r in res["a"]]
    assert not ranks[0] & ranks[1]


@pytest.mark.parametrize("name, seen", [("soma", SAVE_AT * 2 * BATCH), ("mixture", SAVE_AT * 2 * BATCH)])
@pytest.mark.parametrize("world", [1, 3])
def test_resume_on_another_number_of_ranks_yields_exactly_the_rest(runs, name, seen, world):
    out, res = runs
    state = saved_state(out, name, 2)
    assert (state["epoch"], state["cells_consumed"], state["batch_size"], state["world_size"]) == (0, seen, BATCH, 2)
    before = global_stream(res["a"], f"{name}_cells")
    tag = "b" if world == 1 else "c"
    resumed = global_stream(res[tag], f"{name}_cells")
    assert len(resumed) == RESUMED[world] * world * BATCH == 600 - seen
    np.testing.assert_array_equal(resumed, before[seen:])  # the same cells, in the same order
    np.testing.assert_array_equal(global_stream(res[tag], f"{name}_fp"), global_stream(res["a"], f"{name}_fp")[seen:])
    if name == "soma":
        np.testing.assert_array_equal(np.sort(np.r_[before[:seen], resumed[: N_CELLS - seen]]), np.arange(N_CELLS))


def test_mixture_members_stream_their_own_epochs_in_proportion(runs):
    from scldm_scale.data.mixture import split_counts

    _, res = runs
    rank0 = res["a"][0]
    choices = rank0["mixture_choices"]
    draws = global_stream(res["a"], "mixture_cells").reshape(-1, BATCH)  # 24 draws of 25 cells
    n_filtered = len(rank0["mixture_member1"]) // 3
    per_epoch = N_CELLS // BATCH + -(-n_filtered // BATCH)
    assert len(choices) == 3 * per_epoch
    assert np.bincount(choices[:per_epoch]).tolist() == split_counts(per_epoch, [1, 2]).tolist()
    for s in (0, 1):  # each member's draws are its own stream, in order
        mine = draws[choices[: len(draws)] == s].reshape(-1)
        np.testing.assert_array_equal(mine, rank0[f"mixture_member{s}"][: len(mine)])
    assert set(rank0["mixture_member1"].tolist()) < set(range(N_CELLS))  # the filtered member is a subset


@pytest.mark.parametrize("name", ["soma", "mixture"])
def test_inference_pass_covers_every_cell_once(runs, name):
    _, res = runs
    filtered = np.sort(res["a"][0]["mixture_member1"][: len(res["a"][0]["mixture_member1"]) // 3])
    want = np.arange(N_CELLS) if name == "soma" else np.sort(np.r_[np.arange(N_CELLS), filtered])
    for tag in ("a", "b", "c"):
        cells = np.concatenate([r[f"{name}_inference"] for r in res[tag]])
        np.testing.assert_array_equal(np.sort(cells), want)
        if name == "soma":
            np.testing.assert_array_equal(cells, want)  # in joinid order, ranks in order
