#!/usr/bin/env bash
# Launch `python -m scldm_scale.cli train` with torchrun, one process per GPU: on one node
# (--standalone) or, with NNODES > 1, on NNODES nodes that meet through a c10d rendezvous at
# MASTER_ADDR:MASTER_PORT. Run this script once per node. See `launch/torchrun.sh --help`.
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

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

NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-scldm-scale}}
MAX_RESTARTS=${MAX_RESTARTS:-0}
PYTHON=${PYTHON:-}

VALUE_OPTIONS=(--nnodes --nproc-per-node --node-rank --master-addr --master-port --rdzv-id --max-restarts --python)
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

parse_options "$@"

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
check_master_port
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

# torchrun forwards SIGTERM to the workers, which checkpoint and exit 0; give them time to do so.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-110}
exec_or_print torch "${cmd[@]}"
