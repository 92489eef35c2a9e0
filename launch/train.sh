#!/usr/bin/env bash
# Train on this machine with the right accelerate config: CPU processes, 1 GPU, N GPUs (DDP),
# or DeepSpeed ZeRO-2/3. Ends in `exec accelerate launch ... -m mtl_dist.cli train CONFIG ...`.
#
#   launch/train.sh [--launch NAME] [--procs N] [--dry-run] [--ACCEL_OPT=VALUE ...] CONFIG [overrides]
#
#   --launch NAME   auto (default) | cpu | gpu | ddp | zero2 | zero3     (env MTL_LAUNCH)
#                   auto: no GPU -> cpu, 1 GPU -> gpu, more -> ddp
#   --procs N       processes on this machine                            (env MTL_NUM_PROCS)
#                   default: 2 for cpu, 1 for gpu, every visible GPU for ddp/zero2/zero3
#                   (zero2/zero3 without a GPU: 2 CPU processes, DeepSpeed on gloo)
#   --dry-run       print the launch as one bash line on stdout instead of running it:
#                   env VARS... accelerate launch ...                     (env MTL_DRY_RUN=1)
#   --ACCEL_OPT=V   any other `--option=value` (or flag) before CONFIG goes to `accelerate launch`,
#                   e.g. --num_machines=2 --machine_rank=1 --main_process_ip=node1 (multi-node)
# Other env: MTL_NUM_GPUS (skip detection), MTL_MAIN_PORT (default: a free port),
# MTL_ACCELERATE (default: accelerate), MTL_PYTHON (default: python3; runs `mtl-dist check`
# on the config before launching). OMP_NUM_THREADS defaults to cores / processes.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
launch=${MTL_LAUNCH:-auto}
procs=${MTL_NUM_PROCS:-}
dry_run=${MTL_DRY_RUN:-0}
accel_opts=()

usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }
die() { echo "launch/train.sh: $*" >&2; exit 2; }
# A count as a plain decimal of at most 6 digits: bash arithmetic would read 010 as octal,
# evaluate a name or $(...) inside, and wrap a huge one round.
is_count() { [[ $1 =~ ^[1-9][0-9]{0,5}$ ]]; }
is_port() { [[ $1 =~ ^[1-9][0-9]{0,4}$ ]] && [ "$1" -le 65535 ]; }
case $(printf %s "$dry_run" | tr '[:upper:]' '[:lower:]') in  # (bash 3 has no ${x,,})
  1|true|yes) dry_run=1 ;;
  0|false|no|"") dry_run=0 ;;
  *) die "MTL_DRY_RUN: expected 1/true/yes or 0/false/no, got '$dry_run'" ;;
esac

while [ $# -gt 0 ]; do
  case $1 in
    --launch) [ $# -ge 2 ] || die "--launch needs a value"; launch=$2; shift 2 ;;
    --launch=*) launch=${1#*=}; shift ;;
    --procs) [ $# -ge 2 ] || die "--procs needs a value"; procs=$2; shift 2 ;;
    --procs=*) procs=${1#*=}; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    --*) accel_opts+=("$1"); shift ;;
    *) break ;;
  esac
done
[ $# -ge 1 ] || { usage >&2; die "missing CONFIG (a run config YAML, e.g. configs/demo.yaml)"; }
config=$1; shift
for arg in "$@"; do
  case $arg in
    --) ;;  # mtl-dist train's own end of options
    -*) die "'$arg' comes after CONFIG '$config': options go before it, overrides (key=value) after" ;;
  esac
done
python=${MTL_PYTHON:-python3}
accelerate=${MTL_ACCELERATE:-accelerate}
# the dry run's line runs it through `env`, which would take a word with '=' for a variable
case $dry_run:$accelerate in 1:*=*) die "MTL_ACCELERATE: '$accelerate' holds a '=', which env (the printed line runs the command through it) would take for a variable to set: use a path without '='" ;; esac
command -v "$python" >/dev/null 2>&1 || die "MTL_PYTHON: '$python' is not a command"
command -v "$accelerate" >/dev/null 2>&1 || die "MTL_ACCELERATE: '$accelerate' is not a command (is accelerate installed?)"

takes_a_value() {  # whether `accelerate launch` option $1 takes a value, by its own parser
  "$python" - "$1" 2>/dev/null <<'PY'
import sys
from accelerate.commands.launch import launch_command_parser
action = launch_command_parser()._option_string_actions.get(sys.argv[1])
sys.exit(0 if action is not None and action.nargs != 0 else 1)
PY
}
# `--num_machines 2 CONFIG` made "2" the config (the first argument that is no option here)
last_opt=
[ ${#accel_opts[@]} -eq 0 ] || last_opt=${accel_opts[${#accel_opts[@]}-1]}
if [ -n "$last_opt" ] && [[ $last_opt != *=* ]] && takes_a_value "$last_opt"; then
  die "'$last_opt' takes a value: write $last_opt=$config (the first argument that is no option is CONFIG)"
fi

count_gpus() {
  # Respect CUDA_VISIBLE_DEVICES (Slurm sets it from --gres); else ask the driver.
  if [ -n "${MTL_NUM_GPUS:-}" ]; then echo "$MTL_NUM_GPUS"; return; fi
  if [ "${CUDA_VISIBLE_DEVICES+set}" = set ]; then
    case ${CUDA_VISIBLE_DEVICES} in ""|-1) echo 0 ;; *) tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . ;; esac
    return
  fi
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  elif [ -e /dev/nvidiactl ] || [ -d /proc/driver/nvidia ]; then
    python3 -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
  else
    echo 0
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

if [ -n "${MTL_NUM_GPUS:-}" ] && ! [[ $MTL_NUM_GPUS =~ ^(0|[1-9][0-9]{0,5})$ ]]; then
  die "MTL_NUM_GPUS: expected a number of GPUs, got '$MTL_NUM_GPUS'"
fi
ngpu=$(count_gpus)
if [ "$launch" = auto ]; then
  if [ "$ngpu" -eq 0 ]; then launch=cpu; elif [ "$ngpu" -eq 1 ]; then launch=gpu; else launch=ddp; fi
fi
ds_file=
on_cpu=0
case $launch in
  cpu)   file=cpu_multi.yaml; on_cpu=1 ;;
  gpu)   file=gpu_single.yaml ;;
  ddp)   file=ddp.yaml ;;
  zero2|zero3) file=$launch.yaml; ds_file=$ROOT/launch/ds_$launch.json ;;
  *) die "unknown --launch '$launch'; expected auto, cpu, gpu, ddp, zero2 or zero3" ;;
esac
if [ "$ngpu" -eq 0 ] && [ "$on_cpu" -eq 0 ]; then
  case $launch in
    # ZeRO on CPU processes (gloo, DS_ACCELERATOR=cpu): the trainer drives DeepSpeed's engine.
    zero2|zero3) on_cpu=1 ;;
    *) die "--launch $launch needs CUDA GPUs but none is visible (use --launch cpu)" ;;
  esac
fi
if [ -z "$procs" ]; then
  if [ "$on_cpu" -eq 1 ]; then procs=2; elif [ "$launch" = gpu ]; then procs=1; else procs=$ngpu; fi
fi
is_count "$procs" || die "--procs (or MTL_NUM_PROCS, MTL_NUM_GPUS): expected a positive integer of at most 6 digits, got '$procs'"
[ "$launch" != gpu ] || [ "$procs" -eq 1 ] || die "--launch gpu runs 1 process; use --launch ddp for $procs"

machines=1
have_port=0
for opt in "${accel_opts[@]+"${accel_opts[@]}"}"; do
  name=${opt%%=*}; name=${name#--}; name=${name//-/_}  # accelerate's --num-machines too
  [[ $opt == *=* ]] || name="$name (no value)"
  case $name in
    num_machines) machines=${opt#*=}
      is_count "$machines" || die "${opt%%=*}: expected a positive integer of at most 6 digits, got '$machines'" ;;
    main_process_port) have_port=1
      is_port "${opt#*=}" || die "${opt%%=*}: expected a port number 1-65535, got '${opt#*=}'" ;;
    num_processes*) die "use --procs (per machine), not ${opt%%=*}" ;;
  esac
done

check_accelerate_options() {  # by accelerate's own parser: its problem in one line, if any
  "$python" - "$@" 2>/dev/null <<'PY'
import sys
from accelerate.commands.launch import launch_command_parser
parser = launch_command_parser()
def refuse(message):
    print(message)
    sys.exit(1)
parser.error = refuse
parser.parse_args([*sys.argv[1:], "-m", "mtl_dist.cli"])
PY
}
# before the config check and any launch: a dry run passed `--num_proceses=2`, which the real
# launch then refused with accelerate's usage
if [ ${#accel_opts[@]} -gt 0 ]; then
  problem=$(check_accelerate_options "${accel_opts[@]}") \
    || die "accelerate launch options: ${problem:-cannot be checked (the accelerate parser did not load in $python)}"
fi

if [ "$on_cpu" -eq 1 ]; then
  export CUDA_VISIBLE_DEVICES=""   # CPU processes even where GPUs exist (gloo, MULTI_CPU)
  if [ "$launch" != cpu ]; then export DS_ACCELERATOR=cpu; fi
fi
if [ -n "${OMP_NUM_THREADS:-}" ] && ! is_count "$OMP_NUM_THREADS"; then
  die "OMP_NUM_THREADS: expected a positive integer, got '$OMP_NUM_THREADS' (unset it for cores / procs)"
fi
if [ -n "${MTL_MAIN_PORT:-}" ] && ! is_port "$MTL_MAIN_PORT"; then
  die "MTL_MAIN_PORT: expected a port number 1-65535, got '$MTL_MAIN_PORT'"
fi
if [ -z "${OMP_NUM_THREADS:-}" ]; then
  cores=$(nproc 2>/dev/null || echo 1)
  export OMP_NUM_THREADS=$(( cores / procs > 0 ? cores / procs : 1 ))
fi

cmd=("$accelerate" launch --config_file "$ROOT/launch/$file"
     --num_processes "$(( procs * machines ))")
[ -z "$ds_file" ] || cmd+=(--deepspeed_config_file "$ds_file")
[ "$have_port" -eq 1 ] || cmd+=(--main_process_port "${MTL_MAIN_PORT:-$(free_port)}")
cmd+=("${accel_opts[@]+"${accel_opts[@]}"}" -m mtl_dist.cli train "$config" "$@")

# The config first, in one process: a mistake is one line and exit 2, not one line per rank
# followed by the launcher's traceback. It sees the launch's world size and DeepSpeed JSON, so
# a resume's global batch, world size and ZeRO stage are checked too.
( # a subshell, not `env`: env would take an MTL_PYTHON holding a '=' for a variable to set
  [ -z "$ds_file" ] || export ACCELERATE_USE_DEEPSPEED=true "ACCELERATE_DEEPSPEED_CONFIG_FILE=$ds_file"
  exec "$python" -m mtl_dist.cli check --world-size "$(( procs * machines ))" "$config" "$@" >/dev/null
) || exit $?

echo "[train.sh] launch=$launch gpus=$ngpu procs_per_machine=$procs machines=$machines" \
     "OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2
echo "[train.sh] $(printf '%q ' "${cmd[@]}")" >&2
if [ "$dry_run" = 1 ]; then
  # one bash line that launches the same from this folder: the variables that decided or set
  # the launch (as they are now, set here or before), then the command
  assignments=()
  for name in CUDA_VISIBLE_DEVICES DS_ACCELERATOR OMP_NUM_THREADS; do
    [ "${!name+set}" != set ] || assignments+=("$name=${!name}")
  done
  printf '%q ' env "${assignments[@]+"${assignments[@]}"}" "${cmd[@]}" | sed 's/ $//'; echo
  exit 0
fi
exec "${cmd[@]}"
