#!/usr/bin/env bash
# Delete a TPU VM slice, or the queued resource that owns it (all its slices).
#
# Usage: launch/tpu/delete.sh [flags]
#
#   --name NAME          TPU VM name                  (env TPU_NAME, required)
#   --zone ZONE          GCP zone                     (env ZONE, required)
#   --project PROJECT    GCP project                  (env PROJECT; default: gcloud config)
#   --queued             delete the queued resource (and its slice) (env QUEUED=1)
#   --qr-id ID           queued resource id           (env QR_ID; default NAME-qr)
#   --num-slices N       slices (env NUM_SLICES; default 1). N > 1 is a multislice queued
#                        resource: implies --queued, and deletes NAME-0 .. NAME-(N-1) with it
#   --dry-run            print the gcloud command instead of running it
#   -h, --help           show this help
#
# Does not prompt. Checkpoints in a mounted bucket survive; anything on the workers' disks is lost.
set -euo pipefail

# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"

tpu_env_defaults

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    *)
      tpu_common_flag "$@" || die "unknown flag: $1 (see --help)"
      shift "$NSHIFT" ;;
  esac
done

tpu_check_common
if [[ $QUEUED == 1 ]]; then
  # --force also deletes the slice the queued resource created.
  run gcloud compute tpus queued-resources delete "$QR_ID" "${GFLAGS[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GFLAGS[@]}" --quiet
fi
