"""Launch scripts (launch/*.sh, launch/slurm.sbatch): exact --dry-run commands, errors, quoting,
and the SLURM SIGTERM -> requeue flow with fake srun/scontrol. No GPU, SLURM or torch needed."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCH = ROOT / "launch"
TORCHRUN = LAUNCH / "torchrun.sh"
DEEPSPEED = LAUNCH / "deepspeed.sh"
SLURM = LAUNCH / "slurm.sbatch"
SCRIPTS = [TORCHRUN, DEEPSPEED, SLURM]

# Variables the scripts read: removed from the inherited environment so results don't depend on it.
SCRUBBED = {"NNODES", "NPROC_PER_NODE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "RDZV_ID", "MAX_RESTARTS",
            "PYTHON", "HOSTFILE", "NUM_GPUS", "CUDA_VISIBLE_DEVICES", "SCONTROL", "LAUNCH_DIR", "REQUEUE_ON_TERM",
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"}
NO_SCONTROL = "/nonexistent/scontrol"  # forces the built-in SLURM_JOB_NODELIST parser
TR = shlex.quote(str(TORCHRUN))


def _env(path_prefix: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith("SLURM_")}
    if path_prefix is not None:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def run(script: Path, *args: str, path_prefix: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=_env(path_prefix, **env), capture_output=True,
                          text=True, timeout=30, cwd=ROOT)


def dry(script: Path, *args: str, path_prefix: Path | None = None, **env: str) -> list[str]:
    proc = run(script, "--dry-run", *args, path_prefix=path_prefix, **env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def fails(script: Path, *args: str, **env: str) -> str:
    """Runs with --dry-run, expects exit 2 with one line on stderr; returns that line."""
    proc = run(script, "--dry-run", *args, **env)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "error:" in lines[0], proc.stderr
    return lines[0]


def fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """A folder of executable bash scripts {name: body} to put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        exe = bin_dir / name
        exe.write_text("#!/usr/bin/env bash\n" + body)
        exe.chmod(0o755)
    return bin_dir


# -- all scripts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed")
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help(script):
    proc = run(script, "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("Usage:"), proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_unknown_option_and_no_recipe_exit_2(script):
    env = {"SLURM_JOB_NODELIST": "n1", "SCONTROL": NO_SCONTROL}
    assert "--bogus" in fails(script, "--bogus", "r.yaml", **env)
    assert "no recipe" in fails(script, **env)


# -- torchrun.sh ----------------------------------------------------------------------------------

def test_torchrun_single_node_default():
    assert dry(TORCHRUN, "recipes/quickstart.yaml", "train.max_steps=10", NPROC_PER_NODE="2") == [
        "torchrun --standalone --nproc_per_node=2 --max-restarts=0 -m scldm_scale.cli train "
        "recipes/quickstart.yaml train.max_steps=10"]


def test_torchrun_multi_node():
    assert dry(TORCHRUN, "r.yaml", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.1", NPROC_PER_NODE="8") == [
        "torchrun --nnodes=2 --nproc_per_node=8 --node_rank=1 --rdzv_backend=c10d "
        "--rdzv_endpoint=10.0.0.1:29500 --rdzv_id=scldm-scale --max-restarts=0 -m scldm_scale.cli train r.yaml"]


def test_torchrun_options_override_env():
    lines = dry(TORCHRUN, "--nnodes", "4", "--node-rank=3", "--master-addr", "host0", "--master-port=6000",
                "--max-restarts", "2", "--rdzv-id=job7", "--nproc-per-node", "4", "--python", "/opt/py/bin/python",
                "--", "a.yaml", "b.yaml", NNODES="2", NODE_RANK="0", MASTER_ADDR="other", NPROC_PER_NODE="8")
    assert lines == [
        "/opt/py/bin/python -m torch.distributed.run --nnodes=4 --nproc_per_node=4 --node_rank=3 "
        "--rdzv_backend=c10d --rdzv_endpoint=host0:6000 --rdzv_id=job7 --max-restarts=2 "
        "-m scldm_scale.cli train a.yaml b.yaml"]


def test_torchrun_nproc_detection(tmp_path):
    four_gpus = fake_bin(tmp_path, **{"nvidia-smi": "for i in 0 1 2 3; do echo \"GPU $i: H100 (UUID: x)\"; done\n"})
    assert "--nproc_per_node=4" in dry(TORCHRUN, "r.yaml", path_prefix=four_gpus)[0]
    assert "--nproc_per_node=3" in dry(TORCHRUN, "r.yaml", path_prefix=four_gpus, CUDA_VISIBLE_DEVICES="0,2,3")[0]
    broken = fake_bin(tmp_path / "b", **{"nvidia-smi": "echo 'NVIDIA-SMI has failed' >&2; exit 9\n"})
    assert "--nproc_per_node=1" in dry(TORCHRUN, "r.yaml", path_prefix=broken)[0]


def test_torchrun_passthrough_quoting():
    args = ["recipes/quickstart.yaml", "run.name=my run", "logging.note=it's $HOME", "x=", "", "--not-an-option"]
    (line,) = dry(TORCHRUN, "--", *args, NPROC_PER_NODE="1")
    assert line.endswith(" train recipes/quickstart.yaml 'run.name=my run' 'logging.note=it'\"'\"'s $HOME' x= '' "
                         "--not-an-option")
    assert shlex.split(line)[-len(args):] == args


@pytest.mark.parametrize("env, variable", [
    ({"NNODES": "2", "NPROC_PER_NODE": "8"}, "MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK"),
    ({"NNODES": "0"}, "NNODES"),
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE"),
    ({"MASTER_PORT": "70000"}, "MASTER_PORT"),
    ({"MAX_RESTARTS": "-1"}, "MAX_RESTARTS"),
])
def test_torchrun_errors_name_the_variable(env, variable):
    line = fails(TORCHRUN, "r.yaml", **env)
    assert line.startswith("torchrun.sh: error: ") and f"{variable}=" in line


def test_torchrun_runs_what_it_prints(tmp_path):
    """Without --dry-run the script execs exactly the printed argv (fake torchrun on PATH)."""
    out = tmp_path / "argv"
    bin_dir = fake_bin(tmp_path, torchrun=f'printf "%s\\n" "$TORCH_ELASTIC_SHUTDOWN_TIMEOUT" "$@" > {shlex.quote(str(out))}\n')
    args = ["r.yaml", "run.name=a b"]
    (line,) = dry(TORCHRUN, *args, path_prefix=bin_dir, NPROC_PER_NODE="2")
    proc = run(TORCHRUN, *args, path_prefix=bin_dir, NPROC_PER_NODE="2")
    assert proc.returncode == 0, proc.stderr
    timeout, *argv = out.read_text().splitlines()
    assert ["torchrun", *argv] == shlex.split(line)
    assert timeout == "110"


# -- deepspeed.sh ---------------------------------------------------------------------------------

@pytest.fixture()
def hostfile(tmp_path) -> Path:
    path = tmp_path / "hostfile"
    path.write_text("# two nodes\nnode01 slots=8\n\n  node02 slots=8\n")
    return path


def test_deepspeed_hostfile(hostfile):
    assert dry(DEEPSPEED, "r.yaml", "train.max_steps=10", HOSTFILE=str(hostfile)) == [
        f"deepspeed --hostfile={hostfile} --num_nodes=2 --num_gpus=8 --master_addr=node01 --master_port=29500 "
        "--no_local_rank --module scldm_scale.cli train r.yaml train.max_steps=10"]
    assert dry(DEEPSPEED, f"--hostfile={hostfile}", "--num-nodes", "1", "--num-gpus=4", "--master-addr", "10.0.0.1",
               "--master-port", "7000", "r.yaml") == [
        f"deepspeed --hostfile={hostfile} --num_nodes=1 --num_gpus=4 --master_addr=10.0.0.1 --master_port=7000 "
        "--no_local_rank --module scldm_scale.cli train r.yaml"]


def test_deepspeed_single_node():
    assert dry(DEEPSPEED, "r.yaml", "run.name=my run", NUM_GPUS="2") == [
        "deepspeed --num_nodes=1 --num_gpus=2 --master_port=29500 --no_local_rank --module scldm_scale.cli "
        "train r.yaml 'run.name=my run'"]
    # the launcher ignores CUDA_VISIBLE_DEVICES once --num_gpus is given: the ids go in --include
    assert dry(DEEPSPEED, "r.yaml", CUDA_VISIBLE_DEVICES="2,3") == [
        "deepspeed --include=localhost:2,3 --master_port=29500 --no_local_rank --module scldm_scale.cli train r.yaml"]
    assert dry(DEEPSPEED, "--python", "/opt/py", "r.yaml", NPROC_PER_NODE="1") == [
        "/opt/py -m deepspeed.launcher.runner --num_nodes=1 --num_gpus=1 --master_port=29500 --no_local_rank "
        "--module scldm_scale.cli train r.yaml"]


def test_deepspeed_errors(tmp_path, hostfile):
    line = fails(DEEPSPEED, "r.yaml", HOSTFILE=str(tmp_path / "missing"))
    assert line.startswith("deepspeed.sh: error: ") and "HOSTFILE=" in line and "missing" in line
    assert "HOSTFILE" in fails(DEEPSPEED, "r.yaml", NNODES="2")
    assert "NNODES=3" in fails(DEEPSPEED, "r.yaml", NNODES="3", HOSTFILE=str(hostfile))
    uneven = tmp_path / "uneven"
    uneven.write_text("a slots=8\nb slots=4\n")
    assert "NUM_GPUS" in fails(DEEPSPEED, "r.yaml", HOSTFILE=str(uneven))
    assert "--num_gpus=4" in dry(DEEPSPEED, "r.yaml", HOSTFILE=str(uneven), NUM_GPUS="4")[0]
    bad = tmp_path / "bad"
    bad.write_text("node01 8\n")
    assert "bad line" in fails(DEEPSPEED, "r.yaml", HOSTFILE=str(bad))


# -- slurm.sbatch ---------------------------------------------------------------------------------

def _torchrun_line(nnodes: int, rank: int, addr: str, rdzv_id: str, nproc: int, tail: str) -> str:
    return (f"torchrun --nnodes={nnodes} --nproc_per_node={nproc} --node_rank={rank} --rdzv_backend=c10d "
            f"--rdzv_endpoint={addr}:29500 --rdzv_id={rdzv_id} --max-restarts=0 -m scldm_scale.cli train {tail}")


def test_slurm_bracket_nodelist():
    lines = dry(SLURM, "r.yaml", "run.name=a b", SLURM_JOB_NODELIST="node[01-02]", SLURM_NNODES="2",
                SLURM_JOB_ID="4242", SLURM_GPUS_PER_NODE="h100:8", SLURM_CPUS_PER_TASK="64", SCONTROL=NO_SCONTROL)
    tail = "r.yaml 'run.name=a b'"
    assert lines == [
        f"srun --kill-on-bad-exit=1 --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=64 bash {TR} "
        f"--nnodes=2 --nproc-per-node=8 --master-addr=node01 --master-port=29500 --rdzv-id=4242 --max-restarts=0 "
        f"-- {tail}",
        _torchrun_line(2, 0, "node01", "4242", 8, tail),
        _torchrun_line(2, 1, "node01", "4242", 8, tail),
    ]


def test_slurm_simple_list_without_scontrol_and_restart_resumes():
    lines = dry(SLURM, "--", "r.yaml", SLURM_JOB_NODELIST="nodeA,nodeB", SLURM_RESTART_COUNT="1",
                NPROC_PER_NODE="4", SCONTROL="")
    tail = "r.yaml run.resume=true"
    assert lines == [
        f"srun --kill-on-bad-exit=1 --nodes=2 --ntasks=2 --ntasks-per-node=1 bash {TR} --nnodes=2 "
        f"--nproc-per-node=4 --master-addr=nodeA --master-port=29500 --rdzv-id=scldm-scale --max-restarts=0 -- {tail}",
        _torchrun_line(2, 0, "nodeA", "scldm-scale", 4, tail),
        _torchrun_line(2, 1, "nodeA", "scldm-scale", 4, tail),
    ]
    fresh = dry(SLURM, "r.yaml", SLURM_JOB_NODELIST="nodeA,nodeB", SLURM_RESTART_COUNT="0", NPROC_PER_NODE="4",
                SCONTROL="")
    assert all("run.resume" not in line for line in fresh)


def test_slurm_single_node_is_standalone():
    assert dry(SLURM, "r.yaml", SLURM_JOB_NODELIST="gpu7", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="4",
               SCONTROL=NO_SCONTROL)[1:] == [
        "torchrun --standalone --nproc_per_node=4 --max-restarts=0 -m scldm_scale.cli train r.yaml"]


@pytest.mark.parametrize("nodelist, first, count", [
    ("node[01-02]", "node01", 2),
    ("gpu[098-101]", "gpu098", 4),
    ("n[1-2,5],x", "n1", 4),
    ("rack1-n[07-08]-ib", "rack1-n07-ib", 2),
    ("a[1-2]b[3-4]", "a1b3", 4),
])
def test_slurm_nodelist_fallback_parser(nodelist, first, count):
    lines = dry(SLURM, "r.yaml", SLURM_JOB_NODELIST=nodelist, NPROC_PER_NODE="1", SCONTROL=NO_SCONTROL)
    assert f"--master-addr={first} " in lines[0] and f"--nnodes={count} " in lines[0]
    assert len(lines) == 1 + count


def test_slurm_uses_scontrol(tmp_path):
    bin_dir = fake_bin(tmp_path, scontrol='[[ "$1 $2" == "show hostnames" ]] && printf "10.1.1.1\\n10.1.1.2\\n"\n')
    lines = dry(SLURM, "r.yaml", path_prefix=bin_dir, SLURM_JOB_NODELIST="whatever", SLURM_NNODES="2",
                NPROC_PER_NODE="2")
    assert "--master-addr=10.1.1.1 " in lines[0]
    assert lines[1] == _torchrun_line(2, 0, "10.1.1.1", "scldm-scale", 2, "r.yaml")


@pytest.mark.parametrize("env, variable", [
    ({}, "SLURM_JOB_NODELIST"),
    ({"SLURM_JOB_NODELIST": "n[1-2", "SCONTROL": NO_SCONTROL}, "SLURM_JOB_NODELIST"),
    ({"SLURM_JOB_NODELIST": "n1", "SLURM_RESTART_COUNT": "x", "SCONTROL": NO_SCONTROL}, "SLURM_RESTART_COUNT"),
    ({"SLURM_JOB_NODELIST": "n1", "NPROC_PER_NODE": "x", "SCONTROL": NO_SCONTROL}, "NPROC_PER_NODE"),
])
def test_slurm_errors_name_the_variable(env, variable):
    line = fails(SLURM, "r.yaml", **env)
    assert line.startswith("slurm.sbatch: error: ") and variable in line


FAKE_SRUN = """\
printf '%s\\n' "$@" > "$FAKE_DIR/srun_args"
trap 'echo TERM >> "$FAKE_DIR/srun_term"; kill "$child" 2>/dev/null; exit 1' TERM
sleep "${FAKE_SLEEP:-20}" & child=$!
touch "$FAKE_DIR/started"
wait "$child"
exit "${FAKE_SRUN_RC:-0}"
"""
FAKE_SCONTROL = """\
echo "$*" >> "$FAKE_DIR/scontrol"
case "$1 $2" in
  "show hostnames") printf 'hostX\\nhostY\\n' ;;
  "show job") echo "JobId=$4 JobState=${FAKE_STATE:-RUNNING}" ;;
esac
"""


def _submit(tmp_path: Path, send_term: bool, **env: str) -> subprocess.Popen:
    bin_dir = fake_bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    proc = subprocess.Popen(["bash", str(SLURM), "r.yaml"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(bin_dir, FAKE_DIR=str(tmp_path), SLURM_JOB_NODELIST="x[1-2]",
                                                SLURM_NNODES="2", SLURM_JOB_ID="77", **env))
    if send_term:
        deadline = time.monotonic() + 10
        while not (tmp_path / "started").exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    return proc


def test_slurm_sigterm_forwards_and_requeues(tmp_path):
    proc = _submit(tmp_path, send_term=True)
    assert proc.returncode == 0, proc.stderr.read()
    assert (tmp_path / "srun_term").read_text() == "TERM\n"
    argv = (tmp_path / "srun_args").read_text().splitlines()
    assert argv[:4] == ["--kill-on-bad-exit=1", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1"]
    assert argv[-2:] == ["--", "r.yaml"]
    assert (tmp_path / "scontrol").read_text().splitlines()[-1] == "requeue 77"


@pytest.mark.parametrize("env", [{"REQUEUE_ON_TERM": "0"}, {"FAKE_STATE": "CANCELLED"}])
def test_slurm_sigterm_without_requeue(tmp_path, env):
    proc = _submit(tmp_path, send_term=True, **env)
    assert proc.returncode == 0, proc.stderr.read()
    assert "requeue" not in (tmp_path / "scontrol").read_text()


def test_slurm_failure_status_passes_through(tmp_path):
    proc = _submit(tmp_path, send_term=False, FAKE_SRUN_RC="3", FAKE_SLEEP="0")
    assert proc.returncode == 3
    assert "requeue" not in (tmp_path / "scontrol").read_text()
