# Shared by the launch scripts (sourced, not run): errors, option parsing, --dry-run quoting, GPU count.
#
# The sourcing script sets PROG (its name in error lines) and VALUE_OPTIONS (its options that take a
# value, as --name VALUE or --name=VALUE), and defines usage() and set_option NAME VALUE.
# shellcheck shell=bash disable=SC2154,SC2034  # PROG, VALUE_OPTIONS in; DRY_RUN, train_args out

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

takes_value() { # takes_value --name: is it one of the script's VALUE_OPTIONS?
  local option
  for option in "${VALUE_OPTIONS[@]}"; do
    [[ $1 == "$option" ]] && return 0
  done
  return 1
}

parse_options() { # parse_options "$@": -h/--help, --dry-run (-> DRY_RUN), VALUE_OPTIONS; the rest -> train_args
  DRY_RUN=0
  train_args=()
  while (($# > 0)); do
    case $1 in
      -h | --help)
        usage
        exit 0
        ;;
      --dry-run) DRY_RUN=1 ;;
      --)
        shift
        train_args=("$@")
        break
        ;;
      -*)
        if takes_value "$1"; then
          (($# >= 2)) || die "option $1 needs a value (see --help)"
          set_option "$1" "$2"
          shift
        elif [[ $1 == *=* ]] && takes_value "${1%%=*}"; then
          set_option "${1%%=*}" "${1#*=}"
        else
          die "unknown option $1; trainer arguments (recipes, key=value) go after the options or after --"
        fi
        ;;
      *)
        train_args=("$@")
        break
        ;;
    esac
    shift
  done
}

check_master_port() {
  if ! { is_uint "$MASTER_PORT" && ((10#$MASTER_PORT >= 1 && 10#$MASTER_PORT <= 65535)); }; then
    die "MASTER_PORT='$MASTER_PORT' is not a port number; set MASTER_PORT=29500 or pass --master-port PORT"
  fi
}

exec_or_print() { # exec_or_print PACKAGE CMD...: with --dry-run print CMD as one shell-quoted line, else exec it
  local package=$1
  shift
  if ((DRY_RUN)); then
    quote "$@"
    exit 0
  fi
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found; activate the environment with $package (source .venv/bin/activate) or set PYTHON=/path/to/python"
  exec "$@"
}
