# shellcheck shell=bash
# Shared helpers for the fmjax launchers. Sourced, never executed.
# Written for bash >= 3.2 (the macOS system bash): no associative arrays,
# no mapfile, and empty arrays are expanded as ${a[@]+"${a[@]}"}.

PROG=${PROG:-$(basename "$0")}
DRY_RUN=${DRY_RUN:-0}

# die MESSAGE: one-line error on stderr, exit 2.
die() {
  printf '%s: error: %s\n' "$PROG" "$*" >&2
  exit 2
}

# quote ARG: sets QUOTED to ARG quoted for a POSIX shell (plain when safe).
quote() {
  local s=$1 sq="'" esc="'\\''"
  if [[ -n $s && $s != *[!A-Za-z0-9_./:=@%+,-]* ]]; then
    QUOTED=$s
  else
    QUOTED="'${s//$sq/$esc}'"
  fi
}

# join_quoted ARG...: sets JOINED to the args quoted and joined by spaces.
join_quoted() {
  local a
  JOINED=""
  for a in "$@"; do
    quote "$a"
    JOINED+="${JOINED:+ }$QUOTED"
  done
}

# run CMD...: in dry-run mode print "+ CMD" on stdout; otherwise echo it on
# stderr and run it.
run() {
  join_quoted "$@"
  if [[ $DRY_RUN == 1 ]]; then
    printf '+ %s\n' "$JOINED"
  else
    printf '+ %s\n' "$JOINED" >&2
    "$@"
  fi
}

# need_value FLAG ARGC: die unless the flag was given a value.
need_value() {
  [[ $2 -ge 2 ]] || die "$1 needs a value"
}

# require VALUE "--flag or ENV": die naming the flag/env var when VALUE is empty.
require() {
  [[ -n $1 ]] || die "missing $2"
}

# split_eq ARG...: sets ARGS to the args with every --flag=value before "--"
# split into --flag value, so parsers only handle the spaced form.
split_eq() {
  local a seen_sep=0
  ARGS=()
  for a in "$@"; do
    if [[ $seen_sep == 0 && $a == --*=* ]]; then
      ARGS+=("${a%%=*}" "${a#*=}")
    else
      [[ $a == -- ]] && seen_sep=1
      ARGS+=("$a")
    fi
  done
}

# dcn_product ARG...: read the --config.mesh.dcn.AXIS=K (or --config.mesh.dcn.AXIS K) overrides in
# a train command line. Sets DCN_PRODUCT to the product of the K (1 without any; an axis given twice
# counts once, its last value, as fmjax's flags parse it) and DCN_AXES to them ("data=2 fsdp=2",
# empty without any). Dies on a K that is not a positive integer.
dcn_product() {
  local a key val k seen=" "
  local -a keys=() vals=()
  while [[ $# -gt 0 ]]; do
    a=$1
    shift
    [[ $a == --config.mesh.dcn.?* ]] || continue
    if [[ $a == *=* ]]; then
      key=${a%%=*} val=${a#*=}
    else
      key=$a val=${1-}
      if [[ $# -gt 0 ]]; then shift; fi
    fi
    key=${key#--config.mesh.dcn.}
    [[ $val =~ ^[1-9][0-9]*$ ]] || die "--config.mesh.dcn.$key must be a positive integer, got '$val'"
    keys+=("$key")
    vals+=("$val")
  done
  DCN_PRODUCT=1
  DCN_AXES=""
  for (( k = ${#keys[@]} - 1; k >= 0; k-- )); do
    [[ $seen != *" ${keys[k]} "* ]] || continue
    seen+="${keys[k]} "
    DCN_PRODUCT=$(( DCN_PRODUCT * 10#${vals[k]} ))
    DCN_AXES="${keys[k]}=${vals[k]}${DCN_AXES:+ }$DCN_AXES"
  done
}

# usage: print the comment block after the shebang of the script ($0).
usage() {
  awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# ---------------------------------------------------------------- TPU helpers

# tpu_workers ACCELERATOR_TYPE: print the number of TPU VM hosts (workers).
#   v2/v3/v4/v5p-N: N TensorCores, 8 per host.
#   v5litepod-N / v5e-N / v6e-N: N chips; up to 8 chips on one host, else 4 per host.
tpu_workers() {
  local t=$1 n
  n=${t##*-}
  [[ $n =~ ^[0-9]+$ && $n -gt 0 ]] || return 1
  case $t in
    v2-*|v3-*|v4-*|v5p-*) if (( n <= 8 )); then echo 1; else echo $(( n / 8 )); fi ;;
    v5litepod-*|v5e-*|v6e-*) if (( n <= 8 )); then echo 1; else echo $(( n / 4 )); fi ;;
    *) return 1 ;;
  esac
}

# tpu_default_runtime ACCELERATOR_TYPE: print the recommended TPU VM image.
tpu_default_runtime() {
  case $1 in
    v6e-*) echo v2-alpha-tpuv6e ;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base ;;
    *) return 1 ;;
  esac
}

# tpu_env_defaults: read the shared settings from the environment.
tpu_env_defaults() {
  TPU_NAME=${TPU_NAME:-}
  ZONE=${ZONE:-}
  PROJECT=${PROJECT:-}
  QUEUED=${QUEUED:-0}
  QR_ID=${QR_ID:-}
  NUM_SLICES=${NUM_SLICES:-1}
}

# tpu_common_flag ARG...: handle a flag shared by all TPU scripts. Sets
# NSHIFT to the number of args consumed, or returns 1 if ARG is not one.
tpu_common_flag() {
  NSHIFT=1
  case $1 in
    --name) need_value "$1" $#; TPU_NAME=$2; NSHIFT=$((NSHIFT + 1)) ;;
    --zone) need_value "$1" $#; ZONE=$2; NSHIFT=$((NSHIFT + 1)) ;;
    --project) need_value "$1" $#; PROJECT=$2; NSHIFT=$((NSHIFT + 1)) ;;
    --qr-id) need_value "$1" $#; QR_ID=$2; NSHIFT=$((NSHIFT + 1)) ;;
    --num-slices) need_value "$1" $#; NUM_SLICES=$2; NSHIFT=$((NSHIFT + 1)) ;;
    --queued) QUEUED=1 ;;
    --dry-run) DRY_RUN=1 ;;
    *) return 1 ;;
  esac
}

# tpu_check_common: validate the shared settings and build GFLAGS. More than one slice
# (--num-slices N > 1) is a multislice queued resource, so it implies --queued; its nodes are
# NAME-0 .. NAME-(N-1) (gcloud's --node-prefix NAME).
tpu_check_common() {
  require "$TPU_NAME" "TPU name: pass --name or set TPU_NAME"
  require "$ZONE" "zone: pass --zone or set ZONE"
  [[ $NUM_SLICES =~ ^[1-9][0-9]*$ ]] || die "--num-slices must be a positive integer, got '$NUM_SLICES'"
  if (( NUM_SLICES > 1 )); then QUEUED=1; fi
  [[ -n $QR_ID ]] || QR_ID="$TPU_NAME-qr"
  GFLAGS=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then GFLAGS+=(--project="$PROJECT"); fi
  if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH (install the Google Cloud SDK)"
  fi
}

# tpu_ssh_base SSH_OPTS...: sets SSH to the gcloud ssh command without its target flags and
# SSH_ALL to the flags that address every worker: one slice `tpu-vm ssh NAME ... --worker=all`;
# several `queued-resources ssh QR_ID ... --node=all --worker=all` (every worker of every slice).
# ssh_one S I sets SSH_ONE to the flags for worker I of slice S. (Both set variables the sourcing
# script reads, hence the SC2034 exemptions.)
# shellcheck disable=SC2034
tpu_ssh_base() {
  if (( NUM_SLICES > 1 )); then
    SSH=(gcloud compute tpus queued-resources ssh "$QR_ID" "${GFLAGS[@]}" "$@")
    SSH_ALL=(--node=all --worker=all)
  else
    SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" "$@")
    SSH_ALL=(--worker=all)
  fi
}
# shellcheck disable=SC2034
ssh_one() {
  if (( NUM_SLICES > 1 )); then SSH_ONE=(--node="$1" --worker="$2"); else SSH_ONE=(--worker="$2"); fi
}
