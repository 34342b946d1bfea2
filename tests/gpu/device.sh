#!/usr/bin/env bash
# The GPU check as one prepared script for a lent GPU machine (the `device` tool), whose
# image has torch and pynvml but cannot reach a package index. Build the wheels here first:
#   mkdir -p .gpu/wheels && echo /.gpu/ >> .git/info/exclude
#   .venv/bin/pip download --only-binary=:all: --python-version 3.12 --no-deps -d .gpu/wheels \
#       starlette structlog "pytest>=8.4" pytest-asyncio asgi-lifespan sniffio iniconfig
#   .venv/bin/pip wheel --no-deps --no-build-isolation -w .gpu/wheels .
#   cp tests/gpu/device.sh .gpu/run.sh
# then run `bash .gpu/run.sh` on the device with `.gpu` carried.
set -u
export PYTHONUNBUFFERED=1
PY=/opt/torch/.venv/bin/python3  # the image's interpreter that holds torch
[ -x "$PY" ] || PY=python3
nvidia-smi -L
$PY -m pip install -q --no-index --no-deps --target /tmp/site .gpu/wheels/*.whl 2>&1 | tail -3
export PYTHONPATH=/tmp/site
$PY -c "import torch, overdrive; print('torch', torch.__version__, torch.cuda.is_available())"
# The installed package, not the source folders: run from a copy of the tests.
mkdir -p /tmp/t && cp -r tests pyproject.toml benchmarks /tmp/t/ && cd /tmp/t
timeout 240 $PY -m pytest tests/gpu tests/plugins/models/test_model_cache.py -v \
    -p no:cacheprovider -W "ignore::DeprecationWarning" 2>&1 | tee "$OUT/gpu-tests.log"
timeout 120 $PY benchmarks/models.py 2>&1 | tee "$OUT/models-bench.log"
