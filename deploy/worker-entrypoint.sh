#!/bin/sh
# Start one Celery worker of DiffFit Serve on one GPU (the worker image's CMD).
#
# `docker compose up --scale worker=N` gives every replica the same device
# reservation, and Docker cannot hand replica k the k-th GPU. So the workers
# reserve all GPUs of the host and each one claims a different GPU here: it
# takes an exclusive flock on $GPU_LOCK_DIR/gpu<i> (a volume shared by the
# workers of one host) and keeps it for its lifetime. The kernel releases the
# lock when the process dies, however it dies, so a restarted or replacement
# worker claims the freed GPU. More replicas than GPUs wait until one frees.
#
# Nothing is picked when CUDA_VISIBLE_DEVICES is already set (pinned by the
# operator), when the lock folder is missing (plain `docker run`), or when the
# container sees at most one GPU.
set -eu

GPU_LOCK_DIR="${GPU_LOCK_DIR:-/gpu-locks}"
GPU_WAIT_S="${GPU_WAIT_S:-30}"

gpu_count() {
    python -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

pick_gpu() {
    if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] || [ ! -d "$GPU_LOCK_DIR" ] || [ ! -w "$GPU_LOCK_DIR" ]; then
        return 0
    fi
    n=$(gpu_count)
    if [ "$n" -le 1 ]; then
        return 0
    fi
    while :; do
        i=0
        while [ "$i" -lt "$n" ]; do
            # fd 9 stays open across the exec below: the worker holds the lock.
            exec 9>"$GPU_LOCK_DIR/gpu$i"
            if flock -n 9; then
                CUDA_VISIBLE_DEVICES=$i
                export CUDA_VISIBLE_DEVICES
                echo "difffit worker ${HOSTNAME:-$(hostname)}: using GPU $i of $n" >&2
                return 0
            fi
            exec 9>&-
            i=$((i + 1))
        done
        echo "difffit worker ${HOSTNAME:-$(hostname)}: all $n GPUs are taken by other workers; retrying in ${GPU_WAIT_S}s" >&2
        sleep "$GPU_WAIT_S"
    done
}

# As PID 1 a shell ignores SIGTERM unless trapped: let `docker stop` end the wait.
trap 'exit 143' TERM INT
pick_gpu
exec celery -A worker.celery_app worker \
    -Q "${DIFFFIT_QUEUES:-generate,finetune}" \
    --pool threads --concurrency "${DIFFFIT_ENGINE_THREADS:-8}" \
    -n "celery@${HOSTNAME:-$(hostname)}" --loglevel "${DIFFFIT_LOG_LEVEL:-INFO}"
