#!/usr/bin/env bash
# Downloads (or builds) the wheels a GPU node's image lacks into .whl/ (gitignored), for
# scripts/gpu_check.sh to install there without a network: Python 3.12, x86-64 Linux.
# The image has torch, numpy, pyyaml, safetensors, pytest and DeepSpeed's other needs; with
# logging.wandb.mode=disabled wandb is never imported. Usage: scripts/fetch_gpu_wheels.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DEST"

# Pure-Python or manylinux wheels, fetched for the GPU node's interpreter, not this one.
BINARY=(
    hydra-core==1.3.2
    omegaconf==2.3.0
    hjson==3.1.0
    pydantic==2.11.7
    pydantic-core==2.33.2
    annotated-types==0.7.0
    typing-inspection==0.4.1
)
# Published as source only: built here into pure-Python wheels (no compiled parts).
SOURCE_ONLY=(
    antlr4-python3-runtime==4.9.3
    deepspeed==0.17.5
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do PLATFORMS+=(--platform "$p"); done

"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
for spec in "${SOURCE_ONLY[@]}"; do
    DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps -w "$DEST" "$spec"
done
echo "wheels in $DEST ($(du -sh "$DEST" | cut -f1)):"
ls -1 "$DEST"
