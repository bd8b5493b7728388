#!/usr/bin/env bash
# Create a TPU VM slice for fmjax.
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
#   --spot | --reserved      spot capacity / a reservation
#   --no-wait                queued mode: do not wait for the slice to be READY
#   --poll-interval SECONDS  queued mode: seconds between state checks (default 30)
#   --dry-run                print the gcloud commands instead of running them
#   -h, --help               show this help
#
# Plain mode runs `gcloud compute tpus tpu-vm create`, which returns once the
# slice exists. Queued mode runs `gcloud compute tpus queued-resources create
# --node-id NAME` and then polls until the queued resource is ACTIVE and the
# node is READY (a FAILED or SUSPENDED queued resource is an error).
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

run gcloud compute tpus queued-resources create "$QR_ID" "${GFLAGS[@]}" \
  --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
  --runtime-version="$RUNTIME_VERSION" ${CAP[@]+"${CAP[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
[[ $WAIT == 1 ]] || exit 0

QR_STATE=(gcloud compute tpus queued-resources describe "$QR_ID" "${GFLAGS[@]}" --format 'value(state.state)')
NODE_STATE=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GFLAGS[@]}" --format 'value(state)')
if [[ $DRY_RUN == 1 ]]; then
  # The polling loops below run these until ACTIVE and READY respectively.
  run "${QR_STATE[@]}"
  run "${NODE_STATE[@]}"
  exit 0
fi

# wait_for WANT CMD...: poll CMD (which prints a state) until it prints WANT.
wait_for() {
  local want=$1 state last=""
  shift
  while :; do
    state=$("$@" 2>/dev/null || true)
    if [[ $state != "$last" ]]; then
      printf '%s: %s state: %s\n' "$PROG" "$TPU_NAME" "${state:-unknown}" >&2
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

wait_for ACTIVE "${QR_STATE[@]}"
wait_for READY "${NODE_STATE[@]}"
printf '%s: %s is READY\n' "$PROG" "$TPU_NAME" >&2
