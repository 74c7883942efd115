"""Atomic output folders and files (scldm_scale.io)."""

import os

import pytest

from scldm_scale.io import atomic_dir, write_json_atomic


def _siblings(path):
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


def test_atomic_dir_replaces_an_existing_folder_only_when_the_block_succeeds(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp.name == f"out.tmp-{os.getpid()}" and not any(tmp.iterdir())
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # nothing visible changes before the end
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _siblings(out) == []  # no .tmp / .old left

    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert _siblings(out) == []


@pytest.mark.parametrize("existing", ["empty_dir", "file", "symlink", "absent"])
def test_atomic_dir_takes_the_place_of_any_entry(tmp_path, existing):
    out = tmp_path / "out"
    if existing == "empty_dir":
        out.mkdir()
    elif existing == "file":
        out.write_text("x")
    elif existing == "symlink":
        (tmp_path / "target").mkdir()
        out.symlink_to(tmp_path / "target")
    with atomic_dir(out) as tmp:
        write_json_atomic(tmp / "a.json", {"k": 1})
    assert out.is_dir() and not out.is_symlink()
    assert (out / "a.json").read_text().strip().replace(" ", "").replace("\n", "") == '{"k":1}'
    assert [n for n in _siblings(out) if n != "target"] == []
    if existing == "symlink":
        assert (tmp_path / "target").is_dir()  # the link is replaced, not what it pointed to
