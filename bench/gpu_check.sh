#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (device tool): CUDA tests of the page mover, then the
# save/load benchmark beside pinned memcpy. Output goes to $OUT (or ./gpu-check) for the closing note.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-check}"; mkdir -p "$OUT"
python -m pip install -q -e '.[dev]' >"$OUT/install.log" 2>&1 || { echo "install failed"; tail -20 "$OUT/install.log"; }
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python -m pytest -q -ra tests/unit/test_movers.py 2>&1 | tee "$OUT/cuda-tests.txt"
python bench/device_transfer_bench.py --repeats 20 2>&1 | tee "$OUT/device-bench.txt"
