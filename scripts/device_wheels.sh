#!/usr/bin/env bash
# Prepare a GPU session, on this (CPU) machine: the wheels the bare GPU machine lacks, and the corpus.
#
# The lent GPU machine has Python 3.12, torch (CUDA) and most scientific packages, no network, and no
# pydantic (drnn's config schema). This downloads, for CPython 3.12 on manylinux x86_64, exactly the
# versions drnn is tested with here into .whl/ (git-ignored), and copies the Time Machine into
# .device-data/ (git-ignored): the ../shared folder beside a checkout does not travel to the device.
#
# Which packages: drnn's dependencies (pyproject.toml: torch, typer, rich, pyyaml, requests, pydantic,
# safetensors; tests: pytest, hypothesis) minus what the machine's image already holds (see the device
# tool's package list), plus their own Requires-Dist: pydantic → pydantic-core (exact pin),
# annotated-types, typing-inspection, typing-extensions>=4.16; typer 0.29 → pydantic, rich>=13.8,
# shellingham, annotated-doc. typer, rich, typing-extensions, shellingham and annotated-doc are present
# there in unknown versions, so the tested ones travel too (without the last two, typer does not import). One version of each: two would stop the install.
#
#   scripts/device_wheels.sh            # then, through the device tool (carry: .whl, .device-data):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py $OUT/gpu
set -euo pipefail
# A relative DRNN_TEST_CORPUS is the caller's: resolved before moving to the repository root
corpus=$(realpath -m "${DRNN_TEST_CORPUS:-$(dirname "$0")/../../shared/data/timemachine.txt}")
cd "$(dirname "$0")/.."
# gpu_check.py stops at once without the corpus: found missing on the device, it costs a machine start
if [[ ! -f $corpus && ! -f .device-data/timemachine.txt ]]; then
    echo "device_wheels: $corpus not found; put the Time Machine at .device-data/timemachine.txt (or set DRNN_TEST_CORPUS)" >&2
    exit 1
fi

PACKAGES=(
    pydantic==2.14.4
    pydantic-core==2.50.5
    annotated-types==0.8.0
    typing-inspection==0.4.5
    typing-extensions==4.16.0
    typer==0.29.2
    shellingham==1.5.4
    annotated-doc==0.0.7
    rich==15.0.0
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

rm -rf .whl
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d .whl "${PACKAGES[@]}"

if [[ -f $corpus ]]; then
    mkdir -p .device-data
    cp "$corpus" .device-data/timemachine.txt
fi
echo "090b5e7e70c295757f55df93cb0a180b9691891a  .device-data/timemachine.txt" | sha1sum --check --quiet
ls -1 .whl .device-data 2>/dev/null
du -sh .whl
