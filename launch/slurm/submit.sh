#!/usr/bin/env bash
# Submit fmjax training to a SLURM GPU cluster (sbatch launch/slurm/train.sbatch).
#
# Usage: launch/slurm/submit.sh [flags] -- <fmjax.train args>
#   e.g. launch/slurm/submit.sh --nodes 2 --gpus-per-node 8 --partition gpu -- \
#          --config configs/llama_1b.py --workdir /shared/runs/run1
#
# Always asks for whole nodes (--exclusive --mem=0): the one task per node drives all its GPUs
# and uses all its CPUs for the input pipeline (train.sbatch passes them to srun).
#
#   --nodes N            nodes (one JAX process per node)   (default: 1, from train.sbatch)
#   --gpus-per-node G    GPUs per node                      (default: 8, from train.sbatch)
#   --cpus-per-task C    CPUs for each node's task          (default: all the node's CPUs)
#   --partition P        SLURM partition                    (default: the cluster's)
#   --time T             time limit, e.g. 04:00:00          (default: the partition's)
#   --account A          SLURM account
#   --job-name NAME      job name                           (default: fmjax)
#   --dry-run            print the sbatch command instead of running it
#   -h, --help           show this help
#
# Multi-node meshes: with one JAX process per node, the slices of a DCN mesh are the nodes, so
# --config.mesh.dcn.AXIS=K overrides in the train args must multiply to --nodes, e.g.
#   launch/slurm/submit.sh --nodes 2 -- --config configs/llama_1b.py --config.mesh.dcn.data=2 --workdir DIR
# (data parallel across the 2 nodes, the ICI mesh mesh.data/fsdp/... over each node's GPUs).
# Other products are an error before anything is submitted.
#
# sbatch's own env vars (SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...)
# work as usual; the job inherits this environment (PYTHON, FMJAX_COORDINATOR_PORT).
set -euo pipefail

# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"

SBATCH_ARGS=(--exclusive --mem=0)
FMJAX_ARGS=()
NODES=1   # train.sbatch's #SBATCH --nodes

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --nodes|--gpus-per-node|--cpus-per-task)
      need_value "$1" $#
      [[ $2 =~ ^[1-9][0-9]*$ ]] || die "$1 must be a positive integer, got '$2'"
      if [[ $1 == --nodes ]]; then NODES=$2; fi
      SBATCH_ARGS+=("$1=$2"); shift 2 ;;
    --partition|--time|--account|--job-name)
      need_value "$1" $#; SBATCH_ARGS+=("$1=$2"); shift 2 ;;
    --) shift; FMJAX_ARGS=("$@"); break ;;
    *) die "unknown flag: $1 (see --help)" ;;
  esac
done

[[ ${#FMJAX_ARGS[@]} -gt 0 ]] ||
  die "missing fmjax.train arguments: submit.sh [flags] -- --config configs/NAME.py --workdir DIR"
dcn_product "${FMJAX_ARGS[@]}"
if [[ -n $DCN_AXES ]] && (( DCN_PRODUCT != NODES )); then
  die "the --config.mesh.dcn overrides ($DCN_AXES) multiply to $DCN_PRODUCT, but the job has $NODES node(s) (--nodes; one JAX process per node)"
fi
if [[ $DRY_RUN != 1 ]] && ! command -v sbatch >/dev/null 2>&1; then
  die "sbatch not found on PATH (run this on a SLURM login node)"
fi

run sbatch "${SBATCH_ARGS[@]}" "$(dirname "$0")/train.sbatch" "${FMJAX_ARGS[@]}"
