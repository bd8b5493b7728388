#!/usr/bin/env bash
# Generic multi-node launcher (torchrun-style): run it once on every node with
# the same arguments, NODE_RANK differing.
#
# Usage: launch/multinode.sh [flags] -- <fmjax.train args>
#   e.g. on node 0 of 2 (10.0.0.1) and node 1:
#     NNODES=2 NODE_RANK=0 COORDINATOR=10.0.0.1:12345 launch/multinode.sh -- --config configs/default.py --workdir /shared/run1
#     NNODES=2 NODE_RANK=1 COORDINATOR=10.0.0.1:12345 launch/multinode.sh -- --config configs/default.py --workdir /shared/run1
#
#   --nnodes N           number of nodes = JAX processes  (env NNODES; default 1)
#   --node-rank R        this node's rank, 0..N-1          (env NODE_RANK; default 0)
#   --coordinator H:P    rank 0's address and a free port  (env COORDINATOR; required if N > 1)
#   --dry-run            print the command instead of running it
#   -h, --help           show this help
#
# Exports FMJAX_COORDINATOR=H:P, FMJAX_NUM_PROCESSES=N, FMJAX_PROCESS_ID=R and
# execs `$PYTHON -m fmjax.train ARGS` (PYTHON defaults to python). With N = 1 and
# no coordinator it runs plain single-process training.
set -euo pipefail

# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
COORDINATOR=${COORDINATOR:-}
PYTHON=${PYTHON:-python}
FMJAX_ARGS=()

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --nnodes) need_value "$1" $#; NNODES=$2; shift 2 ;;
    --node-rank) need_value "$1" $#; NODE_RANK=$2; shift 2 ;;
    --coordinator) need_value "$1" $#; COORDINATOR=$2; shift 2 ;;
    --) shift; FMJAX_ARGS=("$@"); break ;;
    *) die "unknown flag: $1 (see --help)" ;;
  esac
done

[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES (--nnodes) must be a positive integer, got '$NNODES'"
[[ $NODE_RANK =~ ^[0-9]+$ ]] || die "NODE_RANK (--node-rank) must be a non-negative integer, got '$NODE_RANK'"
(( NODE_RANK < NNODES )) || die "NODE_RANK (--node-rank) must be < NNODES ($NNODES), got $NODE_RANK"
if [[ -n $COORDINATOR ]]; then
  PORT=${COORDINATOR##*:}
  if [[ ! $COORDINATOR =~ ^([A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$ ]] ||
     (( 10#$PORT < 1 || 10#$PORT > 65535 )); then
    die "COORDINATOR (--coordinator) must be host:port with port in 1..65535, got '$COORDINATOR'"
  fi
elif (( NNODES > 1 )); then
  die "missing COORDINATOR (--coordinator): host:port of node 0, required when NNODES > 1"
fi
[[ ${#FMJAX_ARGS[@]} -gt 0 ]] ||
  die "missing fmjax.train arguments: multinode.sh [flags] -- --config configs/NAME.py --workdir DIR"

ENV=()
if [[ -n $COORDINATOR ]]; then
  ENV=("FMJAX_COORDINATOR=$COORDINATOR" "FMJAX_NUM_PROCESSES=$NNODES" "FMJAX_PROCESS_ID=$NODE_RANK")
fi
CMD=("$PYTHON" -m fmjax.train "${FMJAX_ARGS[@]}")

LINE=""
for e in ${ENV[@]+"${ENV[@]}"}; do
  quote "${e#*=}"
  LINE+="${e%%=*}=$QUOTED "
done
join_quoted "${CMD[@]}"
LINE+=$JOINED
if [[ $DRY_RUN == 1 ]]; then
  printf '+ %s\n' "$LINE"
  exit 0
fi
printf '+ %s\n' "$LINE" >&2
if [[ -n $COORDINATOR ]]; then
  export FMJAX_COORDINATOR=$COORDINATOR FMJAX_NUM_PROCESSES=$NNODES FMJAX_PROCESS_ID=$NODE_RANK
fi
exec "${CMD[@]}"
