#!/usr/bin/env bash
# Create a TPU VM slice for fmjax, or several slices joined by the data-center network (multislice).
#
# Usage: launch/tpu/create.sh [flags] [-- extra gcloud create flags]
#
#   --name NAME              TPU VM name                 (env TPU_NAME, required)
#   --zone ZONE              GCP zone                    (env ZONE, required)
#   --project PROJECT        GCP project                 (env PROJECT; default: gcloud config)
#   --accelerator-type TYPE  e.g. v5p-32, v6e-16, v4-8   (env ACCELERATOR_TYPE, required)
#   --runtime-version V      TPU VM image                (env RUNTIME_VERSION;
#                            default: derived from the accelerator type)
#   --queued                 create through a queued resource (env QUEUED=1)
#   --qr-id ID               queued resource id          (env QR_ID; default NAME-qr)
#   --num-slices N           slices of ACCELERATOR_TYPE  (env NUM_SLICES; default 1). N > 1 makes
#                            one multislice queued resource (implies --queued) whose nodes are
#                            NAME-0 .. NAME-(N-1)
#   --spot | --reserved      spot capacity / a reservation
#   --no-wait                queued mode: do not wait for the slice to be READY
#   --poll-interval SECONDS  queued mode: seconds between state checks (default 30)
#   --dry-run                print the gcloud commands instead of running them
#   -h, --help               show this help
#
# Plain mode runs `gcloud compute tpus tpu-vm create`, which returns once the
# slice exists. Queued mode runs `gcloud compute tpus queued-resources create
# --node-id NAME` and then polls until the queued resource is ACTIVE and the
# node is READY (a FAILED or SUSPENDED queued resource is an error). With
# --num-slices N > 1 it runs `gcloud compute tpus queued-resources create QR_ID
# --node-count N --node-prefix NAME` (gcloud names the nodes NAME-0 .. NAME-(N-1))
# and waits until every node is READY. Train across the slices with
# --config.mesh.dcn.data=N (or a dcn.fsdp split); see run.sh.
set -euo pipefail

# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"

tpu_env_defaults
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
CAPACITY=""
WAIT=1
POLL_INTERVAL=30
EXTRA=()

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --accelerator-type) need_value "$1" $#; ACCELERATOR_TYPE=$2; shift 2 ;;
    --runtime-version) need_value "$1" $#; RUNTIME_VERSION=$2; shift 2 ;;
    --spot|--reserved)
      [[ -z $CAPACITY || $CAPACITY == "$1" ]] || die "--spot and --reserved are mutually exclusive"
      CAPACITY=$1; shift ;;
    --no-wait) WAIT=0; shift ;;
    --poll-interval) need_value "$1" $#; POLL_INTERVAL=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *)
      tpu_common_flag "$@" || die "unknown flag: $1 (see --help)"
      shift "$NSHIFT" ;;
  esac
done

tpu_check_common
require "$ACCELERATOR_TYPE" "accelerator type: pass --accelerator-type or set ACCELERATOR_TYPE"
if [[ -z $RUNTIME_VERSION ]]; then
  RUNTIME_VERSION=$(tpu_default_runtime "$ACCELERATOR_TYPE") ||
    die "no default runtime for $ACCELERATOR_TYPE: pass --runtime-version or set RUNTIME_VERSION"
fi
[[ $POLL_INTERVAL =~ ^[0-9]+$ ]] || die "--poll-interval must be a number of seconds, got '$POLL_INTERVAL'"

CAP=()
if [[ -n $CAPACITY ]]; then CAP=("$CAPACITY"); fi

if [[ $QUEUED != 1 ]]; then
  run gcloud compute tpus tpu-vm create "$TPU_NAME" "${GFLAGS[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" \
    ${CAP[@]+"${CAP[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  exit 0
fi

NODES=("$TPU_NAME")
NODE_FLAGS=(--node-id="$TPU_NAME")
if (( NUM_SLICES > 1 )); then
  NODES=()
  for (( s = 0; s < NUM_SLICES; s++ )); do NODES+=("$TPU_NAME-$s"); done
  NODE_FLAGS=(--node-count="$NUM_SLICES" --node-prefix="$TPU_NAME")
fi
run gcloud compute tpus queued-resources create "$QR_ID" "${GFLAGS[@]}" \
  "${NODE_FLAGS[@]}" --accelerator-type="$ACCELERATOR_TYPE" \
  --runtime-version="$RUNTIME_VERSION" ${CAP[@]+"${CAP[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
[[ $WAIT == 1 ]] || exit 0

QR_STATE=(gcloud compute tpus queued-resources describe "$QR_ID" "${GFLAGS[@]}" --format 'value(state.state)')
# node_state NODE: sets NODE_STATE to the command that prints the node's state.
node_state() {
  NODE_STATE=(gcloud compute tpus tpu-vm describe "$1" "${GFLAGS[@]}" --format 'value(state)')
}
if [[ $DRY_RUN == 1 ]]; then
  # The polling loops below run these until ACTIVE and READY respectively.
  run "${QR_STATE[@]}"
  for node in "${NODES[@]}"; do
    node_state "$node"
    run "${NODE_STATE[@]}"
  done
  exit 0
fi

# wait_for WHAT WANT CMD...: poll CMD (which prints WHAT's state) until it prints WANT.
wait_for() {
  local what=$1 want=$2 state last=""
  shift 2
  while :; do
    state=$("$@" 2>/dev/null || true)
    if [[ $state != "$last" ]]; then
      printf '%s: %s state: %s\n' "$PROG" "$what" "${state:-unknown}" >&2
      last=$state
    fi
    case $state in
      "$want") return 0 ;;
      FAILED|SUSPENDED|SUSPENDING|DELETING)
        die "queued resource $QR_ID is $state (see: gcloud compute tpus queued-resources describe $QR_ID --zone=$ZONE)" ;;
    esac
    sleep "$POLL_INTERVAL"
  done
}

wait_for "$QR_ID" ACTIVE "${QR_STATE[@]}"
for node in "${NODES[@]}"; do
  node_state "$node"
  wait_for "$node" READY "${NODE_STATE[@]}"
done
if (( NUM_SLICES > 1 )); then
  printf '%s: %s-0 .. %s-%d (%d slices) are READY\n' "$PROG" "$TPU_NAME" "$TPU_NAME" $(( NUM_SLICES - 1 )) \
    "$NUM_SLICES" >&2
else
  printf '%s: %s is READY\n' "$PROG" "$TPU_NAME" >&2
fi
