#!/usr/bin/env bash
# Launch `python -m scldm_scale.cli train` with torchrun, one process per GPU: on one node
# (--standalone) or, with NNODES > 1, on NNODES nodes that meet through a c10d rendezvous at
# MASTER_ADDR:MASTER_PORT. Run this script once per node. See `launch/torchrun.sh --help`.
set -euo pipefail

PROG=torchrun.sh

usage() {
  cat <<'EOF'
Usage: launch/torchrun.sh [options] [--] RECIPE.yaml [RECIPE2.yaml ...] [key=value ...]

Runs `torchrun ... -m scldm_scale.cli train ARGS` (one process per GPU). Single node
(--standalone) by default; with NNODES > 1 it joins a c10d rendezvous at MASTER_ADDR:MASTER_PORT
(run it once on every node, with the same NNODES/MASTER_ADDR/MASTER_PORT/RDZV_ID).
Everything after the options (or after --) goes to `scldm_scale.cli train`.

Options (each overrides the environment variable in brackets):
  --nnodes N            number of nodes                         [NNODES, default 1]
  --nproc-per-node N    processes (GPUs) per node               [NPROC_PER_NODE, default: the
                        count of CUDA_VISIBLE_DEVICES, else of `nvidia-smi --list-gpus`, else 1]
  --node-rank N         rank of this node, 0..NNODES-1          [NODE_RANK, default SLURM_NODEID or 0]
  --master-addr HOST    host of node 0 (needed when NNODES > 1) [MASTER_ADDR]
  --master-port PORT    rendezvous port on MASTER_ADDR          [MASTER_PORT, default 29500]
  --rdzv-id ID          rendezvous id, same on all nodes        [RDZV_ID, default SLURM_JOB_ID or scldm-scale]
  --max-restarts N      torchrun restarts of the worker group   [MAX_RESTARTS, default 0]
  --python PY           run `PY -m torch.distributed.run` instead of `torchrun` [PYTHON]
  --dry-run             print the command (shell-quoted, one line) and exit 0
  -h, --help            show this help

Environment only:
  TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun waits for the workers after forwarding a
                        SIGTERM before it kills them (default here 110; torch's own default is 30,
                        too short for a checkpoint of a large model)

Errors in the settings print one line naming the variable and exit 2.
Example: NPROC_PER_NODE=8 launch/torchrun.sh recipes/quickstart.yaml train.max_steps=1000
EOF
}

die() { # one line on stderr, exit status 2
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

quote() { # print the arguments as one shell-quoted line (the same quoting as Python's shlex.join)
  local LC_ALL=C word out="" safe='^[A-Za-z0-9_@%+=:,./-]+$' sq="'" esc="'\"'\"'"
  for word in "$@"; do
    if [[ -z $word ]]; then
      word="''"
    elif ! [[ $word =~ $safe ]]; then
      word="'${word//"$sq"/"$esc"}'"
    fi
    out+="${out:+ }$word"
  done
  printf '%s\n' "$out"
}

is_uint() { [[ $1 =~ ^[0-9]+$ ]]; }

detect_gpus() { # GPUs this process may use: CUDA_VISIBLE_DEVICES, else nvidia-smi, else 1
  local n ids
  if [[ -n ${CUDA_VISIBLE_DEVICES:-} && ${CUDA_VISIBLE_DEVICES} != -1 ]]; then
    IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
    return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
    if [[ $n =~ ^[0-9]+$ ]] && ((n > 0)); then
      echo "$n"
      return
    fi
  fi
  echo 1
}

NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-scldm-scale}}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-}
DRY_RUN=0

set_option() { # set_option --name value
  case $1 in
    --nnodes) NNODES=$2 ;;
    --nproc-per-node) NPROC_PER_NODE=$2 ;;
    --node-rank) NODE_RANK=$2 ;;
    --master-addr) MASTER_ADDR=$2 ;;
    --master-port) MASTER_PORT=$2 ;;
    --rdzv-id) RDZV_ID=$2 ;;
    --max-restarts) MAX_RESTARTS=$2 ;;
    --python) PYTHON=$2 ;;
  esac
}

train_args=()
while (($# > 0)); do
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --nnodes | --nproc-per-node | --node-rank | --master-addr | --master-port | --rdzv-id | --max-restarts | --python)
      (($# >= 2)) || die "option $1 needs a value (see --help)"
      set_option "$1" "$2"
      shift
      ;;
    --nnodes=* | --nproc-per-node=* | --node-rank=* | --master-addr=* | --master-port=* | --rdzv-id=* | --max-restarts=* | --python=*)
      set_option "${1%%=*}" "${1#*=}"
      ;;
    --)
      shift
      train_args=("$@")
      break
      ;;
    -*) die "unknown option $1; trainer arguments (recipes, key=value) go after the options or after --" ;;
    *)
      train_args=("$@")
      break
      ;;
  esac
  shift
done

NPROC_PER_NODE=${NPROC_PER_NODE:-$(detect_gpus)}

if ! { is_uint "$NNODES" && ((10#$NNODES >= 1)); }; then
  die "NNODES='$NNODES' is not a positive integer; set NNODES=<number of nodes> or pass --nnodes N"
fi
if ! { is_uint "$NPROC_PER_NODE" && ((10#$NPROC_PER_NODE >= 1)); }; then
  die "NPROC_PER_NODE='$NPROC_PER_NODE' is not a positive integer; set NPROC_PER_NODE=<GPUs per node> or pass --nproc-per-node N"
fi
if ! is_uint "$MAX_RESTARTS"; then
  die "MAX_RESTARTS='$MAX_RESTARTS' is not a non-negative integer; set MAX_RESTARTS=0 or pass --max-restarts N"
fi
if ! { is_uint "$MASTER_PORT" && ((10#$MASTER_PORT >= 1 && 10#$MASTER_PORT <= 65535)); }; then
  die "MASTER_PORT='$MASTER_PORT' is not a port number; set MASTER_PORT=29500 or pass --master-port PORT"
fi
((${#train_args[@]} > 0)) || die "no recipe given; usage: launch/torchrun.sh [options] [--] RECIPE.yaml [key=value ...]"

if [[ -n $PYTHON ]]; then
  cmd=("$PYTHON" -m torch.distributed.run)
else
  cmd=(torchrun)
fi

if ((10#$NNODES == 1)); then
  cmd+=(--standalone "--nproc_per_node=$NPROC_PER_NODE" "--max-restarts=$MAX_RESTARTS")
else
  [[ -n $MASTER_ADDR ]] || die "NNODES=$NNODES but MASTER_ADDR is not set; set MASTER_ADDR=<hostname or IP of node 0> (the same on every node) or pass --master-addr HOST"
  if ! { is_uint "$NODE_RANK" && ((10#$NODE_RANK < 10#$NNODES)); }; then
    die "NODE_RANK='$NODE_RANK' must be 0..$((10#$NNODES - 1)); set NODE_RANK=<rank of this node> or pass --node-rank N"
  fi
  [[ -n $RDZV_ID ]] || die "RDZV_ID is empty; set RDZV_ID=<job id, the same on every node> or pass --rdzv-id ID"
  endpoint_host=$MASTER_ADDR
  if [[ $endpoint_host == *:* && $endpoint_host != \[* ]]; then
    endpoint_host="[$endpoint_host]" # IPv6 literal
  fi
  cmd+=("--nnodes=$NNODES" "--nproc_per_node=$NPROC_PER_NODE" "--node_rank=$NODE_RANK"
    --rdzv_backend=c10d "--rdzv_endpoint=$endpoint_host:$MASTER_PORT" "--rdzv_id=$RDZV_ID"
    "--max-restarts=$MAX_RESTARTS")
fi
cmd+=(-m scldm_scale.cli train "${train_args[@]}")

if ((DRY_RUN)); then
  quote "${cmd[@]}"
  exit 0
fi

command -v "${cmd[0]}" >/dev/null 2>&1 || die "'${cmd[0]}' not found; activate the environment with torch (source .venv/bin/activate) or set PYTHON=/path/to/python"
# torchrun forwards SIGTERM to the workers, which checkpoint and exit 0; give them time to do so.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}
exec "${cmd[@]}"
