#!/usr/bin/env bash
# Run N ddx processes on this machine, wired together with jax.distributed on
# 127.0.0.1 -- the same multi-process code path as a TPU pod slice or a GPU
# cluster, on one box. CI uses it to test multi-process training on CPU.
#
#   bash launch/local_multiprocess.sh N CONFIG WORKDIR [--config.key=value ...]
#
# Example (2 processes x 2 CPU devices each = a 4-device mesh):
#   DEVICES_PER_PROCESS=2 bash launch/local_multiprocess.sh 2 configs/digits.py runs/mp
#
# Environment:
#   DEVICES_PER_PROCESS  fake CPU devices per process (default 1; CPU only)
#   PORT                 coordinator port (default: a free one)
#   PYTHON               interpreter (default: python)
# Process 0 prints to this terminal; process i>0 logs to WORKDIR/process_<i>.log.
# If any process fails, the others are stopped and the exit code is non-zero.
set -euo pipefail
n=${1:?usage: local_multiprocess.sh N CONFIG WORKDIR [overrides...]}
config=${2:?usage: local_multiprocess.sh N CONFIG WORKDIR [overrides...]}
workdir=${3:?usage: local_multiprocess.sh N CONFIG WORKDIR [overrides...]}
shift 3
python=${PYTHON:-python}
port=${PORT:-$("$python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
if [ -n "${DEVICES_PER_PROCESS:-}" ]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS}"
fi
mkdir -p "$workdir"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup INT TERM

for ((i = 0; i < n; i++)); do
  args=(-m ddx.main --config "$config" --workdir "$workdir"
        --coordinator_address "127.0.0.1:$port" --num_processes "$n" --process_id "$i" "$@")
  if [ "$i" -eq 0 ]; then
    "$python" "${args[@]}" &
  else
    "$python" "${args[@]}" > "$workdir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done

# Wait for whichever finishes first, so one failed process stops the rest at
# once instead of leaving them blocked in a collective.
status=0
for ((i = 0; i < n; i++)); do
  if ! wait -n; then
    status=1
    cleanup
  fi
done
exit $status
