#!/usr/bin/env bash
# Install fmjax and its pinned JAX for TPU in a Python 3.11 venv on every worker of a TPU VM slice
# (or of every slice of a multislice queued resource).
#
# Usage: launch/tpu/setup.sh [flags]
#
#   --name NAME          TPU VM name                        (env TPU_NAME, required)
#   --zone ZONE          GCP zone                           (env ZONE, required)
#   --project PROJECT    GCP project                        (env PROJECT; default: gcloud config)
#   --num-slices N       slices of the queued resource      (env NUM_SLICES; default 1). N > 1:
#                        every worker of NAME-0 .. NAME-(N-1), through one
#                        `gcloud compute tpus queued-resources ssh/scp QR_ID --node=all --worker=all`
#   --qr-id ID           queued resource id, with --num-slices > 1 (env QR_ID; default NAME-qr)
#   --repo URL_OR_PATH   git URL to clone, or a local directory to copy
#                        (env REPO_URL, required)
#   --branch REF         branch or tag to clone             (env REPO_BRANCH; default: the remote's default)
#   --remote-dir DIR     checkout dir on the workers, relative to $HOME
#                        (env REMOTE_DIR; default fmjax). It is replaced on every run.
#   --extras LIST        the project's extras to install    (env EXTRAS; default tpu,gcs)
#   --python VERSION     Python of the venv                 (env PYTHON_VERSION; default 3.11)
#   --internal-ip        ssh/scp to the workers' internal IPs (from a VM in the same VPC)
#   --tunnel-through-iap ssh/scp through Identity-Aware Proxy (workers without external IPs)
#   --dry-run            print the commands instead of running them
#   -h, --help           show this help
#
# A git URL is cloned on each worker (`git clone --depth 1`). A local directory
# (your working tree, uncommitted edits included; .git, logs/, workdirs/ and
# virtualenvs excluded) is packed with tar, copied to every worker with
# `gcloud compute tpus tpu-vm scp --worker=all` and unpacked. Then, on every
# worker, in the checkout: a venv .venv with Python 3.11 made by uv (the TPU VM
# images ship Python 3.10, while jax 0.10.2, flax, orbax, grain and libtpu need
# >= 3.11; uv fetches a standalone CPython build, no sudo or PPA needed; uv
# itself is installed with the image's pip into ~/.local), and exactly the
# project installed into it: pip install -e '.[tpu,gcs]', whose tpu extra pins
# jax[tpu]==0.10.2 (and with it the matching libtpu). run.sh runs commands in
# that venv.
set -euo pipefail

# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"

tpu_env_defaults
REPO_URL=${REPO_URL:-}
REPO_BRANCH=${REPO_BRANCH:-}
REMOTE_DIR=${REMOTE_DIR:-fmjax}
EXTRAS=${EXTRAS:-tpu,gcs}
PYTHON_VERSION=${PYTHON_VERSION:-3.11}
SSH_OPTS=()

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --repo) need_value "$1" $#; REPO_URL=$2; shift 2 ;;
    --branch) need_value "$1" $#; REPO_BRANCH=$2; shift 2 ;;
    --remote-dir) need_value "$1" $#; REMOTE_DIR=$2; shift 2 ;;
    --extras) need_value "$1" $#; EXTRAS=$2; shift 2 ;;
    --python) need_value "$1" $#; PYTHON_VERSION=$2; shift 2 ;;
    --internal-ip|--tunnel-through-iap) SSH_OPTS+=("$1"); shift ;;
    *)
      tpu_common_flag "$@" || die "unknown flag: $1 (see --help)"
      shift "$NSHIFT" ;;
  esac
done

tpu_check_common
require "$REPO_URL" "repository: pass --repo (git URL or local path) or set REPO_URL"
require "$REMOTE_DIR" "remote dir: pass --remote-dir or set REMOTE_DIR"

[[ $PYTHON_VERSION =~ ^3\.(1[1-9]|[2-9][0-9])(\.[0-9]+)?$ ]] ||
  die "--python must be 3.11 or newer (jax 0.10.2 needs it), got '$PYTHON_VERSION'"
tpu_ssh_base ${SSH_OPTS[@]+"${SSH_OPTS[@]}"}
SSH+=("${SSH_ALL[@]}")
quote "$REMOTE_DIR"; DIR=$QUOTED

if [[ -d $REPO_URL ]]; then
  [[ -f $REPO_URL/pyproject.toml ]] || die "$REPO_URL has no pyproject.toml: is it an fmjax checkout?"
  TARBALL="${TMPDIR:-/tmp}"
  TARBALL="${TARBALL%/}/fmjax-src-$TPU_NAME.tar.gz"
  run tar -czf "$TARBALL" -C "$REPO_URL" --exclude=.git --exclude=logs --exclude=workdirs \
    --exclude=venv --exclude=.venv --exclude=__pycache__ --exclude='*.egg-info' .
  if (( NUM_SLICES > 1 )); then
    SCP=(gcloud compute tpus queued-resources scp "$TARBALL" "$QR_ID:fmjax-src.tar.gz")
  else
    SCP=(gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:fmjax-src.tar.gz")
  fi
  run "${SCP[@]}" "${GFLAGS[@]}" ${SSH_OPTS[@]+"${SSH_OPTS[@]}"} "${SSH_ALL[@]}"
  FETCH="rm -rf $DIR && mkdir -p $DIR && tar -xzf fmjax-src.tar.gz -C $DIR && rm -f fmjax-src.tar.gz"
else
  join_quoted git clone --depth 1 ${REPO_BRANCH:+--branch "$REPO_BRANCH"} "$REPO_URL"
  FETCH="rm -rf $DIR && $JOINED $DIR"
fi

quote ".[$EXTRAS]"
SPEC=$QUOTED
UV="python3 -m uv"
INSTALL="cd $DIR && python3 -m pip install --user -q -U uv && $UV venv --python $PYTHON_VERSION .venv"
INSTALL="$INSTALL && $UV pip install --python .venv/bin/python -e $SPEC"
CHECK=".venv/bin/python -c 'import sys, jax; print(\"python\", sys.version.split()[0], \"jax\", jax.__version__)'"
INSTALL="$INSTALL && $CHECK"
run "${SSH[@]}" --command "$FETCH && $INSTALL"
if [[ $DRY_RUN != 1 && -n ${TARBALL:-} ]]; then rm -f "$TARBALL"; fi
