"""SOMA source (single process): selection, tokens, epoch order, errors, resume; mixtures; config schema.

Rank x worker sharding and resume on other numbers of ranks and workers are in
tests/distributed/test_elastic_sources.py. The tiny SOMA experiment holds the tiny atlas's 450
training cells with ``soma_joinid == cell_index``.
"""

from __future__ import annotations

import numpy as np
import pytest
from soma_fixtures import tiny_soma  # noqa: F401

from scldm_scale.data.config import DataConfig, SourceKind, SourceSpec
from scldm_scale.errors import ScldmError

FILTER = "cell_type == 'celltype_1' and tissue in ['tissue_0', 'tissue_2']"


@pytest.fixture(scope="module")
def vocab_labels(tiny_atlas):
    from scldm_scale.data.labels import LabelTables
    from scldm_scale.data.vocab import GeneVocab

    return GeneVocab.load(tiny_atlas / "vocab.json"), LabelTables.load(tiny_atlas / "labels.json")


@pytest.fixture(scope="module")
def atlas_obs_x(tiny_atlas):
    import anndata

    a = anndata.concat([anndata.read_h5ad(tiny_atlas / f"shard_{i:04d}.h5ad") for i in range(3)])
    return a.obs.reset_index(drop=True), a.X.tocsr()


def _cfg(uri, **kw) -> DataConfig:
    base = dict(source=SourceKind.SOMA, path=uri, batch_size=25, chunk_size=15, shuffle_buffer=75, max_genes=24, seed=3)
    base.update(kw)
    return DataConfig(**base)


def _dataset(cfg, vocab_labels):
    from scldm_scale.data.loader import build_source

    return build_source(cfg, *vocab_labels)


def _cells(batches) -> np.ndarray:
    return np.concatenate([b["cell_index_n"].numpy() for b in batches])


def _take(it, n_batches: int) -> list:
    return [next(it) for _ in range(n_batches)]


def test_value_filter_selects_exactly_the_matching_cells(tiny_soma, vocab_labels, atlas_obs_x):
    obs, _ = atlas_obs_x
    want = obs.loc[(obs.cell_type == "celltype_1") & obs.tissue.isin(["tissue_0", "tissue_2"]), "cell_index"]
    ds = _dataset(_cfg(tiny_soma, value_filter=FILTER, batch_size=5, chunk_size=4, shuffle_buffer=10), vocab_labels)
    np.testing.assert_array_equal(ds.joinids_n, np.sort(want.to_numpy()))
    n = len(want)
    assert ds.n_cells == n == ds.cells_per_epoch
    # one epoch in-process: the first n cells of the stream are the selection, each once
    cells = _cells(_take(ds.batches(), -(-n // 5)))
    np.testing.assert_array_equal(np.sort(cells[:n]), np.sort(want.to_numpy()))
    np.testing.assert_array_equal(cells[:n], ds.epoch_joinids(0))
    inference = _cells(b for r in range(2) for b in ds.inference_batches(r, 2, 4))
    np.testing.assert_array_equal(inference, np.sort(want.to_numpy()))  # joinid order, every cell once


def test_tokens_labels_and_ids_match_the_h5ad_cells(tiny_soma, vocab_labels, atlas_obs_x):
    obs, x = atlas_obs_x
    _, labels = vocab_labels
    ds = _dataset(_cfg(tiny_soma), vocab_labels)
    assert ds.n_cells == 450
    batch = next(ds.batches())
    assert set(batch) == {"gene_ids_ns", "counts_ns", "mask_ns", "library_size_n", "labels_na", "cell_index_n"}
    ids = batch["cell_index_n"].numpy()
    for i, cell in enumerate(ids):
        row, m = x[cell], batch["mask_ns"][i]
        got = dict(zip(batch["gene_ids_ns"][i][m].tolist(), batch["counts_ns"][i][m].tolist()))
        want = dict(zip(row.indices.tolist(), row.data.astype(float).tolist()))
        assert len(got) == min(len(want), 24) and all(want[g] == v for g, v in got.items())
        assert batch["library_size_n"][i].item() == pytest.approx(row.data.sum())
    for a, attr in enumerate(labels.attributes):
        np.testing.assert_array_equal(batch["labels_na"][:, a].numpy(), labels.encode(attr, obs[attr].iloc[ids]))
    mean, std = ds.library_size_stats(max_cells=100)
    log_lib = np.log(np.asarray(x[:100].sum(axis=1)).ravel())
    assert mean == pytest.approx(log_lib.mean()) and std == pytest.approx(log_lib.std())


def test_epoch_order_lanes_and_resume(tiny_soma, vocab_labels):
    ds = _dataset(_cfg(tiny_soma), vocab_labels)
    full = _take(ds.batches(), 18)  # 450 cells = one epoch of 18 batches
    assert ds.state_dict() == {"epoch": 1, "cells_consumed": 0, "cells_per_epoch": 450, "batch_size": 25,
                               "world_size": 1}
    order = ds.epoch_joinids(0)
    np.testing.assert_array_equal(_cells(full), order)
    np.testing.assert_array_equal(np.sort(order), np.arange(450))
    assert not np.array_equal(ds.epoch_joinids(1), order)
    # lanes: a batch mixes the chunks of one lane of a super-buffer (2 lanes x 75 cells of chunks of 15)
    for j in range(18):
        chunks = np.unique(order[j * 25 : (j + 1) * 25] // 15)
        assert 2 <= len(chunks) <= 7, chunks
    # random access equals slicing the epoch
    np.testing.assert_array_equal(ds.joinids_n[ds.epoch_positions(0, 110, 230)], order[110:230])
    # resume after 7 batches (175 cells), in a new source
    resumed = _dataset(_cfg(tiny_soma), vocab_labels)
    resumed.load_state_dict({"epoch": 0, "cells_consumed": 175, "cells_per_epoch": 450, "batch_size": 25})
    np.testing.assert_array_equal(_cells(_take(resumed.batches(), 11)), _cells(full[7:]))
    with pytest.raises(ScldmError, match="does not fit"):
        ds.load_state_dict({"epoch": 0, "cells_consumed": 451})
    with pytest.raises(ScldmError, match="data now has 450"):
        ds.load_state_dict({"epoch": 0, "cells_consumed": 5, "cells_per_epoch": 500})
    with pytest.raises(ScldmError, match="resume with data.batch_size=30"):  # lanes are made of batches
        ds.load_state_dict({"epoch": 0, "cells_consumed": 5, "cells_per_epoch": 450, "batch_size": 30})
    # no shuffle: the selection in joinid order
    plain = _dataset(_cfg(tiny_soma, shuffle=False), vocab_labels)
    np.testing.assert_array_equal(plain.epoch_joinids(0), np.arange(450))
    # the stream goes on into the next epoch without dropping cells: batch 18 opens epoch 1
    ds.load_state_dict({"epoch": 0, "cells_consumed": 425, "cells_per_epoch": 450, "batch_size": 25})
    it = ds.batches()
    np.testing.assert_array_equal(_cells(_take(it, 2)), np.r_[order[425:], ds.epoch_joinids(1)[:25]])
    assert ds.state_dict()["epoch"] == 1 and ds.state_dict()["cells_consumed"] == 25


def test_bad_inputs_name_the_problem(tiny_soma, vocab_labels, tmp_path, monkeypatch):
    from scldm_scale.data.labels import LabelTables

    missing = str(tmp_path / "no_such_experiment")
    with pytest.raises(ScldmError, match=f"{missing}: no TileDB-SOMA experiment at this URI \\(it does not exist\\)"):
        _dataset(_cfg(missing), vocab_labels)
    with pytest.raises(ScldmError, match="data.path is empty"):
        _dataset(_cfg(""), vocab_labels)
    with pytest.raises(ScldmError, match="measurement 'ATAC' not found .*'RNA'.*data.measurement"):
        _dataset(_cfg(tiny_soma, measurement="ATAC"), vocab_labels)
    with pytest.raises(ScldmError, match="X layer 'raw' not found .*'data'.*data.x_layer"):
        _dataset(_cfg(tiny_soma, x_layer="raw"), vocab_labels)
    with pytest.raises(ScldmError, match="data.value_filter=.*not a valid obs filter"):
        _dataset(_cfg(tiny_soma, value_filter="cell_type === 'x'"), vocab_labels)
    with pytest.raises(ScldmError, match="selects no cells"):
        _dataset(_cfg(tiny_soma, value_filter="cell_type == 'no_such_type'"), vocab_labels)
    with pytest.raises(ScldmError, match="var_id_column='symbol' is not a var column"):
        _dataset(_cfg(tiny_soma, var_id_column="symbol"), vocab_labels)
    with pytest.raises(ScldmError, match="none of the 200 var ids in column 'gene_symbol'"):
        _dataset(_cfg(tiny_soma, var_id_column="gene_symbol"), vocab_labels)
    vocab, labels = vocab_labels
    with_assay = LabelTables({**labels.categories, "assay": ["10x"]})
    with pytest.raises(ScldmError, match=r"obs has no column\(s\) \['assay'\]"):
        _dataset(_cfg(tiny_soma, label_columns=["cell_type", "assay"]), (vocab, with_assay))
    with pytest.raises(ScldmError, match="data.chunk_size=0: must be >= 1"):
        _dataset(_cfg(tiny_soma, chunk_size=0), vocab_labels)
    monkeypatch.setitem(__import__("sys").modules, "cellxgene_census", None)  # import fails
    with pytest.raises(ScldmError, match=r"cellxgene-census package is not installed.*scldm-scale\[census\]"):
        _dataset(_cfg("", census_version="2025-01-30"), vocab_labels)


def test_labels_not_in_label_columns_encode_unknown(tiny_soma, vocab_labels):
    _, labels = vocab_labels
    ds = _dataset(_cfg(tiny_soma, label_columns=["cell_type"]), vocab_labels)
    batch = next(ds.batches())
    for a, attr in enumerate(labels.attributes):
        if attr != "cell_type":
            assert (batch["labels_na"][:, a] == labels.unknown_code(attr)).all()


# ---------------------------------------------------------------------------------------------
# mixtures


def test_split_counts_and_member_configs(tiny_soma, tiny_atlas):
    from scldm_scale.data.mixture import member_configs, split_counts

    assert split_counts(10, [1, 1, 1]).tolist() == [4, 3, 3]
    assert split_counts(18, [1, 2]).tolist() == [6, 12]
    assert split_counts(7, [0.5, 0.25, 0.25]).sum() == 7
    parent = DataConfig(
        source=SourceKind.MIXTURE,
        batch_size=5,
        value_filter="tissue == 'tissue_0'",
        sources=[SourceSpec(source=SourceKind.SOMA, path=tiny_soma, weight=2), {"path": str(tiny_atlas)}],
    )
    (soma, w0), (h5ad, w1) = member_configs(parent)
    assert (soma.source, soma.path, soma.value_filter, soma.batch_size, w0) == (
        "soma", tiny_soma, "tissue == 'tissue_0'", 5, 2.0
    )
    assert (h5ad.source, h5ad.value_filter, h5ad.sources, w1) == ("h5ad", "", [], 1.0)
    for bad, msg in (
        ([], "needs data.sources"),
        ([SourceSpec(path=str(tiny_atlas), weight=0)], r"sources\[0\].weight=0"),
        ([SourceSpec(path=str(tiny_atlas), value_filter="a == 1")], "obs filters apply to soma sources only"),
        ([SourceSpec(source=SourceKind.LATENTS, path="x")], "must be h5ad or soma"),
        ([{"pathh": "x"}], r"sources\[0\]"),
    ):
        with pytest.raises(ScldmError, match=msg):
            member_configs(DataConfig(source=SourceKind.MIXTURE, sources=bad))


def test_mixture_draws_in_proportion_and_members_stream_continuously(tiny_soma, tiny_atlas, vocab_labels):
    from scldm_scale.data.loader import build_source

    # batch 45: 10 draws per epoch for each member (450 cells)
    cfg = _cfg(
        "",
        source=SourceKind.MIXTURE,
        batch_size=45,
        shuffle_buffer=90,
        sources=[
            SourceSpec(source=SourceKind.SOMA, path=tiny_soma, weight=3),
            SourceSpec(path=str(tiny_atlas), weight=1),
        ],
    )
    from scldm_scale.data.source import Source

    mix = build_source(cfg, *vocab_labels, validate=False)
    assert all(isinstance(s, Source) for s in (mix, *mix.sources))
    assert mix.member_draws.tolist() == [10, 10] and mix.draws_per_epoch == 20 and mix.cells_per_epoch == 900
    assert mix.counts.tolist() == [15, 5]
    for epoch in (0, 1):
        assert np.bincount(mix.choices(epoch)).tolist() == [15, 5]
    assert not np.array_equal(mix.choices(0), mix.choices(1))
    stream = _take(mix.batches(), 40)  # two mixture epochs
    choice = np.concatenate([mix.choices(0), mix.choices(1)])
    got = {s: [b for b, c in zip(stream, choice) if c == s] for s in (0, 1)}
    # SOMA drew 30 batches: its epochs 0, 1 and 2, in order
    soma, h5ad = mix.sources
    np.testing.assert_array_equal(_cells(got[0]), np.concatenate([soma.epoch_joinids(e) for e in range(3)]))
    # h5ad drew 10: its epoch 0, identical (cells and tokens) to the h5ad source's own stream
    own = _take(h5ad.batches(), 10)
    assert len(got[1]) == len(own) == 10
    for a, b in zip(got[1], own):
        for key in b:
            assert (a[key] == b[key]).all()
    state = mix.state_dict()
    assert (state["epoch"], state["cells_consumed"]) == (2, 0)
    assert state["sources"] == [{"epoch": 3, "cells_consumed": 0}, {"epoch": 1, "cells_consumed": 0}]
    assert mix.member_positions(24) == [{"epoch": 1, "cells_consumed": 45 * (5 + int((mix.choices(1)[:4] == 0).sum()))},
                                        {"epoch": 0, "cells_consumed": 45 * (5 + int((mix.choices(1)[:4] == 1).sum()))}]
    # resume in mixture epoch 1 after 6 draws, in a new source
    again = build_source(cfg, *vocab_labels, validate=False)
    again.load_state_dict({"epoch": 1, "cells_consumed": 6 * 45, "cells_per_epoch": 900, "batch_size": 45})
    np.testing.assert_array_equal(_cells(_take(again.batches(), 14)), _cells(stream[26:]))
    with pytest.raises(ScldmError, match="not a whole number of draws"):
        again.load_state_dict({"epoch": 1, "cells_consumed": 50, "cells_per_epoch": 900, "batch_size": 45})
    # the inference pass visits each member's cells once
    inference = list(mix.inference_batches(0, 1, 100))
    np.testing.assert_array_equal(_cells(inference), np.r_[np.arange(450), np.arange(450)])


def test_recipe_schema_accepts_soma_and_mixture_keys(tmp_path):
    from scldm_scale.config import load_config

    recipe = tmp_path / "mix.yaml"
    recipe.write_text(
        "data:\n  source: mixture\n  chunk_size: 64\n  sources:\n"
        "    - {source: soma, path: /data/exp, weight: 3, value_filter: \"tissue == 'blood'\"}\n"
        "    - {source: h5ad, path: /data/shards, weight: 1}\n"
    )
    cfg = load_config([recipe])
    assert cfg.data.source == SourceKind.MIXTURE and cfg.data.sources[0].source == SourceKind.SOMA
    assert cfg.data.sources[0].weight == 3.0 and cfg.data.x_layer == "data" and cfg.data.measurement == "RNA"
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  sources:\n    - {source: soma, pth: /x}\n")
    with pytest.raises(ScldmError, match="pth"):
        load_config([bad])
    cfg = load_config([], ["data.source=soma", "data.value_filter=tissue == 'x'", "data.census_version=2025-01-30"])
    assert cfg.data.value_filter == "tissue == 'x'" and cfg.data.census_version == "2025-01-30"


def test_vocab_and_labels_come_from_files_or_from_the_experiment(tiny_soma, tiny_atlas, tmp_path):
    from scldm_scale.data.labels import LabelTables
    from scldm_scale.data.loader import load_vocab_and_labels
    from scldm_scale.data.vocab import GeneVocab

    atlas_vocab = GeneVocab.load(tiny_atlas / "vocab.json")
    atlas_labels = LabelTables.load(tiny_atlas / "labels.json")
    # no files beside the experiment: var ids in joinid order, sorted values of the selected cells
    vocab, labels = load_vocab_and_labels(_cfg(tiny_soma, value_filter="tissue == 'tissue_0'"))
    assert vocab.gene_ids == atlas_vocab.gene_ids
    assert labels.attributes == ["cell_type", "tissue", "donor"]
    assert labels.categories["tissue"] == ["tissue_0", "unknown"]
    assert set(labels.categories["cell_type"]) <= set(atlas_labels.categories["cell_type"])
    # explicit paths win (each one separately)
    _, labels = load_vocab_and_labels(_cfg(tiny_soma, labels_path=str(tiny_atlas / "labels.json")))
    assert labels == atlas_labels
    # a mixture uses its first source's tables
    mix = _cfg("", source=SourceKind.MIXTURE, sources=[SourceSpec(path=str(tiny_atlas)), SourceSpec(
        source=SourceKind.SOMA, path=tiny_soma)])
    assert load_vocab_and_labels(mix) == (atlas_vocab, atlas_labels)
    with pytest.raises(ScldmError, match="var_id_column='symbol' is not a var column"):
        load_vocab_and_labels(_cfg(tiny_soma, var_id_column="symbol"))
