#!/usr/bin/env bash
# Run one command on every worker of a TPU VM slice (JAX multi-controller).
#
# Usage: launch/tpu/run.sh [flags] -- <command ...>
#   e.g. launch/tpu/run.sh --name my-tpu --zone us-east5-a -- \
#          python3 -m fmjax.train --config configs/default.py --workdir gs://bucket/run1
#
#   --name NAME          TPU VM name                  (env TPU_NAME, required)
#   --zone ZONE          GCP zone                     (env ZONE, required)
#   --project PROJECT    GCP project                  (env PROJECT; default: gcloud config)
#   --num-workers N      number of TPU VM hosts       (env NUM_WORKERS; default: derived
#                        from --accelerator-type / ACCELERATOR_TYPE, e.g. v5p-32 -> 4)
#   --accelerator-type T e.g. v5p-32, v6e-16          (env ACCELERATOR_TYPE)
#   --remote-dir DIR     dir the command runs in on the workers, relative to $HOME
#                        (env REMOTE_DIR; default fmjax, where setup.sh put the code)
#   --log-dir DIR        local log dir                (env LOG_DIR; default logs/NAME)
#   --no-kill            do not kill stale training processes first
#   --dry-run            print the commands instead of running them
#   -h, --help           show this help
#
# First, on all workers: kill stale fmjax training processes (pkill -f
# 'fmjax.train' / 'fmjax-train') and remove /tmp/libtpu_lockfile, which a killed
# run leaves behind and which makes the next one fail with "TPU in use".
# Then one `gcloud compute tpus tpu-vm ssh --worker=I` per worker, in parallel,
# each streaming its output into LOG_DIR/worker-I.log. Waits for all of them and
# exits non-zero if any worker failed. Ctrl-C stops the local ssh sessions (the
# next run.sh kills whatever is left on the workers). The run lives as long as
# this script: start it from tmux/screen or a small VM for long jobs.
set -euo pipefail

# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"

tpu_env_defaults
NUM_WORKERS=${NUM_WORKERS:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
REMOTE_DIR=${REMOTE_DIR:-fmjax}
LOG_DIR=${LOG_DIR:-}
KILL=1
CMD=()

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --num-workers) need_value "$1" $#; NUM_WORKERS=$2; shift 2 ;;
    --accelerator-type) need_value "$1" $#; ACCELERATOR_TYPE=$2; shift 2 ;;
    --remote-dir) need_value "$1" $#; REMOTE_DIR=$2; shift 2 ;;
    --log-dir) need_value "$1" $#; LOG_DIR=$2; shift 2 ;;
    --no-kill) KILL=0; shift ;;
    --) shift; CMD=("$@"); break ;;
    *)
      tpu_common_flag "$@" || die "unknown flag: $1 (see --help)"
      shift "$NSHIFT" ;;
  esac
done

tpu_check_common
[[ ${#CMD[@]} -gt 0 ]] || die "missing command: run.sh [flags] -- <command ...>"
if [[ -z $NUM_WORKERS ]]; then
  require "$ACCELERATOR_TYPE" "worker count: pass --num-workers (or set NUM_WORKERS) or --accelerator-type (or set ACCELERATOR_TYPE)"
  NUM_WORKERS=$(tpu_workers "$ACCELERATOR_TYPE") ||
    die "cannot derive the worker count from '$ACCELERATOR_TYPE': pass --num-workers or set NUM_WORKERS"
fi
[[ $NUM_WORKERS =~ ^[1-9][0-9]*$ ]] || die "--num-workers must be a positive integer, got '$NUM_WORKERS'"
[[ -n $LOG_DIR ]] || LOG_DIR="logs/$TPU_NAME"

SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}")

if [[ $KILL == 1 ]]; then
  # The [f] keeps pkill from matching the remote shell running this very command.
  run "${SSH[@]}" --worker=all --command \
    "pkill -9 -f '[f]mjax[.-]train' || true; sudo rm -f /tmp/libtpu_lockfile"
fi

quote "$REMOTE_DIR"
DIR=$QUOTED
join_quoted "${CMD[@]}"
REMOTE="cd $DIR && $JOINED"

run mkdir -p "$LOG_DIR"
PIDS=()
if [[ $DRY_RUN != 1 ]]; then
  trap 'kill ${PIDS[@]+"${PIDS[@]}"} 2>/dev/null; exit 130' INT TERM
fi
for (( i = 0; i < NUM_WORKERS; i++ )); do
  LOG="$LOG_DIR/worker-$i.log"
  join_quoted "${SSH[@]}" --worker="$i" --command "$REMOTE"
  quote "$LOG"
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s > %s 2>&1 &\n' "$JOINED" "$QUOTED"
  else
    printf '+ %s > %s 2>&1 &\n' "$JOINED" "$QUOTED" >&2
    "${SSH[@]}" --worker="$i" --command "$REMOTE" </dev/null >"$LOG" 2>&1 &
    PIDS+=("$!")
  fi
done
if [[ $DRY_RUN == 1 ]]; then
  echo "+ wait"
  exit 0
fi

printf '%s: %d workers started; follow with: tail -f %s/worker-0.log\n' "$PROG" "$NUM_WORKERS" "$LOG_DIR" >&2
FAILED=0
for (( i = 0; i < NUM_WORKERS; i++ )); do
  if wait "${PIDS[$i]}"; then
    rc=0
  else
    rc=$?
  fi
  if [[ $rc != 0 ]]; then
    printf '%s: worker %d failed (exit %d), see %s/worker-%d.log\n' "$PROG" "$i" "$rc" "$LOG_DIR" "$i" >&2
    FAILED=1
  fi
done
[[ $FAILED == 0 ]] || exit 1
printf '%s: all %d workers finished\n' "$PROG" "$NUM_WORKERS" >&2
