#!/usr/bin/env bash
# Launch a jaxlab run on every worker of a Cloud TPU VM slice (single- or multi-host).
#
#   tpu_configs/launch_gcloud.sh TPU_NAME ZONE CONFIG OVERLAY [extra `jaxlab train` args...]
#   e.g. tpu_configs/launch_gcloud.sh my-v5p-64 us-east5-a experiments/step_lm/config.yaml tpu_configs/v5p-64.yaml
#
# Every host runs the same command; jax.distributed.initialize() (mesh.distributed: true in the overlay)
# discovers the peers on Cloud TPU, each host loads its share of every global batch and
# jax.make_array_from_process_local_data assembles the global arrays. Checkpoints go to out_dir (GCS).
set -euo pipefail
TPU_NAME=${1:?TPU name}; ZONE=${2:?zone}; CONFIG=${3:?config}; OVERLAY=${4:?overlay}; shift 4
REPO=${JAXLAB_REPO:-https://example.invalid/your-fork/jaxlab.git}   # set to where your checkout lives
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  if [ ! -d jaxlab ]; then git clone $REPO jaxlab; fi
  cd jaxlab && git pull --ff-only
  python3 -m venv .venv && .venv/bin/pip install -q -U pip && .venv/bin/pip install -q -e . 'jax[tpu]'
  .venv/bin/jaxlab train $CONFIG --overlay $OVERLAY $*
"
