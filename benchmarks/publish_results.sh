#!/usr/bin/env bash
# Copy the small files of every finished run of a reproduce folder into the repository (config,
# log, evaluations, done.json; never checkpoints), then rewrite the report there from them.
# usage: benchmarks/publish_results.sh RESULTS_DIR docs/results/NAME TABLE SCALE SEEDS
set -euo pipefail
src=$1 dst=$2 table=$3 scale=$4 seeds=$5
mkdir -p "$dst/runs"
for run in "$src"/runs/*/; do
  [ -f "$run/done.json" ] || continue  # unfinished: left out
  name=$(basename "$run")
  for f in done.json run/config.yaml run/log.jsonl run/eval/eval.json run/eval/eval.md \
           run/eval-recalibrated/eval.json run/eval-recalibrated/eval.md; do
    if [ -f "$run/$f" ]; then mkdir -p "$(dirname "$dst/runs/$name/$f")"; cp "$run/$f" "$dst/runs/$name/$f"; fi
  done
done
asbnn reproduce "$table" --scale "$scale" --seeds "$seeds" --out "$dst" --report-only --quiet
