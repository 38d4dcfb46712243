#!/usr/bin/env bash
# One `alm train` process per GPU node, from the torchrun-style variables NNODES / NODE_RANK / MASTER_ADDR /
# MASTER_PORT (set by most multi-node launchers: Kubernetes PyTorchJob, cloud batch services, or by hand).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/gpu_multinode.sh [--dry-run] CONFIG [key=value ...]

Run it once on every node (each node: all its GPUs in one process). It maps
  MASTER_ADDR:MASTER_PORT -> JAX_COORDINATOR_ADDRESS   (node 0 hosts the coordinator)
  NNODES                  -> JAX_NUM_PROCESSES
  NODE_RANK               -> JAX_PROCESS_ID
(alm_jax/distributed.py reads them) and runs `alm train --distributed explicit CONFIG ...`.

environment:
  NNODES        number of nodes (required)
  NODE_RANK     this node's rank, 0..NNODES-1 (required)
  MASTER_ADDR   address of node 0, reachable from every node (required)
  MASTER_PORT   coordinator port on node 0 (default 12355)
  GPUS_PER_NODE local GPUs this process uses (default: all visible; sets JAX_LOCAL_DEVICE_IDS=0..N-1)
  ALM           the alm command (default: alm)
The mesh must cover NNODES x GPUs per node devices, e.g. 2 nodes of 8 H100:
  mesh.dcn_data=2 mesh.fsdp=8   (FSDP inside a node over NVLink, data parallel across nodes)
Exit status: alm train's (0 done, 75 preempted: rerun with resume=auto, 1 failed).
options:
  --dry-run     print the environment and the command instead of running it
  -h, --help    this text
EOF
}

die() { echo "gpu_multinode.sh: $*" >&2; exit 2; }

show() {  # a command as one line, each word quoted only when the shell needs it
  local out=() w
  local safe='^[A-Za-z0-9_./=:,@%+-]+$'
  for w in "$@"; do
    if [[ $w =~ $safe ]]; then out+=("$w"); else out+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

DRY_RUN=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --) shift; break ;;
    -*) usage >&2; die "unknown option $1" ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; die "give CONFIG (and key=value overrides)"; }
for v in NNODES NODE_RANK MASTER_ADDR; do
  [[ -n ${!v:-} ]] || die "$v is not set (see --help)"
done
[[ $NNODES =~ ^[1-9][0-9]*$ ]] || die "NNODES=$NNODES must be a positive integer"
if ! [[ $NODE_RANK =~ ^[0-9]+$ ]] || ((NODE_RANK >= NNODES)); then
  die "NODE_RANK=$NODE_RANK must be in [0, NNODES=$NNODES)"
fi
PORT=${MASTER_PORT:-12355}

envs=("JAX_COORDINATOR_ADDRESS=$MASTER_ADDR:$PORT" "JAX_NUM_PROCESSES=$NNODES" "JAX_PROCESS_ID=$NODE_RANK")
if [[ -n ${GPUS_PER_NODE:-} ]]; then
  [[ $GPUS_PER_NODE =~ ^[1-9][0-9]*$ ]] || die "GPUS_PER_NODE=$GPUS_PER_NODE must be a positive integer"
  envs+=("JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((GPUS_PER_NODE - 1)))")
fi
read -r -a ALM_CMD <<<"${ALM:-alm}"
cmd=(env "${envs[@]}" "${ALM_CMD[@]}" train --distributed explicit "$@")

if [[ $DRY_RUN == 1 ]]; then
  show "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
