"""benchmarks/gpu_check.py: the CPU smoke run end to end (the same stages as on a GPU, tiny, fp32),
and the refusal to run the GPU check without a GPU."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.cli_utils import REPO

pytestmark = pytest.mark.integration


def _run(*args: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_without_cuda_it_exits_2_with_one_line():
    proc = _run(timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA device") and "--cpu-smoke" in lines[0]


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_cpu_smoke_runs_every_stage_and_ends_with_the_json_line(tmp_path):
    out = tmp_path / "check"
    proc = _run("--cpu-smoke", "--out", str(out), timeout=900)
    assert proc.returncode == 0, f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is True and result["cpu_smoke"] is True and result["device"].startswith("cpu")
    for key in ("vae_cells_per_s", "vae_tokens_per_s", "mfu_vae", "vae_peak_mem_gib", "ldm_cells_per_s",
                "ldm_tokens_per_s", "mfu_dit", "ldm_peak_mem_gib", "generate_cells_per_s", "encode_cells_per_s",
                "wall_s", "vae_wall_s", "encode_wall_s", "ldm_wall_s", "generate_wall_s", "evaluate_wall_s",
                "eval_w2", "eval_mmd", "eval_fd"):
        assert _positive(result[key]), (key, result[key])
    assert result["mfu_vae"] < 1 and result["mfu_dit"] < 1
    assert result["generate_cells"] == 120
    assert 0.0 <= result["eval_nn1"] <= 1.0 and 0.0 <= result["eval_knn_acc_cell_type"] <= 1.0
    assert result["versions"]["torch"] == torch.__version__
    # what the JSON line says is what the runs wrote
    records = [json.loads(line) for line in (out / "check-vae" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 12 and result["vae_loss_last"] == pytest.approx(records[-1]["loss"])
    assert result["vae_cells_per_s"] == pytest.approx(sorted(r["cells_per_s"] for r in records[1:])[len(records[1:]) // 2])
    eval_json = json.loads((out / "eval.json").read_text())
    assert result["eval_w2"] == pytest.approx(eval_json["w2"]) and eval_json["n_gen"] == 120
    for stage in ("vae", "encode", "ldm", "generate", "evaluate"):
        assert (out / "logs" / f"{stage}.log").is_file()
    assert "generated in" in (out / "logs" / "generate.log").read_text()
    # the attention comparison: measured once the kernel override exists, else reported as unavailable
    from scldm_scale.nn import attention

    if hasattr(attention, "choose_kernel"):
        assert _positive(result["attention_speedup"]) and result["attention_outputs_match"] is True
        assert set(result["attention_sites"]) == {"dit_self", "vae_self", "vae_pool", "vae_unpool"}
    else:
        assert result["attention_speedup"] is None and "kernel" in result["attention_unavailable"]
    assert "fused vs SDPA" in proc.stdout or "attention speedup: unavailable" in proc.stdout


def test_a_failing_stage_is_named_in_the_json_line_and_stops_the_check(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    scale = dataclasses.replace(module.CPU_SMOKE, cells=100, vae_overrides=(*module.CPU_SMOKE.vae_overrides,
                                                                            "train.max_stepz=3"))
    result, stages = module.run_check(tmp_path, scale, smoke=True)
    assert result["ok"] is False and result["failed_stage"] == "vae" and result["error"].startswith("exit 2")
    assert [s.name for s in stages if s.wall_s > 0] == ["data", "vae"]
    assert result["vae_cells_per_s"] is None and result["generate_cells_per_s"] is None
    assert result["attention_speedup"] is None and "attention_sites" not in result
    log = (tmp_path / "logs" / "vae.log").read_text()
    assert "unknown config key 'train.max_stepz'" in log and "train.max_steps" in log
    assert "unknown config key" in capsys.readouterr().out  # the log's last lines are shown
