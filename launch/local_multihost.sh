#!/usr/bin/env bash
# N `alm train` processes on this machine, each with its own CPU devices, joined by jax.distributed: the
# multi-host code path (global arrays, per-process data shards, checkpoints) without a cluster.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/local_multihost.sh [--dry-run] N CONFIG [key=value ...] [alm train options]

Starts N processes of `alm train --distributed explicit CONFIG ...` on localhost. Process i gets
  JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT  JAX_NUM_PROCESSES=N  JAX_PROCESS_ID=i
  JAX_PLATFORMS=cpu  XLA_FLAGS=--xla_force_host_platform_device_count=DEVICES_PER_PROCESS
(alm_jax/distributed.py reads them), so the cluster has N x DEVICES_PER_PROCESS CPU devices; the mesh
in CONFIG must match that count (e.g. mesh.data=8 for N=2, DEVICES_PER_PROCESS=4).

Waits for every process. If one fails, the others are killed (they would wait for their peer) and the
script exits with the failed process's status; 0 when all finish, 75 when they were preempted (SIGTERM
or SIGINT to this script is forwarded to every process: each checkpoints, resume=auto continues).

Process 0 (the one that logs) writes to this terminal; process i > 0 to LOG_DIR/process_i.log, whose
tail is printed when it fails.

environment:
  DEVICES_PER_PROCESS  CPU devices per process (default 1)
  PORT                 coordinator port (default: a free port)
  LOG_DIR              logs of processes 1..N-1 (default: a new temporary directory)
  ALM                  the alm command (default: alm; e.g. ".venv/bin/alm" or "python -m alm_jax.cli")
options:
  --dry-run            print the commands instead of running them
  -h, --help           this text
EOF
}

die() { echo "local_multihost.sh: $*" >&2; exit 2; }

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
[[ $# -ge 2 ]] || { usage >&2; die "give N and the alm train arguments (CONFIG [key=value ...])"; }
N=$1
shift
[[ $N =~ ^[1-9][0-9]*$ ]] || die "N=$N must be a positive integer"
DEVICES=${DEVICES_PER_PROCESS:-1}
[[ $DEVICES =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS=$DEVICES must be a positive integer"
read -r -a ALM_CMD <<<"${ALM:-alm}"

if [[ -z ${PORT:-} ]]; then
  PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
XLA=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES

process_env() {  # the environment of process $1
  printf '%s\n' "JAX_PLATFORMS=cpu" "XLA_FLAGS=$XLA" "JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT" \
    "JAX_NUM_PROCESSES=$N" "JAX_PROCESS_ID=$1"
}

if [[ $DRY_RUN == 1 ]]; then
  for ((i = 0; i < N; i++)); do
    mapfile -t envs < <(process_env "$i")
    line=$(show env "${envs[@]}" "${ALM_CMD[@]}" train --distributed explicit "$@")
    if [[ $i == 0 ]]; then echo "$line &"; else echo "$line > ${LOG_DIR:-\$LOG_DIR}/process_$i.log 2>&1 &"; fi
  done
  echo "wait"
  exit 0
fi

LOG_DIR=${LOG_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/alm-multihost.XXXXXX")}
mkdir -p "$LOG_DIR"
# Each process in its own session: a signal to this script's process group (Ctrl-C, a scheduler) reaches
# the processes once, through forward() below; twice would interrupt their checkpoint (alm_jax's
# PreemptionGuard treats a second signal as "stop now").
session=()
command -v setsid >/dev/null && session=(setsid)
pids=()
for ((i = 0; i < N; i++)); do
  mapfile -t envs < <(process_env "$i")
  if [[ $i == 0 ]]; then
    "${session[@]}" env "${envs[@]}" "${ALM_CMD[@]}" train --distributed explicit "$@" &
  else
    "${session[@]}" env "${envs[@]}" "${ALM_CMD[@]}" train --distributed explicit "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  fi
  pids+=("$!")
done

# shellcheck disable=SC2329  # called by the traps below
forward() {  # SIGTERM/SIGINT: every process checkpoints and exits (75)
  echo "local_multihost.sh: forwarding $1 to ${#pids[@]} processes" >&2
  kill "-$1" "${pids[@]}" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT

status=0
declare -A finished=()
while ((${#finished[@]} < N)); do
  for i in "${!pids[@]}"; do
    [[ -n ${finished[$i]:-} ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    finished[$i]=$rc
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "local_multihost.sh: process $i exited with status $rc" >&2
      [[ $i != 0 ]] && tail -n 40 "$LOG_DIR/process_$i.log" >&2
      if ((rc != 75)); then  # a failure: the others would wait for their peer until JAX's timeouts
        for j in "${!pids[@]}"; do
          [[ -z ${finished[$j]:-} ]] && kill -KILL "${pids[$j]}" 2>/dev/null || true
        done
      fi
    fi
  done
  if ((${#finished[@]} < N)); then
    sleep 0.5 || true  # a signal to the process group ends the sleep early
  fi
done
((status == 0)) && echo "local_multihost.sh: all $N processes finished (logs of processes 1..$((N - 1)): $LOG_DIR)" >&2
exit "$status"
