#!/usr/bin/env bash
# Compare Dice with and without the long skips: the study of configs/study/long_skips.yaml
# (10 variants × 3 seeds × 5 folds) on every visible GPU of this machine, one run per GPU at a
# time, then the report (runs/study/long_skips/report.md). Re-running resumes; finished runs
# are kept. Extra arguments go to `segmentation study run`:
#   scripts/ablate_long_skips.sh --dry-run                 # the plan, nothing started
#   scripts/ablate_long_skips.sh --devices 0,1 --runs-per-device 2
#   STUDY=configs/study/quick.yaml scripts/ablate_long_skips.sh   # the CPU-sized study
set -euo pipefail
cd "$(dirname "$0")/.."
study="${STUDY:-configs/study/long_skips.yaml}"
if [ -x .venv/bin/segmentation ]; then segmentation=.venv/bin/segmentation; else segmentation=segmentation; fi
exec "$segmentation" study run "$study" "$@"
