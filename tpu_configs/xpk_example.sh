#!/usr/bin/env bash
# xpk (Accelerated Processing Kit) workload on a GKE TPU cluster, e.g. the 2-slice v5p-64 multislice overlay.
#
#   tpu_configs/xpk_example.sh CLUSTER IMAGE CONFIG [OVERLAY]
#
# IMAGE is a container with this checkout installed (`pip install -e . 'jax[tpu]'`). xpk sets the
# MEGASCALE_* environment for multislice; jax.distributed.initialize() reads it.
set -euo pipefail
CLUSTER=${1:?cluster}; IMAGE=${2:?image}; CONFIG=${3:?config}; OVERLAY=${4:-tpu_configs/v5p-64x2-multislice.yaml}
xpk workload create \
  --cluster "$CLUSTER" \
  --workload "jaxlab-$(date +%Y%m%d-%H%M%S)" \
  --tpu-type v5p-64 \
  --num-slices 2 \
  --docker-image "$IMAGE" \
  --command "jaxlab train $CONFIG --overlay $OVERLAY"
