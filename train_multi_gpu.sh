#!/usr/bin/env bash
# Launch train.py with torchrun: one process per GPU, or CPU processes (gloo) when there is no GPU.
#
#   ./train_multi_gpu.sh [train.py arguments]     e.g. --pipeline_dir OUT --teacher_name T --align_logits match --dump_path D
#
# Environment (all optional):
#   N_GPU_NODE   processes per node (default: the visible GPUs, or 2 CPU processes without a GPU)
#   N_NODES      number of nodes (default 1)          NODE_RANK    this node's rank (default 0)
#   MASTER_ADDR  rendezvous host of node 0 (default 127.0.0.1)
#   MASTER_PORT  rendezvous port (default: a free port on one node, 29500 on several)
#   PYTHON       interpreter (default: .venv/bin/python when present, else python3)
# Each process reads its own shards (regroup the data into N_NODES x N_GPU_NODE shards); rank 0 alone
# logs and writes. On CPU every process gets nproc / N_GPU_NODE threads unless OMP_NUM_THREADS is set.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
PYTHON=${PYTHON:-}
if [[ -z "$PYTHON" ]]; then
  if [[ -x "$here/.venv/bin/python" ]]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
n_gpus=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")
if [[ -z "${N_GPU_NODE:-}" ]]; then
  if (( n_gpus > 0 )); then N_GPU_NODE=$n_gpus; else N_GPU_NODE=2; fi
fi
N_NODES=${N_NODES:-1}
NODE_RANK=${NODE_RANK:-0}
if (( n_gpus == 0 )) && [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  cores=$(nproc)
  export OMP_NUM_THREADS=$(( cores / N_GPU_NODE > 0 ? cores / N_GPU_NODE : 1 ))
fi
if (( N_NODES == 1 )) && [[ -z "${MASTER_PORT:-}" ]]; then
  rendezvous=(--standalone)
else
  rendezvous=(--nnodes "$N_NODES" --node_rank "$NODE_RANK" --master_addr "${MASTER_ADDR:-127.0.0.1}"
              --master_port "${MASTER_PORT:-29500}")
fi
exec "$PYTHON" -m torch.distributed.run "${rendezvous[@]}" --nproc_per_node "$N_GPU_NODE" "$here/train.py" "$@"
