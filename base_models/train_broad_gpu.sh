#!/usr/bin/env bash
# Train the broad base on one GPU in one short command, with the project's own code.
#
# Two steps (see base_models/README.md, "GPU recipe"):
#
#   base_models/train_broad_gpu.sh prepare   # HERE (CPU, network): corpus + diffusers wheel into
#                                             # base_models/_gpu/ (git-ignored, ~30 MB, carried)
#   base_models/train_broad_gpu.sh run       # THERE (the device; no network): train, gate, pack to $OUT
#
# The device tool call (one call, timeout_s 590; it sends the session's checkout plus `carry`):
#   run(command="bash base_models/train_broad_gpu.sh run", carry=["base_models/_gpu"], timeout_s=590)
# and here afterwards, from the files it copied back (FILES_AT = the reply's files_at):
#   cat $FILES_AT/broad-dit.tar.part-* | tar -xf - -C base_models/_next/
#
# `run` writes to $OUT: broad-dit.tar.part-aa, -ab, ... (15 MB pieces: the tool returns files of at
# most 16 MiB, 8 files) holding broad-dit/ (the exported diffusers folder, gate.json,
# gate_samples.png) and train.log; and summary.txt (the gate's line). Environment overrides (the
# defaults are the recipe; the CPU dry run in tests/base_models sets tiny ones):
#   PY DEVICE BF16 LAYERS HEADS HEAD_DIM PATCH BATCH LR WARMUP STEPS MINUTES THREADS
#   GATE_PER_CLASS GATE_STEPS GATE_EPOCHS GPU_DIR OUT WORK
set -euo pipefail

GPU_DIR=${GPU_DIR:-base_models/_gpu}
PY=${PY:-python3}

prepare() {
    local corpus=${CORPUS:-base_models/_corpus/broad}
    if [ ! -f "$corpus/corpus.json" ]; then
        "$PY" base_models/build_corpus.py --out "$corpus"
    fi
    mkdir -p "$GPU_DIR/corpus" "$GPU_DIR/whl"
    for f in train_images train_labels heldout_images heldout_labels; do
        gzip -n -c "$corpus/$f.npy" >"$GPU_DIR/corpus/$f.npy.gz"  # -n: no name/time, same bytes
    done
    cp "$corpus/labels.json" "$corpus/corpus.json" "$GPU_DIR/corpus/"
    if [ -z "${NO_WHEEL:-}" ] && [ ! -f "$GPU_DIR/whl/diffusers-0.42.1-py3-none-any.whl" ]; then
        # the device's python3 (3.12) has torch, numpy, pillow, safetensors, huggingface_hub,
        # regex, requests, filelock; diffusers is the one package it lacks (pure Python)
        "$PY" -m pip download --no-deps --only-binary=:all: -d "$GPU_DIR/whl" diffusers==0.42.1
    fi
    du -sh "$GPU_DIR"
}

run() {
    local out=${OUT:?OUT must name the folder that comes back}
    local work=${WORK:-/tmp/broad-gpu}
    local device=${DEVICE:-cuda}
    rm -rf "$work" && mkdir -p "$work"
    if ! "$PY" -c "import diffusers" 2>/dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$work/site" \
            "$GPU_DIR"/whl/*.whl
        export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONUNBUFFERED=1
    command -v nvidia-smi >/dev/null && nvidia-smi -L || true
    # Width HEADS x HEAD_DIM = 192, 6 blocks, patch 2 (256 tokens): 4.8M parameters saved, 18.4 MiB
    # fp32 (the committed file must stay < 25 MB). bf16 autocast forward; the cosine decay is fitted
    # to the time limit from the measured rate (--fit-steps-to-time).
    set +e
    "$PY" base_models/train_base.py --corpus "$GPU_DIR/corpus" --device "$device" ${BF16---bf16} \
        --layers "${LAYERS:-6}" --heads "${HEADS:-6}" --head-dim "${HEAD_DIM:-32}" \
        --patch-size "${PATCH:-2}" --batch-size "${BATCH:-256}" --lr "${LR:-8e-4}" \
        --min-lr-frac 0.1 --warmup "${WARMUP:-200}" --steps "${STEPS:-100000}" \
        --time-limit-min "${MINUTES:-6.5}" --fit-steps-to-time --export-every 2000 --log-every 200 \
        --threads "${THREADS:-8}" --out "$work/broad-dit" --state "$work/state.pt" 2>&1 | tee "$work/train.log"
    local train_rc=${PIPESTATUS[0]}
    if [ -f "$work/broad-dit/model_index.json" ]; then
        "$PY" base_models/gate.py --model "$work/broad-dit" --corpus "$GPU_DIR/corpus" --device "$device" \
            --per-class "${GATE_PER_CLASS:-8}" --steps "${GATE_STEPS:-50}" \
            --classifier-epochs "${GATE_EPOCHS:-3}" --no-fid --threads "${THREADS:-8}" 2>&1 |
            tee "$work/gate.log"
    fi
    set -e
    mkdir -p "$out"
    { echo "train exit $train_rc"; tail -n 3 "$work/train.log"; tail -n 1 "$work/gate.log" 2>/dev/null; } \
        >"$out/summary.txt"
    tar -cf - -C "$work" broad-dit train.log $(cd "$work" && ls gate.log 2>/dev/null) |
        split -b 15m - "$out/broad-dit.tar.part-"
    ls -la "$out"
    cat "$out/summary.txt"
    return "$train_rc"
}

case "${1:-}" in
prepare) prepare ;;
run) run ;;
*)
    echo "usage: $0 prepare|run" >&2
    exit 2
    ;;
esac
