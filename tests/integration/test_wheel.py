"""The package as a user installs it: a wheel built with `python -m build`, installed into a fresh
virtual environment outside the repository, runs `scldm-scale demo` from an empty folder (the
recipes come from the package).

The fresh environment gets the project's dependencies from the test environment's site-packages
(a ``.pth`` line) instead of downloading them again: what is tested is the wheel itself (its
modules, package data, entry point), not the resolver.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.cli_utils import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _run(cmd, cwd, env=None, timeout=900):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def test_wheel_installs_outside_the_repository_and_runs_the_demo(tmp_path):
    # nothing of the repository on the path (pip would take an importable source tree for an install)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(REPO)], cwd=tmp_path,
         env=env)
    (wheel,) = dist.glob("scldm_scale-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "scldm_scale/recipes/quickstart.yaml" in names and "scldm_scale/api/model.py" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=env)
    py = venv / "bin" / "python"
    venv_site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          cwd=tmp_path, env=env).stdout.strip())
    (venv_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], cwd=tmp_path, env=env)

    user = tmp_path / "user"
    user.mkdir()
    env.update(WANDB_MODE="offline", OMP_NUM_THREADS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    where = _run([str(py), "-c", "import scldm_scale; print(scldm_scale.__file__)"], cwd=user, env=env).stdout
    assert where.strip().startswith(str(venv)), where  # the installed copy, not the repository
    listed = _run([str(venv / "bin" / "scldm-scale"), "recipes"], cwd=user, env=env).stdout
    assert "quickstart " in listed
    demo = _run([str(venv / "bin" / "scldm-scale"), "demo", "--out", "demo", "--cells", "600", "--genes", "80",
                 "--nproc", "1", "train.max_steps=12", "train.log_every=6", "train.ckpt_every=0",
                 "train.sample_every=0", "logging.progress=false"], cwd=user, env=env, timeout=1200)
    assert "demo finished" in demo.stdout
    assert (user / "demo" / "generated.h5ad").is_file() and (user / "demo" / "demo_results.json").is_file()
