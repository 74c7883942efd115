"""The GPU check's wheelhouse checker (benchmarks/wheelhouse.py) on fake folders, and its wheel list."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("bench_wheelhouse", REPO / "benchmarks" / "wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


wh = _load()
PINS = [wh.Pin("deepspeed", "0.19.8", True), wh.Pin("POT", "0.9.6.post1", False), wh.Pin("pydantic_core", "2.50.5", False)]
GOOD = {
    "deepspeed-0.19.8-py3-none-any.whl": 2_000,
    "pot-0.9.6.post1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl": 1_500,
    "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl": 2_200,
    "scldm_scale-0.1.0-py3-none-any.whl": 170,
}


def _folder(tmp_path: Path, files: dict[str, int]) -> Path:
    folder = tmp_path / "wheelhouse"
    folder.mkdir(parents=True)
    for name, size in files.items():
        with open(folder / name, "wb") as fh:
            fh.truncate(size)  # sparse: the size is what the checker reads
    return folder


def test_complete_folder_passes(tmp_path):
    wheels, errors = wh.check_wheelhouse(_folder(tmp_path, GOOD), PINS)
    assert errors == []
    assert {w.name for w in wheels} == {"deepspeed", "pot", "pydantic-core", "scldm-scale"}
    assert sum(w.size for w in wheels) == sum(GOOD.values())


def test_total_over_the_limit_fails(tmp_path):
    files = {**GOOD, "deepspeed-0.19.8-py3-none-any.whl": 40 * 2**20,
             "pot-0.9.6.post1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl": 30 * 2**20}
    _, errors = wh.check_wheelhouse(_folder(tmp_path, files), PINS)
    assert len(errors) == 1 and "over the limit of 64 MiB" in errors[0]
    _, errors = wh.check_wheelhouse(_folder(tmp_path / "b", files), PINS, max_bytes=80 * 2**20)
    assert errors == []


def test_two_versions_of_one_package_fail(tmp_path):
    files = {**GOOD, "POT-0.9.7.post1-cp312-cp312-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl": 100}
    _, errors = wh.check_wheelhouse(_folder(tmp_path, files), PINS)
    assert any(e.startswith("pot: 2 wheels") for e in errors), errors


def test_missing_wrong_version_and_unlisted_wheels_fail(tmp_path):
    files = dict(GOOD)
    del files["deepspeed-0.19.8-py3-none-any.whl"]
    del files["scldm_scale-0.1.0-py3-none-any.whl"]
    files["pydantic_core-2.41.0-cp312-cp312-manylinux2014_x86_64.whl"] = files.pop(
        "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl")
    files["hjson-3.1.0-py3-none-any.whl"] = 50
    _, errors = wh.check_wheelhouse(_folder(tmp_path, files), PINS)
    assert "deepspeed==0.19.8: missing" in errors
    assert "pydantic_core: listed at 2.50.5, found 2.41.0" in errors
    assert any("scldm-scale: the project's wheel is missing" in e for e in errors)
    assert any(e.startswith("not in gpu_check_wheels.txt: hjson") for e in errors)


@pytest.mark.parametrize("name, ok", [
    ("a-1.0-py3-none-any.whl", True),
    ("a-1.0-py2.py3-none-any.whl", True),
    ("a-1.0-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", True),
    ("a-1.0-cp311-abi3-manylinux_2_28_x86_64.whl", True),  # stable ABI of an older CPython
    ("a-1.0-cp311-cp311-manylinux_2_28_x86_64.whl", False),  # another CPython
    ("a-1.0-cp313-abi3-manylinux_2_28_x86_64.whl", False),  # needs a newer CPython
    ("a-1.0-cp312-cp312-manylinux_2_34_x86_64.whl", False),  # newer glibc than 2.28
    ("a-1.0-cp312-cp312-manylinux_2_28_aarch64.whl", False),
    ("a-1.0-cp312-cp312-macosx_11_0_arm64.whl", False),
    ("a-1.0-py2-none-any.whl", False),
])
def test_installable_on_cpython312_manylinux_x86_64(name, ok):
    assert wh.installable(wh.parse_wheel(Path(name))) is ok


def test_a_wheel_for_another_platform_fails_the_check(tmp_path):
    files = {**GOOD}
    del files["pot-0.9.6.post1-cp312-cp312-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"]
    files["POT-0.9.6.post1-cp311-cp311-manylinux_2_24_x86_64.whl"] = 1_000
    _, errors = wh.check_wheelhouse(_folder(tmp_path, files), PINS)
    assert errors == ["POT-0.9.6.post1-cp311-cp311-manylinux_2_24_x86_64.whl: does not install on CPython 3.12 "
                      "manylinux x86_64 (glibc <= 2.28)"]


def test_wheel_list_parses_with_one_version_each(tmp_path):
    pins = wh.read_pins()
    assert len({p.key for p in pins}) == len(pins) > 20
    assert [p.name for p in pins if p.build] == ["deepspeed"]
    by_key = {p.key: p.version for p in pins}
    assert {"omegaconf", "anndata", "cellarium-ml", "scanpy", "scikit-misc", "pot", "hjson", "pydantic"} <= set(by_key)
    twice = tmp_path / "list.txt"
    twice.write_text("hjson==3.1.0\nHJSON==3.0.0\n")
    with pytest.raises(ValueError, match="listed twice"):
        wh.read_pins(twice)
    loose = tmp_path / "loose.txt"
    loose.write_text("hjson>=3\n")
    with pytest.raises(ValueError, match="expected name==version"):
        wh.read_pins(loose)
