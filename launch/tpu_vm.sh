#!/usr/bin/env bash
# Train ddx on a Cloud TPU VM: one host (v4-8, v5e-8, ...) or a pod slice of
# many hosts (v4-32, v5e-64, ...). Every step runs the same command on every
# worker (--worker=all); on a pod slice the workers find each other by
# themselves (ddx calls jax.distributed.initialize(), which reads the TPU
# metadata), so the training line is the one you run on a laptop.
#
#   export ZONE=us-central2-b TPU_NAME=ddx-1 ACCELERATOR=v4-8   # or v4-32 for a pod slice
#   export REPO=https://github.com/<you>/ddx.git                # your ddx checkout
#   bash launch/tpu_vm.sh create                 # 1. create the VM / pod slice
#   bash launch/tpu_vm.sh setup                  # 2. clone + install on every worker
#   bash launch/tpu_vm.sh train configs/cifar10.py /mnt/shared/runs/cifar10 [--config.k=v ...]
#   bash launch/tpu_vm.sh logs                   # 4. stream worker 0's log (Ctrl-C stops the stream only)
#   bash launch/tpu_vm.sh stop                   # 5. SIGTERM: ddx saves a checkpoint and exits
#   bash launch/tpu_vm.sh delete                 # 6. delete the VM (stop first)
#
# Needs the gcloud CLI, logged in, in a project with TPU quota.
#
# Data and workdir. The data (CIFAR-10 as ArrayRecord, see README) must be
# readable from every worker: copy it with `gcloud compute tpus tpu-vm scp
# --worker=all` or put it on a shared disk and set --config.data.data_dir.
# On a pod slice the WORKDIR must be one directory that every worker sees
# (orbax writes each host's shards of a checkpoint into it). The simplest is a
# Cloud Storage bucket: ddx reads and writes workdirs through etils.epath, so
#   bash launch/tpu_vm.sh train configs/cifar10.py gs://BUCKET/runs/cifar10
# needs no shared disk (the VM's service account needs write access to the
# bucket). A Filestore/NFS mount works too: set SHARED_MOUNT="IP:/share" to
# have `setup` mount it at /mnt/shared on every worker. On a single host any
# local path works.
set -euo pipefail
cmd=${1:?usage: tpu_vm.sh create|setup|train CONFIG WORKDIR [overrides]|logs|stop|delete}
shift
: "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}"
ACCELERATOR=${ACCELERATOR:-v4-8}
VERSION=${VERSION:-tpu-ubuntu2204-base}
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }

case "$cmd" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --version "$VERSION"
    ;;
  setup)
    : "${REPO:?set REPO to the git URL of your ddx checkout}"
    ssh_all "set -e
      [ -d ddx ] || git clone $REPO ddx
      cd ddx && python3 -m venv .venv && . .venv/bin/activate
      pip install -q -e . 'jax[tpu]>=0.10,<0.11'
      python -c 'import jax; print(jax.process_index(), jax.local_devices())'"
    if [ -n "${SHARED_MOUNT:-}" ]; then
      ssh_all "set -e; sudo apt-get -qq install -y nfs-common
        sudo mkdir -p /mnt/shared && sudo mount -t nfs $SHARED_MOUNT /mnt/shared
        sudo chmod a+rwx /mnt/shared"
    fi
    ;;
  train)
    config=${1:?usage: tpu_vm.sh train CONFIG WORKDIR [overrides...]}
    workdir=${2:?usage: tpu_vm.sh train CONFIG WORKDIR [overrides...]}
    shift 2
    # The same line on every worker; each logs to ~/ddx/train.log on its host.
    ssh_all "cd ddx && . .venv/bin/activate &&
      nohup python -m ddx.main --config $config --workdir $workdir $* > train.log 2>&1 &"
    echo "started on all workers; follow with: bash launch/tpu_vm.sh logs"
    ;;
  logs)
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 \
      --command "tail -n 50 -f ddx/train.log"
    ;;
  stop)
    # SIGTERM on every worker: they agree on a step (JAX's preemption sync
    # point), save that checkpoint and exit 0. Rerun `train` to resume.
    ssh_all "pkill -TERM -f ddx.main || true"
    ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet
    ;;
  *)
    echo "unknown command $cmd; use create|setup|train|logs|stop|delete" >&2
    exit 2
    ;;
esac
