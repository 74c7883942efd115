"""benchmarks/atlas.py: its measuring, its stage cache and its smallest configuration end to end."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("bench_atlas", REPO / "benchmarks" / "atlas.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


ALLOCATE = """
import subprocess, sys, time
block = bytearray({mb} << 20)
for i in range(0, len(block), 4096):
    block[i] = 1
if {child}:
    subprocess.run([sys.executable, "-c", {grandchild!r}], check=True)
time.sleep(0.5)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/<pid>/status (Linux)")
def test_peak_rss_of_every_process_of_the_tree(tmp_path):
    bench = load_benchmark()
    grandchild = ALLOCATE.format(mb=150, child=False, grandchild="")
    cmd = [sys.executable, "-c", ALLOCATE.format(mb=300, child=True, grandchild=grandchild)]
    res = bench.run_measured(cmd, tmp_path / "logs" / "alloc.log", dict(os.environ))
    procs = res["processes"]
    assert [p["role"] for p in procs] == ["main", "child"]
    assert 300 <= procs[0]["peak_rss_mb"] < 450 and 150 <= procs[1]["peak_rss_mb"] < 300
    assert procs[0]["peak_anon_mb"] >= 300
    assert res["peak_rss_mb"] == res["rank_peak_rss_mb"] == procs[0]["peak_rss_mb"]
    assert res["wall_s"] > 0 and res["load_avg"] >= 0
    with pytest.raises(SystemExit, match="stage failed \\(exit 3\\)"):
        bench.run_measured([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "logs" / "fail.log",
                           dict(os.environ))


def _fake_command(stage, s, p):
    """A stand-in for a stage's command: records that it ran and writes what the stage leaves behind."""
    marker = p.done_marker(stage)
    lines = ["import json, pathlib", f"root = pathlib.Path({str(p.root)!r})",
             f"open(root / 'ran.txt', 'a').write({stage + chr(10)!r})"]
    record = {"cells_read": 64} if stage == "mixing" else {"n_cells": s.cells}  # mixing.json, manifest.json
    lines += [f"m = pathlib.Path({str(marker)!r})", "m.parent.mkdir(parents=True, exist_ok=True)",
              f"m.write_text(json.dumps({record!r}))"]
    return [sys.executable, "-c", "\n".join(lines)]


def test_finished_stages_are_reused_and_what_depends_on_a_rerun_runs_again(tmp_path, monkeypatch, capsys):
    bench = load_benchmark()
    monkeypatch.setattr(bench, "stage_command", _fake_command)
    ran_file = tmp_path / "cells_500" / "ran.txt"

    def run(**changes):
        ran_file.unlink(missing_ok=True)
        records = bench.run_size(bench.Settings(cells=500, **changes), tmp_path, dict(os.environ))
        ran = ran_file.read_text().split() if ran_file.exists() else []
        return records, ran

    records, ran = run()
    assert ran == list(bench.STAGES)
    assert records["encode"]["cells"] == 500 and records["mixing"]["cells"] == 64
    assert records["train_vae"]["cells"] == 200 * 64 * 2  # steps x cells per rank x ranks
    assert run()[1] == []  # everything reused
    assert "train_dit: reused" in capsys.readouterr().err
    assert run(dit_steps=7)[1] == ["train_dit"]  # a DiT setting: only the DiT
    assert run(dit_steps=7, encode_batch=64)[1] == ["encode", "train_dit"]
    (tmp_path / "cells_500" / "shards" / "metadata.json").unlink()  # outputs of prepare h5ad gone
    assert run(dit_steps=7, encode_batch=64)[1] == ["prepare_h5ad", "mixing", "encode", "train_dit"]
    assert "prepare_h5ad (outputs missing)" in capsys.readouterr().err
    assert run(dit_steps=7, encode_batch=64, vae_env={})[1] == ["train_vae", "encode", "train_dit"]


def test_summary_line_and_rss_growth():
    bench = load_benchmark()

    def rec(rss, cells=1000, wall=10.0):
        return {"peak_rss_mb": rss, "cells": cells, "cells_per_s": cells / wall, "wall_s": wall, "disk_bytes": 1 << 20,
                "load_avg": 2.0, "processes": [{"role": "main", "peak_rss_mb": rss, "peak_anon_mb": rss}]}

    ref = {st: rec(1000.0) for st in bench.STAGES}
    main = {st: rec(1000.0) for st in bench.STAGES}
    main["studies"] = rec(5000.0)  # holds a whole input: not part of rss_growth
    main["encode"] = rec(1100.0)
    main["train_dit"] = rec(1050.0)
    main["mixing"].update(study_mixing_soma=0.99, study_mixing_h5ad=0.98, study_mixing_input_order=0.01)
    out = bench.summary(bench.Settings(cells=10_000), main, ref, 1000)
    assert out["cells"] == 10_000 and out["ref_cells"] == 1000
    assert out["study_mixing"] == 0.99 and out["study_mixing_input_order"] == 0.01
    assert math.isclose(out["rss_growth"], 0.1) and math.isclose(out["studies_rss_growth"], 4.0)
    for st in bench.STAGES:
        assert out[f"{st}_cells_per_s"] == 100.0 and f"{st}_peak_rss_mb" in out
    json.dumps(out)
    assert bench.summary(bench.Settings(cells=10_000), main, None, 0)["rss_growth"] is None
    table = bench.format_growth_table(10_000, 1000, main, ref, bench.rss_growth(main, ref),
                                      {"soma": 65_536, "h5ad": 20_000})
    assert "+10.0%" in table and "fewer cells than the sources' buffers" in table


@pytest.mark.slow
@pytest.mark.integration
def test_smallest_configuration_end_to_end(tmp_path):
    """The whole benchmark on 2,000 cells x 300 genes (2 ranks, a few steps), then a re-run that reuses it."""
    cmd = [sys.executable, "benchmarks/atlas.py", "--cells", "2000", "--ref-cells", "0", "--genes", "300",
           "--shard-size", "500", "--vae-steps", "2", "--vae-batch", "16", "--dit-steps", "2", "--dit-batch", "32",
           "--encode-batch", "128", "--mixing-batches", "8", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["cells"] == 2000 and result["studies"] == 8 and result["rss_growth"] is None
    for st in ("studies", "prepare_h5ad", "prepare_soma", "train_vae", "encode", "train_dit"):
        assert result[f"{st}_cells_per_s"] > 0 and result[f"{st}_peak_rss_mb"] > 50, st
    assert result["study_mixing"] > 0.7 and result["study_mixing_h5ad"] > 0.7  # prepared: every batch mixes
    assert result["study_mixing_input_order"] < 0.3  # the studies one after another
    stages = json.loads((tmp_path / "results_2000.json").read_text())["stages"]["2000"]
    assert stages["encode"]["cells"] == 2000
    assert {p["role"] for p in stages["train_vae"]["processes"]} >= {"launcher", "rank 0", "rank 1"}
    assert "train VAE (SOMA)" in proc.stdout and "study mixing (2,000 cells" in proc.stdout

    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stderr.count(": reused (") == len(stages) == 7
    assert json.loads(again.stdout.strip().splitlines()[-1]) == result
