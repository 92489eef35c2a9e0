# shellcheck shell=bash
# Sourced by slurm/*.sbatch (not run by itself): print a banner, choose the launch settings, run the
# launcher in the background with signal forwarding, and requeue after a preemption signal.
#
# Signals. USR1 is the "checkpoint and requeue" request: Slurm sends it to the batch shell only
# (#SBATCH --signal=B:USR1@SECONDS before the time limit, or `scancel --signal=USR1 --batch JOBID`).
# torchrun's agent (inside `accelerate launch`) forwards TERM/INT/HUP/QUIT to its workers but not
# USR1, so the trap sends SIGTERM, once, to the launcher (single node) or to the job's srun step on
# every node (multi node). The workers checkpoint the same step (mtl_dist all-reduces the flag),
# exit 75, and rank 0 runs `scontrol requeue`; if that did not happen (rank 0 killed first), the
# batch shell requeues the job once the training has ended.
# (slurmstepd logs "*** STEP N.0 ... CANCELLED ***" for that TERM: the step is only signalled;
# it ran on through a 60-second checkpoint in a test.)
# TERM is Slurm ending the job (scancel, time limit, preemption, and the requeue itself): Slurm
# signals every process of the job then, so the trap does not forward it again (a second TERM
# makes torchrun's agent give up waiting for its workers); it only waits.
# torchrun waits TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default here 120; torch's own 30) for
# the workers before SIGKILL: keep it below the USR1 lead time.
# The trainer sees TERM either way, so before forwarding USR1 the trap writes "USR1" to
# $MTL_SIGNAL_FILE: rank 0 requeues only then (a plain scancel must end the job), and writes
# the run's stop reason to $MTL_SIGNAL_FILE.stop (a run that finished first is not requeued).

MTL_PREEMPTED_EXIT=75          # mtl_dist.preemption.PREEMPTED_EXIT_CODE
MTL_CHILD_PID=
MTL_SIGNALLED=
MTL_FORWARD_MODE=launcher
MTL_TRAINING_PIDS=
# Read by mtl_dist.preemption on the batch host (rank 0 runs there: the head node).
export MTL_SIGNAL_FILE="${TMPDIR:-/tmp}/mtl_dist.${SLURM_JOB_ID:-$$}.${SLURM_RESTART_COUNT:-0}.signal"
rm -f "$MTL_SIGNAL_FILE" "$MTL_SIGNAL_FILE.stop"

mtl_log() { echo "[mtl-slurm $(date '+%F %T')] $*"; }

mtl_banner() {
  mtl_log "job ${SLURM_JOB_ID:-?} '${SLURM_JOB_NAME:-?}' SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}" \
          "nodes=${SLURM_JOB_NODELIST:-?} (${SLURM_NNODES:-1}) batch host=$(hostname)"
  mtl_log "repo=$MTL_ROOT cwd=$PWD device=${MTL_DEVICE:-auto} launch=${MTL_LAUNCH:-auto}" \
          "procs/node=${MTL_PROCS_PER_NODE:-default} requeue=${MTL_REQUEUE:-1}"
}

mtl_export_launch_env() {
  # MTL_DEVICE, MTL_LAUNCH, MTL_PROCS_PER_NODE -> what launch/train.sh reads.
  #   cpu: CPU processes even on GPU nodes (GPUs hidden); MTL_LAUNCH cpu (default), zero2 or zero3
  #   gpu: MTL_LAUNCH ddp (default; 1 GPU is fine), gpu, zero2 or zero3; fails without GPUs
  #   auto: launch/train.sh decides from the GPUs it sees (none -> cpu, 1 -> gpu, more -> ddp)
  local launch=${MTL_LAUNCH:-auto}
  local requeue=${MTL_REQUEUE:-1}
  case ${requeue,,} in   # read as 0 / not 0 below: "no" kept requeueing
    1|true|yes) export MTL_REQUEUE=1 ;;
    0|false|no) export MTL_REQUEUE=0 ;;
    *) mtl_log "error: MTL_REQUEUE='$MTL_REQUEUE'; expected 1/true/yes or 0/false/no"; exit 2 ;;
  esac
  case ${MTL_DEVICE:-auto} in
    cpu)
      export CUDA_VISIBLE_DEVICES=""
      [ "$launch" != auto ] || launch=cpu
      case $launch in cpu|zero2|zero3) ;; *)
        mtl_log "error: MTL_DEVICE=cpu with MTL_LAUNCH=$launch; expected cpu, zero2 or zero3"; exit 2 ;;
      esac ;;
    gpu)
      [ "$launch" != auto ] || launch=ddp
      [ "$launch" != cpu ] || { mtl_log "error: MTL_DEVICE=gpu with MTL_LAUNCH=cpu"; exit 2; } ;;
    auto) ;;
    *) mtl_log "error: MTL_DEVICE='$MTL_DEVICE'; expected cpu, gpu or auto"; exit 2 ;;
  esac
  export MTL_LAUNCH=$launch
  if [ -n "${MTL_PROCS_PER_NODE:-}" ]; then export MTL_NUM_PROCS=$MTL_PROCS_PER_NODE; fi
  export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
}

mtl_common_overrides() {
  # Every (re)run resumes from the newest committed checkpoint of its output dir.
  MTL_OVERRIDES=(train.resume=auto)
  if [ "${MTL_REQUEUE:-1}" = 0 ]; then MTL_OVERRIDES+=(train.requeue_on_preempt=false); fi
}

mtl_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

_mtl_descendants() {
  local pid
  for pid in $(ps -o pid= --ppid "$1" 2>/dev/null); do echo "$pid"; _mtl_descendants "$pid"; done
}

_mtl_forward() {
  # launcher: SIGTERM to the launcher we started (it forwards TERM to its workers and waits).
  # steps: SIGTERM to the job's srun steps on every node via Slurm. Not `kill srun`: srun takes
  # TERM as "abort the step" and SIGKILLs the tasks. The step may not exist yet: wait for it.
  if [ "$MTL_FORWARD_MODE" = launcher ]; then
    # torchrun starts each worker in its own session: remember them to wait for them too.
    MTL_TRAINING_PIDS=$(_mtl_descendants "$MTL_CHILD_PID" | tr '\n' ' ')
    kill -TERM "$MTL_CHILD_PID" 2>/dev/null || true
    return
  fi
  local _
  for _ in $(seq 1 60); do
    if squeue --steps --jobs "$SLURM_JOB_ID" -h -o %i 2>/dev/null | grep -q "^$SLURM_JOB_ID\.[0-9]"; then
      scancel --signal=TERM "$SLURM_JOB_ID" && return
    fi
    kill -0 "$MTL_CHILD_PID" 2>/dev/null || return
    sleep 0.5
  done
  mtl_log "no job step to signal after 30 s"
}

_mtl_on_signal() {
  local sig=$1
  if [ "$sig" = TERM ]; then
    [ -n "$MTL_SIGNALLED" ] || MTL_SIGNALLED=TERM
    if [ "$MTL_FORWARD_MODE" = launcher ] && [ -z "$MTL_TRAINING_PIDS" ] && [ -n "$MTL_CHILD_PID" ]; then
      MTL_TRAINING_PIDS=$(_mtl_descendants "$MTL_CHILD_PID" | tr '\n' ' ')
    fi
    mtl_log "got SIGTERM: Slurm is ending the job and signals every process itself; waiting"
    return
  fi
  if [ -n "$MTL_SIGNALLED" ]; then
    mtl_log "got SIG$sig again: already forwarded, still waiting for the training"
    return
  fi
  MTL_SIGNALLED=$sig
  echo "$sig" > "$MTL_SIGNAL_FILE" 2>/dev/null || true   # before the TERM that carries it
  if [ -n "$MTL_CHILD_PID" ]; then
    mtl_log "got SIG$sig: forwarding SIGTERM to the training ($MTL_FORWARD_MODE);" \
            "it checkpoints at the next step and stops"
    _mtl_forward
  fi
}

mtl_run_forwarding() {
  # mtl_run_forwarding launcher|steps CMD...: run CMD in the background, forward USR1 to the
  # training as TERM once (see _mtl_forward), wait until CMD -- and, after a signal, the workers
  # it started -- have ended; return CMD's exit status.
  MTL_FORWARD_MODE=$1; shift
  trap '_mtl_on_signal USR1' USR1
  trap '_mtl_on_signal TERM' TERM
  if [ -n "$MTL_SIGNALLED" ]; then return 0; fi   # stopped before anything started
  "$@" &
  MTL_CHILD_PID=$!
  if [ "$MTL_SIGNALLED" = USR1 ]; then _mtl_forward; fi
  local rc
  while true; do
    wait "$MTL_CHILD_PID"
    rc=$?
    # wait returns >128 when a trapped signal interrupts it; the child may still be running.
    if [ "$rc" -gt 128 ] && kill -0 "$MTL_CHILD_PID" 2>/dev/null; then continue; fi
    break
  done
  _mtl_wait_pids "${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}"
  return "$rc"
}

_mtl_wait_pids() {
  # The launcher may end before its workers (a second TERM): do not end the job under them.
  local deadline=$((SECONDS + $1)) pid alive
  while [ -n "$MTL_TRAINING_PIDS" ] && [ "$SECONDS" -lt "$deadline" ]; do
    alive=
    for pid in $MTL_TRAINING_PIDS; do kill -0 "$pid" 2>/dev/null && alive="$alive $pid"; done
    [ -n "$alive" ] || return 0
    sleep 0.5
  done
}

mtl_finish() {
  # Report, requeue after USR1 if the trainer did not, and exit with a clear status.
  local rc=$1 stopped
  stopped=$(cat "$MTL_SIGNAL_FILE.stop" 2>/dev/null || true)
  rm -f "$MTL_SIGNAL_FILE" "$MTL_SIGNAL_FILE.stop"
  case $MTL_SIGNALLED in
    "")
      if [ "$rc" -eq 0 ]; then
        mtl_log "training finished (exit 0)"
      else
        mtl_log "training FAILED with exit status $rc (see the error above); not requeued"
      fi
      exit "$rc" ;;
    TERM)
      mtl_log "training ended (status $rc) while Slurm ends the job"
      exit "$MTL_PREEMPTED_EXIT" ;;
  esac
  mtl_log "training ended (launcher status $rc) after SIG$MTL_SIGNALLED"
  if [ -n "$stopped" ] && [ "$stopped" != preempted ]; then
    mtl_log "the run had ended ($stopped) before the signal took effect; not requeued"
    exit 0
  fi
  if [ "${MTL_REQUEUE:-1}" != 0 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    # Normally rank 0 already requeued the job and Slurm is ending this shell; when it did not,
    # do it here. A second request is refused by Slurm ("Job is pending execution").
    if scontrol requeue "$SLURM_JOB_ID" 2>/dev/null; then
      mtl_log "requeued job $SLURM_JOB_ID from the batch shell"
    fi
  fi
  exit "$MTL_PREEMPTED_EXIT"
}
