#!/usr/bin/env bash
# Install JAX for TPU and fmjax on every worker of a TPU VM slice.
#
# Usage: launch/tpu/setup.sh [flags]
#
#   --name NAME          TPU VM name                        (env TPU_NAME, required)
#   --zone ZONE          GCP zone                           (env ZONE, required)
#   --project PROJECT    GCP project                        (env PROJECT; default: gcloud config)
#   --repo URL_OR_PATH   git URL to clone, or a local directory to copy
#                        (env REPO_URL, required)
#   --branch REF         branch or tag to clone             (env REPO_BRANCH; default: the remote's default)
#   --remote-dir DIR     checkout dir on the workers, relative to $HOME
#                        (env REMOTE_DIR; default fmjax). It is replaced on every run.
#   --jax-spec SPEC      pip requirement for JAX            (env JAX_SPEC; default 'jax[tpu]')
#   --dry-run            print the commands instead of running them
#   -h, --help           show this help
#
# A git URL is cloned on each worker (`git clone --depth 1`). A local directory
# (your working tree, uncommitted edits included; .git, logs/, workdirs/ and
# virtualenvs excluded) is packed with tar, copied to every worker with
# `gcloud compute tpus tpu-vm scp --worker=all` and unpacked. Then, on every
# worker: pip install -U SPEC, and pip install -e the checkout.
set -euo pipefail

# shellcheck source=SCRIPTDIR/../lib.sh
source "$(dirname "$0")/../lib.sh"

tpu_env_defaults
REPO_URL=${REPO_URL:-}
REPO_BRANCH=${REPO_BRANCH:-}
REMOTE_DIR=${REMOTE_DIR:-fmjax}
JAX_SPEC=${JAX_SPEC:-"jax[tpu]"}

split_eq "$@"
set -- ${ARGS[@]+"${ARGS[@]}"}
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --repo) need_value "$1" $#; REPO_URL=$2; shift 2 ;;
    --branch) need_value "$1" $#; REPO_BRANCH=$2; shift 2 ;;
    --remote-dir) need_value "$1" $#; REMOTE_DIR=$2; shift 2 ;;
    --jax-spec) need_value "$1" $#; JAX_SPEC=$2; shift 2 ;;
    *)
      tpu_common_flag "$@" || die "unknown flag: $1 (see --help)"
      shift "$NSHIFT" ;;
  esac
done

tpu_check_common
require "$REPO_URL" "repository: pass --repo (git URL or local path) or set REPO_URL"
require "$REMOTE_DIR" "remote dir: pass --remote-dir or set REMOTE_DIR"

SSH=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GFLAGS[@]}" --worker=all)
quote "$REMOTE_DIR"; DIR=$QUOTED

if [[ -d $REPO_URL ]]; then
  [[ -f $REPO_URL/pyproject.toml ]] || die "$REPO_URL has no pyproject.toml: is it an fmjax checkout?"
  TARBALL="${TMPDIR:-/tmp}"
  TARBALL="${TARBALL%/}/fmjax-src-$TPU_NAME.tar.gz"
  run tar -czf "$TARBALL" -C "$REPO_URL" --exclude=.git --exclude=logs --exclude=workdirs \
    --exclude=venv --exclude=.venv --exclude=__pycache__ --exclude='*.egg-info' .
  run gcloud compute tpus tpu-vm scp "$TARBALL" "$TPU_NAME:fmjax-src.tar.gz" "${GFLAGS[@]}" --worker=all
  FETCH="rm -rf $DIR && mkdir -p $DIR && tar -xzf fmjax-src.tar.gz -C $DIR && rm -f fmjax-src.tar.gz"
else
  join_quoted git clone --depth 1 ${REPO_BRANCH:+--branch "$REPO_BRANCH"} "$REPO_URL"
  FETCH="rm -rf $DIR && $JOINED $DIR"
fi

quote "$JAX_SPEC"
INSTALL="python3 -m pip install -U pip && python3 -m pip install -U $QUOTED && cd $DIR && python3 -m pip install -e ."
run "${SSH[@]}" --command "$FETCH && $INSTALL"
if [[ $DRY_RUN != 1 && -n ${TARBALL:-} ]]; then rm -f "$TARBALL"; fi
