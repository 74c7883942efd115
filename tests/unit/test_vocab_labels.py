"""Gene vocabulary and label tables."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scldm_scale.data.labels import UNKNOWN, LabelTables
from scldm_scale.data.vocab import GeneVocab
from scldm_scale.errors import ScldmError


def test_vocab_round_trip_and_index_map(tmp_path):
    vocab = GeneVocab(["g1", "g2", "g3"], version="v7")
    vocab.save(tmp_path / "vocab.json")
    loaded = GeneVocab.load(tmp_path / "vocab.json")
    assert loaded == vocab and loaded.gene_ids == ["g1", "g2", "g3"] and loaded.version == "v7"
    assert len(loaded) == 3
    idx = loaded.index_map(pd.Index(["g3", "gX", "g1", "g2", "gY"]))
    assert idx.dtype == np.int64
    np.testing.assert_array_equal(idx, [2, -1, 0, 1, -1])
    assert GeneVocab.from_var(np.array(["a", "b"])).gene_ids == ["a", "b"]
    assert [p.name for p in tmp_path.iterdir()] == ["vocab.json"]  # no temp file left


def test_vocab_keeps_gene_symbols(tmp_path):
    vocab = GeneVocab(["ENSG1", "ENSG2", "ENSG3"], symbols=["TP53", None, "CD4"])
    assert vocab.symbols == ["TP53", "", "CD4"]
    vocab.save(tmp_path / "vocab.json")
    assert json.loads((tmp_path / "vocab.json").read_text())["gene_symbols"] == ["TP53", "", "CD4"]
    assert GeneVocab.load(tmp_path / "vocab.json").symbols == ["TP53", "", "CD4"]
    plain = GeneVocab(["a", "b"])
    plain.save(tmp_path / "plain.json")
    assert plain.symbols is None and "gene_symbols" not in json.loads((tmp_path / "plain.json").read_text())
    assert GeneVocab(["a", "b"], symbols=[None, ""]).symbols is None  # no symbol known: none kept
    with pytest.raises(ScldmError, match="2 gene symbols for 3 gene ids"):
        GeneVocab(["a", "b", "c"], symbols=["x", "y"])


def test_vocab_errors(tmp_path):
    with pytest.raises(ScldmError, match="duplicate"):
        GeneVocab(["g1", "g2", "g1"])
    with pytest.raises(ScldmError, match="missing.json.*prepare"):
        GeneVocab.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ScldmError, match="bad.json"):
        GeneVocab.load(tmp_path / "bad.json")
    (tmp_path / "dup.json").write_text(json.dumps({"gene_ids": ["a", "a"]}))
    with pytest.raises(ScldmError, match="dup.json.*duplicate"):
        GeneVocab.load(tmp_path / "dup.json")


def test_labels_round_trip_encode_decode(tmp_path):
    tables = LabelTables({"cell_type": ["T", "B"], "tissue": ["blood", UNKNOWN, "lung"]})
    assert tables.attributes == ["cell_type", "tissue"]
    assert tables.cardinalities == [3, 3]  # unknown appended once, kept where given
    tables.save(tmp_path / "labels.json")
    loaded = LabelTables.load(tmp_path / "labels.json")
    assert loaded == tables
    codes = loaded.encode("cell_type", ["B", "T", "NK", None, np.nan])
    assert codes.dtype == np.int64
    unk = loaded.unknown_code("cell_type")
    np.testing.assert_array_equal(codes, [1, 0, unk, unk, unk])
    cat = pd.Series(pd.Categorical(["lung", "gut", None], categories=["gut", "lung"]))
    np.testing.assert_array_equal(loaded.encode("tissue", cat), [2, 1, 1])
    assert loaded.decode("cell_type", codes) == ["B", "T", UNKNOWN, UNKNOWN, UNKNOWN]
    with pytest.raises(ScldmError, match="out of range"):
        loaded.decode("cell_type", [5])


def test_code_of_lists_known_values():
    tables = LabelTables({"cell_type": ["T", "B"]})
    assert tables.code_of("cell_type", "B") == 1
    with pytest.raises(ScldmError) as err:
        tables.code_of("cell_type", "NK cell")
    msg = str(err.value)
    assert "'NK cell'" in msg and "T, B, unknown" in msg and "\n" not in msg
    with pytest.raises(ScldmError, match="known attributes"):
        tables.code_of("donor", "d1")


def test_from_obs_union_and_missing_column():
    a = pd.DataFrame({"ct": pd.Categorical(["x", "y"], categories=["y", "x"]), "d": ["d2", "d1"]})
    b = pd.DataFrame({"ct": pd.Categorical(["z"]), "d": ["d3"]})
    tables = LabelTables.from_obs([a, b], ["ct", "d"])
    assert tables.categories == {"ct": ["y", "x", "z", UNKNOWN], "d": ["d1", "d2", "d3", UNKNOWN]}
    with pytest.raises(ScldmError, match="'tissue' is missing"):
        LabelTables.from_obs([a], ["tissue"])


def test_load_vocab_and_labels_defaults_and_missing(tiny_atlas, tmp_path):
    from scldm_scale.data.config import DataConfig
    from scldm_scale.data.loader import load_vocab_and_labels

    for path in (str(tiny_atlas), str(tiny_atlas) + "/shard_{0000..0002}.h5ad", str(tiny_atlas) + "/*.h5ad"):
        vocab, labels = load_vocab_and_labels(DataConfig(path=path))
        assert len(vocab) == 200 and labels.attributes == ["cell_type", "tissue", "donor"]
    with pytest.raises(ScldmError, match="vocab.json.*scldm-scale prepare"):
        load_vocab_and_labels(DataConfig(path=str(tmp_path)))
    cfg = DataConfig(path=str(tmp_path), vocab_path=str(tiny_atlas) + "/vocab.json")
    with pytest.raises(ScldmError, match="labels.json.*data.labels_path"):
        load_vocab_and_labels(cfg)
