"""h5ad source: batches read from cellarium's cached shards equal cellarium's own AnnDataField batches;
the epoch order draws from ``shards_per_batch`` shards; the inference pass reads row ranges."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from scldm_scale.data.config import DataConfig

N_CELLS, SHARD = 450, 150  # the tiny atlas: 3 shards of 150 training cells


def _source(atlas, **kw):
    from scldm_scale.data.loader import build_source

    cfg = DataConfig(path=str(atlas), batch_size=40, max_genes=24, seed=5, label_columns=["cell_type", "tissue"])
    for key, value in kw.items():
        setattr(cfg, key, value)
    return build_source(cfg)


@pytest.fixture(scope="module")
def source(tiny_atlas):
    return _source(tiny_atlas)


def test_read_rows_matches_cellarium_batches(source):
    from cellarium.ml.data import IterableDistributedAnnDataCollectionDataset
    from cellarium.ml.utilities.data import AnnDataField

    keep = lambda x: x  # noqa: E731
    keys = {"x_ng": AnnDataField(attr="X", convert_fn=keep), "cell_index_n": AnnDataField(attr="obs", key="cell_index")}
    keys.update({f"obs/{a}": AnnDataField(attr="obs", key=a, convert_fn=keep) for a in source.label_columns})
    reference = IterableDistributedAnnDataCollectionDataset(source.dadc, batch_keys=keys, batch_size=40)
    order = source.epoch_positions(1, 0, N_CELLS)
    spans = 0
    for j in range(N_CELLS // 40):
        rows = order[j * 40 : (j + 1) * 40]
        x, labels_na, cell_index_n, shard_ids = source.read_rows(rows)
        spans += len(shard_ids) > 1
        want = reference[rows]  # cellarium: AnnData view + concat per batch
        assert (x != want["x_ng"]).nnz == 0 and x.dtype == want["x_ng"].dtype
        np.testing.assert_array_equal(cell_index_n, np.asarray(want["cell_index_n"]))
        for a, attr in enumerate(source.labels.attributes):
            expected = (source.labels.encode(attr, want[f"obs/{attr}"]) if attr in source.label_columns
                        else np.full(len(rows), source.labels.unknown_code(attr)))
            np.testing.assert_array_equal(labels_na[:, a], expected)
    assert spans > 0  # some batches straddle two shards (the reordering path is exercised)


@pytest.mark.parametrize("shards_per_batch", [1, 2, 3])
def test_epoch_order_draws_from_groups_of_shards(tiny_atlas, shards_per_batch):
    src = _source(tiny_atlas, shards_per_batch=shards_per_batch)
    assert src.dadc.max_cache_size == max(2, 2 * shards_per_batch)
    for epoch in (0, 1):
        order = src.epoch_positions(epoch, 0, N_CELLS)
        np.testing.assert_array_equal(np.sort(order), np.arange(N_CELLS))  # a permutation
        shard_n = order // SHARD
        shards, starts = src.shard_groups(epoch)
        for g in range(len(starts) - 1):  # each group of shards is one run of the order, mixed uniformly
            group = shard_n[starts[g] : starts[g + 1]]
            assert set(group.tolist()) == set(shards[g * shards_per_batch : (g + 1) * shards_per_batch].tolist())
            first_batch = group[:40]
            assert len(set(first_batch.tolist())) == min(shards_per_batch, len(set(group.tolist())))
        # random access equals slicing the whole order
        np.testing.assert_array_equal(src.epoch_positions(epoch, 123, 321), order[123:321])
    assert not np.array_equal(src.epoch_positions(0, 0, N_CELLS), src.epoch_positions(1, 0, N_CELLS))
    assert np.array_equal(_source(tiny_atlas, shuffle=False).epoch_positions(0, 0, N_CELLS), np.arange(N_CELLS))


def test_inference_pass_and_library_sizes(source, tiny_atlas):
    import anndata

    from scldm_scale.data.source import Source

    assert isinstance(source, Source) and source.vocab is not None and source.labels is not None

    x = anndata.concat([anndata.read_h5ad(tiny_atlas / f"shard_{i:04d}.h5ad") for i in range(3)]).X.tocsr()
    seen = []
    for rank in range(3):
        batches = list(source.inference_batches(rank, 3, 64))
        assert [len(b["cell_index_n"]) for b in batches] == [64, 64, 22]  # 150 cells per rank, last batch short
        seen += [b["cell_index_n"].numpy() for b in batches]
        for b in batches:  # library sizes are the cells' totals (max_genes only caps the tokens)
            np.testing.assert_array_equal(b["library_size_n"].numpy(),
                                          np.asarray(x[b["cell_index_n"].numpy()].sum(axis=1)).ravel())
    np.testing.assert_array_equal(np.concatenate(seen), np.arange(N_CELLS))  # every cell once, in row order
    mean, std = source.library_size_stats(max_cells=100)
    log_lib = np.log(np.asarray(x[:100].sum(axis=1)).ravel())
    assert mean == pytest.approx(log_lib.mean()) and std == pytest.approx(log_lib.std())


def test_cellarium_data_skips_the_training_stack_until_asked():
    """The h5ad source imports cellarium's data package without Lightning; ``cellarium.ml``'s own
    names (its ``__init__``) load on first use, and an already imported cellarium is left alone."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from scldm_scale.data.h5ad_source import cellarium_data\n"
        "data = cellarium_data()\n"
        "assert data.DistributedAnnDataCollection.__module__ == 'cellarium.ml.data.distributed_anndata'\n"
        "assert not any(m.split('.')[0] in ('lightning', 'pytorch_lightning') for m in sys.modules)\n"
        "import threading\n"
        "import cellarium.ml\n"
        "found = []\n"
        "threads = [threading.Thread(target=lambda: found.append(cellarium.ml.CellariumModule)) for _ in range(3)]\n"
        "[t.start() for t in threads]; [t.join() for t in threads]\n"
        "from cellarium.ml import CellariumModule\n"
        "assert found == [CellariumModule] * 3  # concurrent first lookups wait for the one run\n"
        "assert 'lightning' in sys.modules and cellarium.ml.data is data\n"
        "assert CellariumModule.__module__ == 'cellarium.ml.core.module' and '__getattr__' not in vars(cellarium.ml)\n"
        "assert cellarium_data() is data\n"
        "try:\n"
        "    cellarium.ml.no_such_name\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_deferred_package_init_runs_once_and_retries_after_a_failure(tmp_path, monkeypatch):
    import importlib.util

    from scldm_scale.data.h5ad_source import _deferred_package

    (tmp_path / "deferpkg" / "sub").mkdir(parents=True)
    (tmp_path / "deferpkg" / "__init__.py").write_text("")
    mark = tmp_path / "fail_once"
    mark.write_text("")
    (tmp_path / "deferpkg" / "sub" / "__init__.py").write_text(
        "import os\n"
        f"if os.path.exists({str(mark)!r}):\n"
        f"    os.remove({str(mark)!r})\n"
        "    raise RuntimeError('first run fails')\n"
        "RUNS = globals().get('RUNS', 0) + 1\n"
        "VALUE = 42\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    package = _deferred_package(importlib.util.find_spec("deferpkg.sub"))
    assert "VALUE" not in vars(package)  # nothing ran yet
    with pytest.raises(RuntimeError, match="first run fails"):
        package.VALUE
    assert package.VALUE == 42 and package.RUNS == 1  # tried again, then ran once
    assert package.VALUE == 42 and package.RUNS == 1 and "__getattr__" not in vars(package)
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        package.missing
    monkeypatch.delitem(sys.modules, "deferpkg", raising=False)
