#!/usr/bin/env bash
# Wheels the GPU machine lacks (it has torch, Lightning, torchmetrics, scipy, matplotlib, rich,
# tensorboard, opencv, but no internet), for Python 3.12 on x86-64 Linux, into .whl/:
#   bash scripts/gpu_wheels.sh        # here, where pip reaches the package index
# scripts/gpu_check.sh installs them there into /tmp/site. .whl/ is ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
PYTHON=${PYTHON:-.venv/bin/python}
PACKAGES=(
  monai==1.6.1 nibabel==5.4.2 importlib_resources==7.1.0
  jsonargparse==4.53.0 docstring_parser==0.18.0 typeshed_client==2.15.0
  albumentations==2.0.8 albucore==0.0.24 stringzilla==5.3.2 simsimd==6.5.16
  pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  dynamic-network-architectures==0.4.4
)
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64 --platform any \
  -d .whl "${PACKAGES[@]}"
du -sh .whl
