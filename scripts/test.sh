#!/usr/bin/env bash
# The test suite: type stubs for TensorRT (installed without their uninstallable `tensorrt` dependency), mypy, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 scripts/setup_trt_stubs.py
python3 -m mypy quant
python3 -m pytest -q "$@"
