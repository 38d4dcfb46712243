#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create (or reuse) the slice, install this package on every worker, run
# `alm train` on every worker (one process per host; JAX finds the slice from the TPU metadata), stream the
# logs, and delete the slice on request.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [options] CONFIG [key=value ...]    create/reuse, install, train (all workers)
       launch/tpu_vm.sh [options] --delete                  delete the slice

steps (each printed before it runs):
  1. gcloud compute tpus tpu-vm describe SLICE; create it when missing (--accelerator-type, --version)
  2. build a wheel of this checkout; scp it and CONFIG to every worker (--worker=all); pip install it
     with jax[tpu] on every worker
  3. with BUCKET: mount gs://BUCKET at /gcs/BUCKET on every worker (gcsfuse) and default
     checkpoint.dir / logging.dir to /gcs/BUCKET/runs/RUN (your overrides come later and win)
  4. ssh --worker=all: python3 -m alm_jax.cli train --distributed auto CONFIG overrides  (output of all
     workers streams here; each worker also appends it to RUN.log in its run directory)
  5. with --delete: delete the slice afterwards (whatever the exit status)

options (each also settable through the environment variable in capitals):
  --project PROJECT           Google Cloud project (default: gcloud's configured project)
  --zone ZONE                 e.g. us-east5-a (required)
  --accelerator-type TYPE     ACCELERATOR_TYPE, e.g. v5p-64 or v6e-256 (required to create)
  --slice NAME                SLICE: the TPU VM name (default alm-ACCELERATOR_TYPE)
  --runtime-version VERSION   RUNTIME_VERSION (default: v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite
                              for v5litepod, v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base otherwise)
  --bucket BUCKET             BUCKET (no gs://): corpus and checkpoints, mounted at /gcs/BUCKET
  --run NAME                  RUN: run name under /gcs/BUCKET/runs (default: the config's file stem)
  --spot                      SPOT=1: create a Spot slice (preemptible; rerun this command to resume)
  --skip-install              SKIP_INSTALL=1: the workers already have this version installed
  --delete                    delete the slice after training, or only delete it when no CONFIG is given
  --dry-run                   print every command instead of running it
  -h, --help                  this text
Exit status: gcloud ssh's, non-zero when training failed or stopped on a worker (alm train exits 75 when
preempted: rerun the same command, resume=auto continues; the workers' output says which).
EOF
}

die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

show() {  # a command as one line, each word quoted only when the shell needs it
  local out=() w
  local safe='^[A-Za-z0-9_./=:,@%+-]+$'
  for w in "$@"; do
    if [[ $w =~ $safe ]]; then out+=("$w"); else out+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

DRY_RUN=0
run() {  # run a command (echoed to stderr first), or only print it under --dry-run
  if [[ $DRY_RUN == 1 ]]; then
    show "$@"
  else
    echo "+ $(show "$@")" >&2
    "$@"
  fi
}

PROJECT=${PROJECT:-}
ZONE=${ZONE:-}
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-}
SLICE=${SLICE:-}
RUNTIME_VERSION=${RUNTIME_VERSION:-}
BUCKET=${BUCKET:-}
RUN=${RUN:-}
SPOT=${SPOT:-0}
SKIP_INSTALL=${SKIP_INSTALL:-0}
DELETE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --delete) DELETE=1; shift ;;
    --spot) SPOT=1; shift ;;
    --skip-install) SKIP_INSTALL=1; shift ;;
    --project|--zone|--accelerator-type|--slice|--runtime-version|--bucket|--run)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --project) PROJECT=$2 ;;
        --zone) ZONE=$2 ;;
        --accelerator-type) ACCELERATOR_TYPE=$2 ;;
        --slice) SLICE=$2 ;;
        --runtime-version) RUNTIME_VERSION=$2 ;;
        --bucket) BUCKET=$2 ;;
        --run) RUN=$2 ;;
      esac
      shift 2 ;;
    --) shift; break ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) break ;;
  esac
done

[[ -n $ZONE ]] || die "set --zone (or ZONE)"
if [[ -z $SLICE ]]; then
  [[ -n $ACCELERATOR_TYPE ]] || die "set --slice (or SLICE), or --accelerator-type to name it alm-TYPE"
  SLICE=alm-$ACCELERATOR_TYPE
fi
BUCKET=${BUCKET#gs://}
BUCKET=${BUCKET%/}
where=(--zone="$ZONE")
[[ -n $PROJECT ]] && where+=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm)

delete_slice() {
  run "${tpu[@]}" delete "$SLICE" "${where[@]}" --quiet
}

if [[ $# -eq 0 ]]; then
  [[ $DELETE == 1 ]] || { usage >&2; die "give CONFIG (and key=value overrides), or --delete"; }
  delete_slice
  exit 0
fi
CONFIG=$1
shift
[[ -f $CONFIG ]] || die "CONFIG $CONFIG is not a file"
CONFIG_NAME=$(basename "$CONFIG")
RUN=${RUN:-${CONFIG_NAME%.*}}
REMOTE_DIR=alm_runs/$RUN   # relative to each worker's home directory
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# 1. the slice
exists=0
if [[ $DRY_RUN == 0 ]] && "${tpu[@]}" describe "$SLICE" "${where[@]}" --format='value(state)' >/dev/null 2>&1; then
  exists=1
  echo "tpu_vm.sh: reusing slice $SLICE" >&2
fi
if [[ $DRY_RUN == 1 ]]; then
  echo "# reuse the slice if this succeeds, else create it:"
  run "${tpu[@]}" describe "$SLICE" "${where[@]}" --format='value(state)'
fi
if [[ $exists == 0 ]]; then
  [[ -n $ACCELERATOR_TYPE ]] ||
    die "slice $SLICE does not exist; set --accelerator-type (or ACCELERATOR_TYPE) to create it"
  if [[ -z $RUNTIME_VERSION ]]; then
    case "$ACCELERATOR_TYPE" in
      v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
      v5litepod-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
      v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
      *) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
    esac
  fi
  create=("${tpu[@]}" create "$SLICE" "${where[@]}" --accelerator-type="$ACCELERATOR_TYPE"
    --version="$RUNTIME_VERSION")
  [[ $SPOT == 1 ]] && create+=(--spot)
  run "${create[@]}"
fi
ssh_all() { run "${tpu[@]}" ssh "$SLICE" "${where[@]}" --worker=all --command="$1"; }

# 2. the package and the config on every worker
ssh_all "mkdir -p $(show "$REMOTE_DIR")"
if [[ $SKIP_INSTALL == 0 ]]; then
  if [[ $DRY_RUN == 1 ]]; then
    BUILD_DIR=${TMPDIR:-/tmp}/alm-wheel.XXXXXX
  else
    BUILD_DIR=$(mktemp -d "${TMPDIR:-/tmp}/alm-wheel.XXXXXX")
  fi
  run python3 -m pip wheel --no-deps --quiet --wheel-dir "$BUILD_DIR" "$REPO"
  if [[ $DRY_RUN == 1 ]]; then
    WHEEL=$BUILD_DIR/alm_jax-VERSION-py3-none-any.whl
  else
    WHEEL=$(find "$BUILD_DIR" -name 'alm_jax-*.whl' | head -n 1)
    [[ -n $WHEEL ]] || die "pip wheel wrote no alm_jax wheel into $BUILD_DIR"
  fi
  run "${tpu[@]}" scp "$WHEEL" "$CONFIG" "$SLICE:$REMOTE_DIR/" "${where[@]}" --worker=all
  ssh_all "python3 -m pip install --quiet --upgrade 'jax[tpu]' $(show "$REMOTE_DIR/$(basename "$WHEEL")")"
else
  run "${tpu[@]}" scp "$CONFIG" "$SLICE:$REMOTE_DIR/" "${where[@]}" --worker=all
fi

# 3. the bucket
defaults=()
if [[ -n $BUCKET ]]; then
  MOUNT=/gcs/$BUCKET
  ssh_all "set -e; if ! command -v gcsfuse >/dev/null; then
echo 'deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-'\$(lsb_release -c -s)' main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
sudo apt-get update -qq && sudo apt-get install -y -qq gcsfuse; fi
sudo mkdir -p $MOUNT && sudo chown \$(id -u):\$(id -g) $MOUNT
mountpoint -q $MOUNT || gcsfuse --implicit-dirs $BUCKET $MOUNT"
  defaults=("checkpoint.dir=$MOUNT/runs/$RUN/checkpoints" "logging.dir=$MOUNT/runs/$RUN")
fi

# 4. train on every worker
status=0
train=(python3 -m alm_jax.cli train --distributed auto "$CONFIG_NAME" "${defaults[@]}" "$@")
ssh_all "set -o pipefail; cd $(show "$REMOTE_DIR") && $(show "${train[@]}") 2>&1 | tee -a $(show "$RUN.log")" ||
  status=$?
if [[ $status == 75 ]]; then
  echo "tpu_vm.sh: training was preempted (exit 75); rerun the same command: resume=auto continues" >&2
elif [[ $status != 0 ]]; then
  echo "tpu_vm.sh: training failed (exit $status); logs: $REMOTE_DIR/$RUN.log on each worker" >&2
fi

# 5. delete on request
if [[ $DELETE == 1 ]]; then
  delete_slice
fi
exit "$status"
