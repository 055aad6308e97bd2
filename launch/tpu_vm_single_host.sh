#!/usr/bin/env bash
# Train on a single-host TPU VM (e.g. v4-8, v5e-8): create it, set it up, train.
#
#   ZONE=us-central2-b TPU_NAME=ddx-1 ACCELERATOR=v4-8 \
#     bash launch/tpu_vm_single_host.sh configs/cifar10.py runs/cifar10
#
# Needs the gcloud CLI, logged in, with a project that has TPU quota. The data
# (ArrayRecord CIFAR-10, see README) must be reachable from the VM: copy it with
# `gcloud compute tpus tpu-vm scp` or set --config.data.data_dir to a bucket path.
# Multi-host pod slices need jax.distributed start-up (not in ddx yet).
set -euo pipefail
config=${1:?usage: tpu_vm_single_host.sh CONFIG WORKDIR}
workdir=${2:?usage: tpu_vm_single_host.sh CONFIG WORKDIR}
: "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}" "${ACCELERATOR:=v4-8}" "${VERSION:=tpu-ubuntu2204-base}"
REPO=${REPO:-$(git remote get-url origin 2>/dev/null || echo "")}
: "${REPO:?set REPO to the git URL of your ddx checkout}"

# 1. Create the VM (skip if it exists).
gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1 ||
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
    --accelerator-type "$ACCELERATOR" --version "$VERSION"

# 2. Set up ddx on it.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d ddx ] || git clone $REPO ddx
  cd ddx && python3 -m venv .venv && . .venv/bin/activate &&
  pip install -q -e . 'jax[tpu]>=0.10,<0.11'"

# 3. Train in the background (logs in ~/ddx/train.log), then stream the log.
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  cd ddx && . .venv/bin/activate &&
  nohup python -m ddx.main --config $config --workdir $workdir > train.log 2>&1 &"
echo "streaming the log; Ctrl-C stops the stream, not the training"
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 --command "tail -f ddx/train.log"

# To stop training: send SIGTERM (ddx saves a checkpoint at the current step):
#   gcloud compute tpus tpu-vm ssh $TPU_NAME --zone $ZONE --worker=all --command "pkill -TERM -f ddx.main"
# To delete the VM:
#   gcloud compute tpus tpu-vm delete $TPU_NAME --zone $ZONE
