#!/usr/bin/env bash
# The wheels that scripts/gpu-check.sh --wheels DIR installs on a GPU machine without a
# package index, downloaded here for that machine's Python and platform:
#
#   scripts/gpu-wheels.sh [PYTHON_VERSION] [DIR] [MORE ...]   # default: 3.12 .whl
#
# trainrun's requirements that a CUDA image with torch usually lacks (Hydra, OmegaConf and
# its ANTLR runtime, datasets and what it adds, schedule-free), for manylinux x86-64. The
# rest (torch, numpy, safetensors, tokenizers, tensorboard, rich, matplotlib, pyarrow,
# pandas, pytest) is taken from the machine; a missing or too old one makes `pip install`
# say which: add it as MORE (e.g. 'pyarrow>=24', which datasets 5 needs).
set -euo pipefail
py="${1:-3.12}" dir="${2:-.whl}"
shift $(( $# < 2 ? $# : 2 ))
mkdir -p "$dir"
platforms=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do platforms+=(--platform "manylinux_${n}_x86_64"); done
python -m pip download --no-deps --only-binary=:all: --python-version "$py" \
    --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$dir" \
    hydra-core 'omegaconf<2.4' datasets dill multiprocess schedulefree xxhash "$@"
# the ANTLR runtime Hydra pins is published as source only: a wheel made from it here
python -m pip wheel --no-deps -w "$dir" "antlr4-python3-runtime==4.9.3"
ls "$dir"
