#!/usr/bin/env bash
# Run one command on every worker of a TPU VM slice, or of every slice of a multislice queued
# resource (JAX multi-controller), detached.
#
# Usage: launch/tpu/run.sh [flags] -- <command ...>
#        launch/tpu/run.sh [flags] --attach | --stop
#   e.g. launch/tpu/run.sh --name my-tpu --zone us-east5-a -- \
#          python -m fmjax.train --config configs/llama_1b.py --workdir /mnt/bucket/run1
#        launch/tpu/run.sh --name my-tpu --zone us-east5-a --num-slices 2 -- \
#          python -m fmjax.train --config configs/llama_1b.py --config.mesh.dcn.data=2 --workdir gs://b/run1
#
#   --name NAME          TPU VM name (the node prefix with --num-slices > 1) (env TPU_NAME, required)
#   --zone ZONE          GCP zone                     (env ZONE, required)
#   --project PROJECT    GCP project                  (env PROJECT; default: gcloud config)
#   --num-slices N       slices of the multislice queued resource (env NUM_SLICES; default 1):
#                        nodes NAME-0 .. NAME-(N-1), all reached through one
#                        `gcloud compute tpus queued-resources ssh QR_ID --node=all --worker=all`
#   --qr-id ID           queued resource id, with --num-slices > 1 (env QR_ID; default NAME-qr)
#   --megascale-port P   with --num-slices > 1: MEGASCALE_PORT where the runtime sets none
#                        (env MEGASCALE_PORT; default 8081)
#   --num-workers N      TPU VM hosts per slice       (env NUM_WORKERS; default: derived
#                        from --accelerator-type / ACCELERATOR_TYPE, e.g. v5p-32 -> 4,
#                        v5litepod-16 -> 4)
#   --accelerator-type T e.g. v5p-32, v6e-16, v5litepod-8 (env ACCELERATOR_TYPE; of one slice)
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
# 3. Stream each worker's log into LOG_DIR/worker-I.log (LOG_DIR/slice-S-worker-I.log
#    with several slices; tail -F over ssh) until its process ends. When a worker
#    of any slice fails, every worker is stopped (--stop) and run.sh exits 1 naming it.
#    Ctrl-C detaches; --attach streams again.
#
# Multislice (--num-slices N > 1): JAX and libtpu find the slices through MEGASCALE_*
# variables, which a multislice queued resource puts in each worker's `tpu-env` metadata.
# Where that metadata has no MEGASCALE_COORDINATOR_ADDRESS, each worker exports
#   MEGASCALE_COORDINATOR_ADDRESS  slice 0 worker 0's internal IP (`tpu-vm describe NAME-0`):PORT
#   MEGASCALE_NUM_SLICES           N
#   MEGASCALE_SLICE_ID             S, from the NODE_ID (NAME-S) in its tpu-env metadata
#   MEGASCALE_PORT                 PORT (--megascale-port, default 8081)
# before the command. A train command without a --config.mesh.dcn.AXIS=K override gets a
# warning (the mesh would not span the slices); overrides whose K multiply to another
# number than N are an error.

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
MEGASCALE_PORT=${MEGASCALE_PORT:-8081}
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
    --megascale-port) need_value "$1" $#; MEGASCALE_PORT=$2; shift 2 ;;
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
if (( NUM_SLICES > 1 )); then
  if [[ ! $MEGASCALE_PORT =~ ^[1-9][0-9]{0,4}$ ]] || (( MEGASCALE_PORT > 65535 )); then
    die "--megascale-port must be a port in 1..65535, got '$MEGASCALE_PORT'"
  fi
  if [[ $MODE == start ]]; then
    dcn_product "${CMD[@]}"
    if [[ -z $DCN_AXES ]]; then
      printf '%s: warning: %d slices but the command sets no --config.mesh.dcn.AXIS override: the mesh will not span the slices (add e.g. --config.mesh.dcn.data=%d)\n' \
        "$PROG" "$NUM_SLICES" "$NUM_SLICES" >&2
    elif (( DCN_PRODUCT != NUM_SLICES )); then
      die "the --config.mesh.dcn overrides ($DCN_AXES) multiply to $DCN_PRODUCT, but there are $NUM_SLICES slices (--num-slices)"
    fi
  fi
fi

tpu_ssh_base ${SSH_OPTS[@]+"${SSH_OPTS[@]}"}
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

# ms_env HOST:PORT: print the remote prelude (ending in "&& ") that exports the MEGASCALE_*
# variables on a worker whose tpu-env metadata has no MEGASCALE_COORDINATOR_ADDRESS (the runtime
# of a multislice queued resource normally sets them there). The slice id comes from the node id
# NAME-S in that metadata; a worker that cannot tell its slice fails before the command starts.
ms_env() {
  local md='http://metadata.google.internal/computeMetadata/v1/instance/attributes/tpu-env'
  local v="MEGASCALE_COORDINATOR_ADDRESS=$1 MEGASCALE_NUM_SLICES=$NUM_SLICES MEGASCALE_PORT=$MEGASCALE_PORT"
  printf '%s' "{ e=\$(curl -s -m 10 -H \"Metadata-Flavor: Google\" $md 2>/dev/null);"
  printf '%s' " if printf \"%s\\n\" \"\$e\" | grep -q \"^MEGASCALE_COORDINATOR_ADDRESS:\"; then :; else"
  printf '%s' " s=\$(printf \"%s\\n\" \"\$e\" | sed -n \"s/^NODE_ID: *//p\" | tr -d \"\\047 \"); s=\${s#$TPU_NAME-};"
  printf '%s' " case \$s in \"\"|*[!0-9]*) echo \"run.sh: no slice id for this worker: no NODE_ID $TPU_NAME-S in its tpu-env metadata\" >&2; false ;;"
  printf '%s' " *) export $v MEGASCALE_SLICE_ID=\$s ;; esac; fi; } && "
}

stop_all() {
  run "${SSH[@]}" "${SSH_ALL[@]}" --command "$STOP"
}

if [[ $MODE == stop ]]; then
  stop_all
  exit 0
fi

if [[ $MODE == start ]]; then
  if [[ $KILL == 1 ]]; then
    run "${SSH[@]}" "${SSH_ALL[@]}" --command "$FREE"
  fi
  quote "$REMOTE_DIR"
  DIR=$QUOTED
  ENV_PRE=""
  if (( NUM_SLICES > 1 )); then
    # Slice 0 worker 0's internal address: the megascale (and JAX) coordinator.
    COORD_CMD=(gcloud compute tpus tpu-vm describe "$TPU_NAME-0" "${GFLAGS[@]}"
      --format 'value(networkEndpoints[0].ipAddress)')
    if [[ $DRY_RUN == 1 ]]; then
      run "${COORD_CMD[@]}"
      COORD_IP=SLICE0_WORKER0_IP
    else
      COORD_IP=$(run "${COORD_CMD[@]}") || die "could not read $TPU_NAME-0's address (is --num-slices right?)"
      [[ $COORD_IP =~ ^[0-9A-Fa-f:.]+$ ]] || die "no internal IP for worker 0 of $TPU_NAME-0, got '$COORD_IP'"
    fi
    ENV_PRE=$(ms_env "$COORD_IP:$MEGASCALE_PORT")
  fi
  join_quoted "${CMD[@]}"
  # The wrapper outlives a --stop (SIGTERM to the whole process group) to record the exit code.
  quote "trap : TERM; cd $DIR && . .venv/bin/activate && $ENV_PRE$JOINED; echo \$? > $RUN_DIR/rc"
  START="mkdir -p $RUN_DIR && rm -f $RUN_DIR/rc && (setsid nohup bash -c $QUOTED"
  START+=" > $RUN_DIR/log 2>&1 < /dev/null & echo \$! > $RUN_DIR/pid)"
  run "${SSH[@]}" "${SSH_ALL[@]}" --command "$START"
fi

run mkdir -p "$LOG_DIR"
# One stream per worker of every slice; stream K is worker K % NUM_WORKERS of slice K / NUM_WORKERS.
TOTAL=$(( NUM_SLICES * NUM_WORKERS ))
# name_of K: sets WHO ("worker I" or "slice S worker I") and LOG for stream K.
name_of() {
  local s=$(( $1 / NUM_WORKERS )) i=$(( $1 % NUM_WORKERS ))
  if (( NUM_SLICES > 1 )); then
    WHO="slice $s worker $i" LOG="$LOG_DIR/slice-$s-worker-$i.log"
  else
    WHO="worker $i" LOG="$LOG_DIR/worker-$i.log"
  fi
  ssh_one "$s" "$i"
}
PIDS=()
for (( k = 0; k < TOTAL; k++ )); do
  name_of "$k"
  join_quoted "${SSH[@]}" "${SSH_ONE[@]}" --command "$FOLLOW"
  quote "$LOG"
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s > %s 2>&1 &\n' "$JOINED" "$QUOTED"
  else
    printf '+ %s > %s 2>&1 &\n' "$JOINED" "$QUOTED" >&2
    "${SSH[@]}" "${SSH_ONE[@]}" --command "$FOLLOW" </dev/null >"$LOG" 2>&1 &
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

name_of 0
if (( NUM_SLICES > 1 )); then
  printf '%s: %d slices x %d workers running (detached); follow with: tail -f %s\n' "$PROG" "$NUM_SLICES" \
    "$NUM_WORKERS" "$LOG" >&2
else
  printf '%s: %d workers running (detached); follow with: tail -f %s\n' "$PROG" "$NUM_WORKERS" "$LOG" >&2
fi
# Wait for the streams; the first worker (of any slice) that fails stops all of them.
FAILED=""
LEFT=$TOTAL
EXITED=()
while (( LEFT > 0 )); do
  for (( k = 0; k < TOTAL; k++ )); do
    [[ -z ${EXITED[$k]:-} ]] || continue
    kill -0 "${PIDS[$k]}" 2>/dev/null && continue
    if wait "${PIDS[$k]}"; then rc=0; else rc=$?; fi
    EXITED[k]=$rc
    LEFT=$(( LEFT - 1 ))
    if [[ $rc != 0 && -z $FAILED ]]; then
      FAILED=$k
      name_of "$k"
      printf '%s: %s failed (exit %d), see %s; stopping every worker\n' "$PROG" "$WHO" "$rc" "$LOG" >&2
      stop_all || true
    fi
  done
  (( LEFT == 0 )) || sleep 1
done
[[ -z $FAILED ]] || exit 1
if (( NUM_SLICES > 1 )); then
  printf '%s: all %d workers of %d slices finished\n' "$PROG" "$TOTAL" "$NUM_SLICES" >&2
else
  printf '%s: all %d workers finished\n' "$PROG" "$NUM_WORKERS" >&2
fi
