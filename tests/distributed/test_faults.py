"""Fault tolerance of the trainer under torchrun (2 gloo ranks, DeepSpeed ZeRO-2 on CPU).

- SIGTERM to every worker (what SLURM does before a preemption): checkpoint, exit 0, no export;
  ``run.resume=true`` continues from that step.
- SIGKILL of one worker under ``torchrun --max-restarts=1``: the restarted worker group resumes from
  ``checkpoints/latest`` and finishes at the same final step; the restarted group forms its process
  group again (``test_restarted_worker_group_rejoins``).
- A rank killed while a checkpoint is being written: the previous checkpoint is still ``latest``,
  complete and loadable.
- W&B: an offline run records the logged metrics (checked on the SIGTERM test's launches, which run
  with W&B offline); an unreachable W&B server, or a W&B whose ``log`` raises, never stops training
  and metrics.jsonl keeps every step.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from tests.cli_utils import REPO, TINY_VAE, cli, read_metrics

pytestmark = pytest.mark.distributed

# `vae_preset=` (empty) is parsed by OmegaConf's dotlist as None, which the str field rejects
# ("Incompatible value 'None' for field of type 'str'"); `vae_preset=''` is the empty string.
TINY = [("vae_preset=''" if a == "vae_preset=" else a) for a in TINY_VAE]
WORLD = 2
TIMEOUT = 240  # per launch; a launch normally takes 20-40 s on a shared 2-core machine


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}


def _common(tiny_atlas: Path, out: Path, *extra: str) -> list[str]:
    return [*TINY, f"data.path={tiny_atlas}", f"run.output_dir={out}", "run.name=run", *extra]


def _torchrun(*args: str, max_restarts: int | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    if max_restarts is not None:
        cmd.append(f"--max-restarts={max_restarts}")
    return [*cmd, *args]


def _popen(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    with open(log, "w") as fh:  # a file, not a pipe: nothing can block on a full pipe while we poll
        return subprocess.Popen(cmd, cwd=REPO, env=env or _env(), stdout=fh, stderr=subprocess.STDOUT)


def _finish(proc: subprocess.Popen, log: Path, timeout: int = TIMEOUT) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        raise AssertionError(f"launcher still running after {timeout} s\n{log.read_text()[-6000:]}") from None
    return rc, log.read_text()


def _kill_tree(proc: subprocess.Popen) -> None:
    """Clean-up after a failed test: SIGKILL the launcher and its workers (only those we started)."""
    for pid in _workers(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()


def _children(pid: int) -> list[int]:
    try:
        import psutil

        return [c.pid for c in psutil.Process(pid).children(recursive=False)]
    except ImportError:
        kids: list[int] = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                kids += [int(p) for p in (task / "children").read_text().split()]
            except OSError:
                pass
        return kids
    except Exception:  # noqa: BLE001 - the launcher is gone
        return []


def _workers(launcher_pid: int) -> dict[int, int]:
    """{pid: RANK} of the worker processes torchrun started (its direct children that have a RANK)."""
    out: dict[int, int] = {}
    for pid in _children(launcher_pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        rank = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
        if rank:
            out[pid] = int(rank[0])
    return out


def _wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited ({proc.returncode}) before {what}\n{log.read_text()[-6000:]}")
        time.sleep(0.05)
    _kill_tree(proc)
    raise AssertionError(f"timed out waiting for {what}\n{log.read_text()[-6000:]}")


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):  # a line being written
            pass
    return steps


def _latest(run: Path) -> str | None:
    try:
        return (run / "checkpoints" / "latest").read_text().strip() or None
    except OSError:
        return None


def _assert_complete_checkpoint(run: Path, step: int) -> None:
    """``latest`` names ``step``; the folder holds every rank's DeepSpeed shard and client state."""
    root = run / "checkpoints"
    tag = f"step{step:08d}"
    assert _latest(run) == tag
    folder = root / tag
    assert folder.is_dir()
    assert (folder / "mp_rank_00_model_states.pt").is_file()
    for rank in range(WORLD):
        assert (folder / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file(), rank
        client = torch.load(folder / f"client_rank{rank}.pt", map_location="cpu", weights_only=True)
        assert client["step"] == step and client["world_size"] == WORLD
    assert not list(folder.glob(".*.tmp"))


def _finite_losses(records: list[dict]) -> bool:
    return all(isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in records)


# -------------------------------------------------------------------------------------------------
# SIGTERM (preemption)
# -------------------------------------------------------------------------------------------------


def test_sigterm_checkpoints_and_exits_0_then_resumes(tiny_atlas, tmp_path):
    """Also the W&B offline test (one launch fewer): both launches log to an offline W&B run."""
    run = tmp_path / "run"
    log = tmp_path / "launch.log"
    args = _common(tiny_atlas, tmp_path, "train.ckpt_every=0", "logging.wandb=true", "logging.wandb_mode=offline")
    proc = _popen(_torchrun("-m", "scldm_scale.cli", "train", *args, "train.max_steps=10000"), log)
    try:
        _wait_for(lambda: len(_logged_steps(run)) >= 3, proc, log, "3 logged steps")
        workers = _workers(proc.pid)
        assert sorted(workers.values()) == list(range(WORLD)), workers
        for pid in workers:  # SLURM signals every task of the step
            os.kill(pid, signal.SIGTERM)
        rc, out = _finish(proc, log, timeout=120)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert rc == 0, out[-6000:]
    step = int(_latest(run).removeprefix("step"))
    assert step >= 3
    _assert_complete_checkpoint(run, step)
    assert f"SIGTERM: checkpoint saved at step {step}" in out
    assert not (run / "export").exists()
    assert _logged_steps(run) == list(range(1, step + 1))

    proc2 = cli("train", *args, "run.resume=true", f"train.max_steps={step + 2}", nproc=WORLD)
    assert f"continuing from step {step}" in proc2.stdout
    records = read_metrics(run)
    assert [r["step"] for r in records] == list(range(1, step + 3))
    assert _finite_losses(records)
    assert (run / "export" / "model.safetensors").is_file()
    _assert_complete_checkpoint(run, step + 2)
    # the preempted launch closed its W&B run cleanly; the resumed launch made a second one
    _assert_wandb_offline_runs(run, [list(range(1, step + 1)), [step + 1, step + 2]])


# -------------------------------------------------------------------------------------------------
# SIGKILL of one worker, torchrun restarts the worker group
# -------------------------------------------------------------------------------------------------

# torch 2.13's torchrun (c10d rendezvous, --standalone) shares its TCPStore with the workers and keeps it
# across restarts; the restarted group's gloo connectFullMesh can read the peer address the previous
# attempt left there ("Gloo connectFullMesh failed ... Connection refused", ~1 run in 2). Until
# scldm_scale.train.engine.init_distributed namespaces the store per TORCHELASTIC_RESTART_COUNT
# (see test_restarted_worker_group_rejoins below), this test gives the workers their own store.


def test_sigkill_one_rank_restart_resumes_from_latest(tiny_atlas, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "launch.log"
    args = _common(tiny_atlas, tmp_path, "train.ckpt_every=3", "train.max_steps=9")
    proc = _popen(_torchrun("-m", "scldm_scale.cli", "train", *args, max_restarts=1), log, env=_env())
    try:
        at_kill = _wait_for(lambda: _latest(run) in ("step00000003", "step00000006") and _latest(run), proc, log,
                            "the checkpoint of step 3 or 6")
        workers = {rank: pid for pid, rank in _workers(proc.pid).items()}
        assert sorted(workers) == list(range(WORLD)), workers
        assert not (run / "export").exists(), "the run finished before the kill: nothing was tested"
        os.kill(workers[1], signal.SIGKILL)
        rc, out = _finish(proc, log)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert rc == 0, out[-6000:]
    resumed = [int(s) for s in re.findall(r"continuing from step (\d+)", out)]
    assert len(resumed) == 1, out[-6000:]  # exactly one restart, which resumed
    resumed_at = resumed[0]
    assert resumed_at in (3, 6) and resumed_at >= int(at_kill.removeprefix("step")), (at_kill, resumed_at)

    records = read_metrics(run)
    assert records[-1]["step"] == 9
    assert {r["step"] for r in records} == set(range(1, 10))
    # the restarted group re-runs the steps after the checkpoint; its records are the file's tail
    tail = records[-(9 - resumed_at):]
    assert [r["step"] for r in tail] == list(range(resumed_at + 1, 10))
    assert _finite_losses(tail)
    assert (run / "export" / "model.safetensors").is_file()
    _assert_complete_checkpoint(run, 9)


REJOIN = textwrap.dedent('''
    """Attempt 0: rank 1 dies after joining. Attempt 1 (torchrun restart): rank 0 joins first."""
    import os
    import signal
    import time

    import torch
    import torch.distributed as dist

    from scldm_scale.comm import destroy as destroy_distributed
    from scldm_scale.train.engine import init_distributed

    attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
    if attempt > 0 and rank == 1:
        time.sleep(3)  # rank 0 must wait for this rank's new address, not use the one of attempt 0
    init_distributed()
    value = torch.ones(1)
    dist.all_reduce(value)
    if attempt == 0:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        dist.all_reduce(value)  # rank 0 fails here: its peer is gone
    print(f"attempt {attempt} rank {rank} joined: {value.item()}", flush=True)
    destroy_distributed()  # a clean exit: gloo's threads must not outlive the interpreter
''')


def test_restarted_worker_group_rejoins(tmp_path):
    log = tmp_path / "launch.log"
    script = tmp_path / "rejoin.py"
    script.write_text(REJOIN)
    rc, out = _finish(_popen(_torchrun(str(script), max_restarts=1), log), log, timeout=180)
    assert "connectFullMesh failed" not in out, out[-3000:]
    assert rc == 0, out[-3000:]
    assert sorted(re.findall(r"attempt 1 rank (\d) joined: 2.0", out)) == ["0", "1"], out[-3000:]


# -------------------------------------------------------------------------------------------------
# a rank dies while a checkpoint is being written
# -------------------------------------------------------------------------------------------------

KILL_MID_WRITE = textwrap.dedent('''
    """Rank 1 dies (SIGKILL) during the second checkpoint: after DeepSpeed wrote its shards into
    `<tag>.partial`, before its client state, the barrier and rank 0's rename."""
    import os
    import signal
    import sys
    from pathlib import Path

    import torch.distributed as dist

    import scldm_scale.train.checkpoint as C
    import scldm_scale.train.trainer as T

    original = T.save_checkpoint
    calls = [0]


    def save_checkpoint(engine, root, step, client, keep_last):
        calls[0] += 1
        if calls[0] == 2 and dist.get_rank() == 1:
            # the first lines of checkpoint.save_checkpoint as a rank other than 0 runs them
            partial = f"{C._tag(step)}.partial"
            dist.barrier()
            engine.save_checkpoint(str(root), tag=partial, client_state={}, save_latest=False)
            files = sorted(p.name for p in (Path(root) / partial).iterdir())
            Path(os.environ["KILL_MARKER"]).write_text("\\n".join([partial, *files]))
            os.kill(os.getpid(), signal.SIGKILL)
        return original(engine, root, step, client, keep_last)


    T.save_checkpoint = save_checkpoint

    from scldm_scale.cli import main

    main(sys.argv[1:])
''')


def test_rank_killed_mid_checkpoint_previous_checkpoint_loads(tiny_atlas, tmp_path):
    run = tmp_path / "run"
    log = tmp_path / "launch.log"
    script = tmp_path / "kill_mid_write.py"
    script.write_text(KILL_MID_WRITE)
    marker = tmp_path / "killed.txt"
    args = _common(tiny_atlas, tmp_path, "train.ckpt_every=3", "train.max_steps=9", "train.ema_decay=0.9")
    proc = _popen(_torchrun(str(script), "train", *args, max_restarts=0), log, env=_env(KILL_MARKER=str(marker)))
    try:
        rc, out = _finish(proc, log)
    finally:
        if proc.poll() is None:
            _kill_tree(proc)
    assert rc != 0, out[-6000:]
    written = marker.read_text().split("\n")  # rank 1 really died inside the save of step 6
    assert written[0] == "step00000006.partial"
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in written[1:]
    assert "client_rank1.pt" not in written[1:]

    root = run / "checkpoints"
    _assert_complete_checkpoint(run, 3)
    assert not (root / "step00000006").exists()
    assert not (run / "export").exists()

    proc2 = cli("train", *args, "run.resume=true", nproc=WORLD)
    assert "continuing from step 3" in proc2.stdout
    records = read_metrics(run)
    assert records[-1]["step"] == 9
    tail = records[-6:]
    assert [r["step"] for r in tail] == list(range(4, 10)) and _finite_losses(tail)
    assert not list(root.glob("*.partial"))  # the stale partial folder was cleaned by the next save
    assert (run / "export" / "model.safetensors").is_file() and (run / "export" / "ema.safetensors").is_file()
    _assert_complete_checkpoint(run, 9)


# -------------------------------------------------------------------------------------------------
# W&B
# -------------------------------------------------------------------------------------------------


def _wandb_records(path: Path) -> list:
    """Records of a W&B transaction log (``run-<id>.wandb``): a 7-byte header, then LevelDB-style
    32 KiB blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    records = []
    for raw in out:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def _assert_wandb_offline_runs(run: Path, expected: list[list[int]]) -> None:
    """``<run>/wandb`` holds one offline W&B run per launch (rank 0 only), in order, whose history has
    exactly the ``expected`` steps of that launch with the metrics of metrics.jsonl."""
    jsonl = {r["step"]: r for r in read_metrics(run)}
    offline = sorted((run / "wandb").glob("offline-run-*"))
    assert len(offline) == len(expected), [p.name for p in (run / "wandb").iterdir()]
    for folder, steps in zip(offline, expected):
        (log_file,) = folder.glob("run-*.wandb")
        history = {}
        for record in _wandb_records(log_file):
            if record.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                history[int(items["_step"])] = items
        assert sorted(history) == steps, folder
        for step, items in history.items():
            for key in ("loss", "recon", "cells_per_s", "lr", "grad_norm"):
                assert key in items, (folder, step, key)
            assert items["loss"] == pytest.approx(jsonl[step]["loss"], rel=1e-6)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # free once closed: connections are refused


FAILING_WANDB = textwrap.dedent('''
    """A W&B whose init works and whose log raises (the server goes away mid-run)."""
    import os


    class Run:
        id = "stub0001"

        def log(self, metrics, step=None):
            with open(os.environ["WANDB_STUB_CALLS"], "a") as fh:
                fh.write(f"log {step}\\n")
            raise ConnectionError("stub: W&B server unreachable")

        def finish(self):
            pass


    def init(**kwargs):
        with open(os.environ["WANDB_STUB_CALLS"], "a") as fh:
            fh.write("init\\n")
        return Run()
''')


def test_failing_wandb_does_not_stop_training(tiny_atlas, tmp_path):
    """Two runs side by side (W&B lives on rank 0 only, so one process each is enough):
    the real client, online, against a W&B server nobody listens on (init raises CommError), and a W&B
    whose init works and whose log raises (the server goes away mid-run)."""
    unreachable, stub = tmp_path / "unreachable", tmp_path / "stub"
    (stub / "wandb").mkdir(parents=True)
    (stub / "wandb" / "__init__.py").write_text(FAILING_WANDB)
    calls = stub / "calls.txt"
    launches = {
        unreachable: ("online", {"WANDB_MODE": "online", "WANDB_BASE_URL": f"http://127.0.0.1:{_closed_port()}",
                                 "WANDB_API_KEY": "x" * 40, "WANDB_INIT_TIMEOUT": "3",
                                 "WANDB_DIR": str(unreachable)}),
        stub: ("offline", {"PYTHONPATH": f"{stub}{os.pathsep}{REPO}", "WANDB_STUB_CALLS": str(calls)}),
    }
    procs = {}
    for out, (mode, env) in launches.items():
        out.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "scldm_scale.cli", "train",
               *_common(tiny_atlas, out, "train.ckpt_every=0", "train.max_steps=4", "logging.wandb=true",
                        f"logging.wandb_mode={mode}")]
        procs[out] = _popen(cmd, out / "launch.log", env=_env(**env))
    results = {}
    try:
        for out, proc in procs.items():
            results[out] = _finish(proc, out / "launch.log", timeout=180)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                _kill_tree(proc)
    for out, (rc, log) in results.items():
        assert rc == 0, log[-6000:]
        assert log.count("warning: W&B disabled") == 1, log[-6000:]  # reported once
        assert "metrics are still in metrics.jsonl" in log
        records = read_metrics(out / "run")
        assert [r["step"] for r in records] == [1, 2, 3, 4] and _finite_losses(records)
        assert (out / "run" / "export" / "model.safetensors").is_file()
    assert "CommError" in results[unreachable][1], results[unreachable][1][-4000:]
    assert calls.read_text().split("\n")[:2] == ["init", "log 1"]  # the stub was used; log was tried once
    assert "ConnectionError: stub: W&B server unreachable" in results[stub][1]
