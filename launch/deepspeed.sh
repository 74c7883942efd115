#!/usr/bin/env bash
# Launch `python -m scldm_scale.cli train` with the DeepSpeed launcher: on the nodes of an
# MPI-style hostfile (the launcher reaches them with passwordless ssh/pdsh), or on this node
# when there is no hostfile. Run it once, on node 0. See `launch/deepspeed.sh --help`.
set -euo pipefail

# shellcheck source=common.sh
source "$(dirname -- "${BASH_SOURCE[0]}")/common.sh"

PROG=deepspeed.sh

usage() {
  cat <<'EOF'
Usage: launch/deepspeed.sh [options] [--] RECIPE.yaml [RECIPE2.yaml ...] [key=value ...]

Runs `deepspeed [...] --no_local_rank --module scldm_scale.cli train ARGS` once, on node 0.
With a hostfile (one line per node: `node01 slots=8`) the launcher starts one process per slot
on every node through passwordless ssh (pdsh); without one it runs on this node only.
Everything after the options (or after --) goes to `scldm_scale.cli train`.

Options (each overrides the environment variable in brackets):
  --hostfile PATH     hostfile of the nodes; unset: single node        [HOSTFILE]
  --num-nodes N       use the first N hosts of the hostfile           [NNODES, default: all hosts]
  --num-gpus N        processes (GPUs) per node                       [NUM_GPUS or NPROC_PER_NODE;
                      default: the hostfile's slots=, else the count of CUDA_VISIBLE_DEVICES,
                      else of `nvidia-smi --list-gpus`, else 1]
  --master-addr HOST  address of the first host (hostfile only)       [MASTER_ADDR, default: first host]
  --master-port PORT  torch.distributed port                          [MASTER_PORT, default 29500]
  --python PY         run `PY -m deepspeed.launcher.runner` instead of `deepspeed` [PYTHON]
  --dry-run           print the command (shell-quoted, one line) and exit 0
  -h, --help          show this help

Notes: --no_local_rank is always passed (the CLI reads LOCAL_RANK from the environment and would
reject a --local_rank=N argument). On one node with CUDA_VISIBLE_DEVICES set, the devices are
given as --include=localhost:IDS, because the launcher ignores CUDA_VISIBLE_DEVICES when
--num_gpus is given.

Errors in the settings print one line naming the variable and exit 2.
Example: HOSTFILE=hostfile launch/deepspeed.sh recipes/quickstart.yaml train.max_steps=1000
EOF
}

HOSTFILE=${HOSTFILE:-}
NNODES=${NNODES:-}
NUM_GPUS=${NUM_GPUS:-${NPROC_PER_NODE:-}}
MASTER_ADDR=${MASTER_ADDR:-}
MASTER_PORT=${MASTER_PORT:-29500}
PYTHON=${PYTHON:-}

VALUE_OPTIONS=(--hostfile --num-nodes --nnodes --num-gpus --nproc-per-node --master-addr --master-port --python)
set_option() { # set_option --name value
  case $1 in
    --hostfile) HOSTFILE=$2 ;;
    --num-nodes | --nnodes) NNODES=$2 ;;
    --num-gpus | --nproc-per-node) NUM_GPUS=$2 ;;
    --master-addr) MASTER_ADDR=$2 ;;
    --master-port) MASTER_PORT=$2 ;;
    --python) PYTHON=$2 ;;
  esac
}

parse_options "$@"

if [[ -n $NUM_GPUS ]] && ! { is_uint "$NUM_GPUS" && ((10#$NUM_GPUS >= 1)); }; then
  die "NUM_GPUS='$NUM_GPUS' is not a positive integer; set NUM_GPUS=<GPUs per node> or pass --num-gpus N"
fi
if [[ -n $NNODES ]] && ! { is_uint "$NNODES" && ((10#$NNODES >= 1)); }; then
  die "NNODES='$NNODES' is not a positive integer; set NNODES=<number of nodes> or pass --num-nodes N"
fi
check_master_port
((${#train_args[@]} > 0)) || die "no recipe given; usage: launch/deepspeed.sh [options] [--] RECIPE.yaml [key=value ...]"

if [[ -n $PYTHON ]]; then
  cmd=("$PYTHON" -m deepspeed.launcher.runner)
else
  cmd=(deepspeed)
fi

if [[ -n $HOSTFILE ]]; then
  [[ -f $HOSTFILE && -r $HOSTFILE ]] || die "HOSTFILE='$HOSTFILE' does not exist or is not readable; write one line per node ('node01 slots=8') there, or unset HOSTFILE to run on this node"
  # The launcher's own format: `HOST slots=N`, blank lines and `#` comments ignored.
  hosts=()
  slots=()
  while IFS= read -r line || [[ -n $line ]]; do
    line="${line#"${line%%[![:space:]]*}"}"
    [[ -z $line || $line == \#* ]] && continue
    if [[ $line =~ ^([^[:space:]]+)[[:space:]]+slots=([0-9]+) ]]; then
      hosts+=("${BASH_REMATCH[1]}")
      slots+=("${BASH_REMATCH[2]}")
    else
      die "HOSTFILE='$HOSTFILE' has a bad line '$line'; each line must read 'HOST slots=N'"
    fi
  done <"$HOSTFILE"
  ((${#hosts[@]} > 0)) || die "HOSTFILE='$HOSTFILE' lists no host; write one line per node ('node01 slots=8')"
  NNODES=${NNODES:-${#hosts[@]}}
  ((10#$NNODES <= ${#hosts[@]})) || die "NNODES=$NNODES but HOSTFILE='$HOSTFILE' lists ${#hosts[@]} host(s); add hosts or lower NNODES/--num-nodes"
  if [[ -z $NUM_GPUS ]]; then
    NUM_GPUS=${slots[0]}
    for ((i = 1; i < 10#$NNODES; i++)); do
      [[ ${slots[i]} == "$NUM_GPUS" ]] || die "HOSTFILE='$HOSTFILE' gives different slots per host (${hosts[0]}: $NUM_GPUS, ${hosts[i]}: ${slots[i]}); set NUM_GPUS=<GPUs per node> or pass --num-gpus N"
    done
  fi
  MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
  cmd+=("--hostfile=$HOSTFILE" "--num_nodes=$NNODES" "--num_gpus=$NUM_GPUS"
    "--master_addr=$MASTER_ADDR" "--master_port=$MASTER_PORT")
else
  if [[ -n $NNODES ]] && ((10#$NNODES > 1)); then
    die "NNODES=$NNODES needs a HOSTFILE listing the nodes; set HOSTFILE=<path> (lines 'node01 slots=8') or pass --hostfile PATH"
  fi
  visible=${CUDA_VISIBLE_DEVICES:-}
  [[ $visible == -1 ]] && visible=""
  if [[ -n $visible ]]; then
    # The launcher would ignore CUDA_VISIBLE_DEVICES once --num_gpus is given: pass the ids.
    IFS=, read -ra ids <<<"$visible"
    for id in "${ids[@]}"; do
      is_uint "$id" || die "CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' must list integer ids for the deepspeed launcher; set CUDA_VISIBLE_DEVICES=0,1,... or unset it"
    done
    if [[ -n $NUM_GPUS ]]; then
      ((10#$NUM_GPUS <= ${#ids[@]})) || die "NUM_GPUS=$NUM_GPUS but CUDA_VISIBLE_DEVICES='$CUDA_VISIBLE_DEVICES' has ${#ids[@]} device(s); lower NUM_GPUS or widen CUDA_VISIBLE_DEVICES"
      ids=("${ids[@]:0:10#$NUM_GPUS}")
    fi
    include=$(IFS=,; echo "${ids[*]}")
    cmd+=("--include=localhost:$include" "--master_port=$MASTER_PORT")
  else
    NUM_GPUS=${NUM_GPUS:-$(detect_gpus)}
    cmd+=(--num_nodes=1 "--num_gpus=$NUM_GPUS" "--master_port=$MASTER_PORT")
  fi
fi
cmd+=(--no_local_rank --module scldm_scale.cli train "${train_args[@]}")

exec_or_print deepspeed "${cmd[@]}"
