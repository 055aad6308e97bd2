#!/usr/bin/env bash
# Train on one GPU host (one or more GPUs; the batch is split across them).
#
#   bash launch/gpu_host.sh configs/cifar10.py runs/cifar10 [--config.key=value ...]
#
# Run from the repository root. Installs ddx with CUDA-enabled jaxlib into .venv
# (same JAX minor version as setup.cfg pins), then runs the same command as on CPU.
# One process drives all of the host's GPUs (the batch is split over them).
#
# Several GPU hosts: start the same command once per host with
#   --coordinator_address=HOST0:PORT --num_processes=N --process_id=I
# (or under SLURM, `srun python -m ddx.main ...`: JAX reads SLURM's settings).
# The workdir must be a directory every host sees (NFS or similar).
set -euo pipefail
config=${1:?usage: gpu_host.sh CONFIG WORKDIR [overrides...]}
workdir=${2:?usage: gpu_host.sh CONFIG WORKDIR [overrides...]}
shift 2
if [ ! -d .venv ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
pip install -q -e . 'jax[cuda13]>=0.10,<0.11'
python -c 'import jax; print("devices:", jax.devices())'
python -m ddx.main --config "$config" --workdir "$workdir" "$@"
