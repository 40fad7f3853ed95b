#!/usr/bin/env bash
# The one prepared GPU check for a session that is lent a device machine (about 8 minutes).
#
# Here, before the call (the data does not travel on its own):
#   mkdir -p .devdata && cp ../shared/data/cifar10-jpeg.tar.gz .devdata/ && echo /.devdata/ >> .git/info/exclude
# Then: device run, command "bash benchmarks/device_check.sh", carry [".devdata"], timeout_s 600.
# Everything it measures lands in $OUT: commit it under docs/ labelled with the GPU.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=src ASBNN_DATA=.devdata ASBNN_CACHE=/tmp/asbnn-cache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
# 1. speed (~5 min): steps in bf16 (what training uses) with FLOP/s and peak memory; each of fp32,
#    channels_last, bf16 and torch.compile before/after; sampled-model evaluation (batched vs loop);
#    data pipeline; scaling. bench.py saves its JSON after every section, so a cut-short run keeps data.
timeout 330 python3 benchmarks/bench.py --repeats 10 --eval-images 10000 --eval-samples 10 --out "$OUT" \
  2>&1 | grep -v Warning | tee "$OUT/bench.log"
# 2. the full-scale recipe, cut short: ResNet-20 on CIFAR-10, VI and VI + AS, 2 epochs each, to time an
#    epoch and check that the full scale runs unchanged on a GPU (~3 min)
for method in vi as; do
  timeout 100 python3 -m asbnn.cli train table1-cifar10-resnet20-$method epochs=2 eval_samples=100 \
    --out "/tmp/runs/$method" --quiet 2>&1 | tail -n 12 | tee "$OUT/full-$method.log"
  cp "/tmp/runs/$method/log.jsonl" "$OUT/full-$method-log.jsonl" 2>/dev/null
done
