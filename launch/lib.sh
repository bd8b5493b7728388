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
    --queued) QUEUED=1 ;;
    --dry-run) DRY_RUN=1 ;;
    *) return 1 ;;
  esac
}

# tpu_check_common: validate the shared settings and build GFLAGS.
tpu_check_common() {
  require "$TPU_NAME" "TPU name: pass --name or set TPU_NAME"
  require "$ZONE" "zone: pass --zone or set ZONE"
  [[ -n $QR_ID ]] || QR_ID="$TPU_NAME-qr"
  GFLAGS=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then GFLAGS+=(--project="$PROJECT"); fi
  if [[ $DRY_RUN != 1 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH (install the Google Cloud SDK)"
  fi
}
