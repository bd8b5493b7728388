#!/usr/bin/env bash
# Run one command on every worker of a TPU VM slice (JAX multi-controller), detached.
#
# Usage: launch/tpu/run.sh [flags] -- <command ...>
#        launch/tpu/run.sh [flags] --attach | --stop
#   e.g. launch/tpu/run.sh --name my-tpu --zone us-east5-a -- \
#          python -m fmjax.train --config configs/llama_1b.py --workdir /mnt/bucket/run1
#
#   --name NAME          TPU VM name                  (env TPU_NAME, required)
#   --zone ZONE          GCP zone                     (env ZONE, required)
#   --project PROJECT    GCP project                  (env PROJECT; default: gcloud config)
#   --num-workers N      number of TPU VM hosts       (env NUM_WORKERS; default: derived
#                        from --accelerator-type / ACCELERATOR_TYPE, e.g. v5p-32 -> 4,
#                        v5litepod-16 -> 4)
#   --accelerator-type T e.g. v5p-32, v6e-16, v5litepod-8 (env ACCELERATOR_TYPE)
#   --remote-dir DIR     dir the command runs in on the workers, relative to $HOME
#                        (env REMOTE_DIR; default fmjax, where setup.sh put the code and .venv)
#   --log-dir DIR        local log dir                (env LOG_DIR; default logs/NAME)
#   --internal-ip        ssh to the workers' internal IPs (from a VM in the same VPC)
#   --tunnel-through-iap ssh through Identity-Aware Proxy (workers without external IPs)
#   --no-kill            do not free the TPU from stale processes first
#   --attach             stream the logs of the run already started (after a closed terminal)
#   --stop               stop the run on every worker (SIGTERM: fmjax saves a checkpoint and exits)
#   --dry-run            print the commands instead of running them
#   -h, --help           show this help
#
# 1. Free the TPU on every worker: the processes holding its device files
#    (`lsof /dev/accel* /dev/vfio/*`: whatever program they are) get SIGTERM, and
#    SIGKILL after 30 s; then /tmp/libtpu_lockfile, which a killed run leaves
#    behind ("TPU in use"), is removed.
# 2. Start the command on every worker, detached from ssh (setsid nohup, in the
#    venv that setup.sh made): closing this terminal, Ctrl-C or a dropped
#    connection leaves the run going. Its output goes to ~/fmjax-run/log on each
#    worker; its exit code to ~/fmjax-run/rc.
# 3. Stream each worker's log into LOG_DIR/worker-I.log (tail -F over ssh) until
#    its process ends. When a worker fails, every worker is stopped (--stop) and
#    run.sh exits 1 naming it. Ctrl-C detaches; --attach streams again.

# The remote snippets below are single-quoted on purpose: they expand on the workers.
# shellcheck disable=SC2016
set -euo pipefail

# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"

tpu_env_defaults
NUM_WORKERS=${NUM_WORKERS:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
REMOTE_DIR=${REMOTE_DIR:-fmjax}
LOG_DIR=${LOG_DIR:-}
KILL=1
MODE=start
SSH_OPTS=()
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
    --internal-ip|--tunnel-through-iap) SSH_OPTS+=("$1"); shift ;;
    --no-kill) KILL=0; shift ;;
    --attach) MODE=attach; shift ;;
    --stop) MODE=stop; shift ;;
    --) shift; CMD=("$@"); break ;;
    *)
      tpu_common_flag "$@" || die "unknown flag: $1 (see --help)"
      shift "$NSHIFT" ;;
  esac
done

tpu_check_common
if [[ $MODE == start ]]; then
  [[ ${#CMD[@]} -gt 0 ]] || die "missing command: run.sh [flags] -- <command ...>"
elif [[ ${#CMD[@]} -gt 0 ]]; then
  die "--$MODE takes no command"
fi
if [[ -z $NUM_WORKERS ]]; then
  require "$ACCELERATOR_TYPE" "worker count: pass --num-workers (or set NUM_WORKERS) or --accelerator-type (or set ACCELERATOR_TYPE)"
  NUM_WORKERS=$(tpu_workers "$ACCELERATOR_TYPE") ||
    die "cannot derive the worker count from '$ACCELERATOR_TYPE': pass --num-workers or set NUM_WORKERS"
fi
[[ $NUM_WORKERS =~ ^[1-9][0-9]*$ ]] || die "--num-workers must be a positive integer, got '$NUM_WORKERS'"
[[ -n $LOG_DIR ]] || LOG_DIR="logs/$TPU_NAME"

SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" ${SSH_OPTS[@]+"${SSH_OPTS[@]}"})
RUN_DIR='$HOME/fmjax-run'   # expanded on the workers

HOLDERS='pids=$(sudo lsof -t /dev/accel* /dev/vfio/[0-9]* 2>/dev/null | sort -u | tr "\n" " ")'
FREE="$HOLDERS; if [ -n \"\$pids\" ]; then echo \"freeing the TPU from pids \$pids\"; sudo kill -TERM \$pids;"
FREE+=' for _ in $(seq 30); do sudo kill -0 $pids 2>/dev/null || break; sleep 1; done;'
FREE+=' sudo kill -KILL $pids 2>/dev/null || true; fi; sudo rm -f /tmp/libtpu_lockfile'
STOP="if [ -f $RUN_DIR/pid ]; then p=\$(cat $RUN_DIR/pid); kill -TERM -- -\$p 2>/dev/null || true;"
STOP+=' for _ in $(seq 60); do kill -0 -- -$p 2>/dev/null || break; sleep 1; done;'
STOP+=' kill -KILL -- -$p 2>/dev/null || true; fi'
# Follow the log until the run's process ends, then exit with its exit code.
FOLLOW="tail -n +1 -F --pid=\$(cat $RUN_DIR/pid) $RUN_DIR/log 2>/dev/null; exit \$(cat $RUN_DIR/rc 2>/dev/null || echo 255)"

stop_all() {
  run "${SSH[@]}" --worker=all --command "$STOP"
}

if [[ $MODE == stop ]]; then
  stop_all
  exit 0
fi

if [[ $MODE == start ]]; then
  if [[ $KILL == 1 ]]; then
    run "${SSH[@]}" --worker=all --command "$FREE"
  fi
  quote "$REMOTE_DIR"
  DIR=$QUOTED
  join_quoted "${CMD[@]}"
  # The wrapper outlives a --stop (SIGTERM to the whole process group) to record the exit code.
  quote "trap : TERM; cd $DIR && . .venv/bin/activate && $JOINED; echo \$? > $RUN_DIR/rc"
  START="mkdir -p $RUN_DIR && rm -f $RUN_DIR/rc && (setsid nohup bash -c $QUOTED"
  START+=" > $RUN_DIR/log 2>&1 < /dev/null & echo \$! > $RUN_DIR/pid)"
  run "${SSH[@]}" --worker=all --command "$START"
fi

run mkdir -p "$LOG_DIR"
PIDS=()
for (( i = 0; i < NUM_WORKERS; i++ )); do
  LOG="$LOG_DIR/worker-$i.log"
  join_quoted "${SSH[@]}" --worker="$i" --command "$FOLLOW"
  quote "$LOG"
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s > %s 2>&1 &\n' "$JOINED" "$QUOTED"
  else
    printf '+ %s > %s 2>&1 &\n' "$JOINED" "$QUOTED" >&2
    "${SSH[@]}" --worker="$i" --command "$FOLLOW" </dev/null >"$LOG" 2>&1 &
    PIDS+=("$!")
  fi
done
if [[ $DRY_RUN == 1 ]]; then
  echo "+ wait"
  exit 0
fi

detach() {
  kill ${PIDS[@]+"${PIDS[@]}"} 2>/dev/null || true
  printf '%s: detached; the run goes on. Follow: %s --attach; stop: %s --stop (same --name/--zone)\n' \
    "$PROG" "$0" "$0" >&2
  exit 130
}
trap detach INT
trap 'kill ${PIDS[@]+"${PIDS[@]}"} 2>/dev/null; exit 129' HUP TERM

printf '%s: %d workers running (detached); follow with: tail -f %s/worker-0.log\n' "$PROG" "$NUM_WORKERS" \
  "$LOG_DIR" >&2
# Wait for the streams; the first worker that fails stops all of them.
FAILED=""
LEFT=$NUM_WORKERS
EXITED=()
while (( LEFT > 0 )); do
  for (( i = 0; i < NUM_WORKERS; i++ )); do
    [[ -z ${EXITED[$i]:-} ]] || continue
    kill -0 "${PIDS[$i]}" 2>/dev/null && continue
    if wait "${PIDS[$i]}"; then rc=0; else rc=$?; fi
    EXITED[i]=$rc
    LEFT=$(( LEFT - 1 ))
    if [[ $rc != 0 && -z $FAILED ]]; then
      FAILED=$i
      printf '%s: worker %d failed (exit %d), see %s/worker-%d.log; stopping every worker\n' \
        "$PROG" "$i" "$rc" "$LOG_DIR" "$i" >&2
      stop_all || true
    fi
  done
  (( LEFT == 0 )) || sleep 1
done
[[ -z $FAILED ]] || exit 1
printf '%s: all %d workers finished\n' "$PROG" "$NUM_WORKERS" >&2
