#!/usr/bin/env bash
# vitkit on one CUDA GPU, in at most ~8 minutes:
#   1. the throughput table vs timm (bf16 autocast, flash attention through SDPA, eager and torch.compile);
#   2. the CIFAR-10 recipe through `vitkit train`, reporting the time to 94 % validation top-1 (if reached).
#
#   benchmarks/gpu.sh                 # on the GPU machine (its python3 with torch, timm, transformers; no internet)
#   benchmarks/gpu.sh --dry-run       # on a CPU: every code path in seconds (tiny models, 3 training steps)
#
# Environment: PYTHON (default: python3, or .venv/bin/python when present), CIFAR (default: the first of
# runs/gpu_data/cifar10-train.tar.gz, ../shared/datasets/cifar10-train.tar.gz that exists), OUT (reports;
# default runs/gpu), RUN (the training run folder with its checkpoints; default runs/gpu_cifar10), TRAIN_MINUTES
# (default 4), BENCH_SECONDS (time limit of the throughput table; default 170; 0 skips it), RECIPE (default
# cifar10_gpu), COMPILE (default 1: `vitkit train --compile`, ~30 s of compile for ~1.5x the model step; 0: eager),
# TRAIN_ARGS (more `vitkit train` flags, e.g. "--auto-augment trivialaugment").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.

DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
CIFAR="${CIFAR:-}"
if [[ -z "$CIFAR" ]]; then
  for c in runs/gpu_data/cifar10-train.tar.gz ../shared/datasets/cifar10-train.tar.gz; do
    if [[ -f "$c" ]]; then CIFAR="$c"; break; fi
  done
fi
OUT="${OUT:-runs/gpu}"
RUN="${RUN:-runs/gpu_cifar10}"
MINUTES="${TRAIN_MINUTES:-4}"
BENCH_SECONDS="${BENCH_SECONDS:-170}"
mkdir -p "$OUT"

echo "== machine"
"$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(), "| flash sdpa:", torch.backends.cuda.flash_sdp_enabled())
EOF

echo "== throughput vs timm (bf16)"
if (( DRY )); then
  timeout 300 "$PY" benchmarks/gpu_bench.py --dry-run --json | tee "$OUT/throughput.txt"
elif [[ "$BENCH_SECONDS" == 0 ]]; then
  echo "skipped (BENCH_SECONDS=0)"
else
  timeout "$BENCH_SECONDS" "$PY" benchmarks/gpu_bench.py --json | tee "$OUT/throughput.txt" \
    || echo "throughput table: stopped (limit ${BENCH_SECONDS} s); the rows above are complete measurements"
fi

echo "== CIFAR-10: vitkit train, time to 94 % validation top-1"
RECIPE="${RECIPE:-}"
if [[ -z "$RECIPE" ]]; then
  if [[ -f vitkit/recipes/cifar10_gpu.yaml ]]; then
    RECIPE=cifar10_gpu; EXTRA=()
  else  # no GPU recipe from the trainer yet: the CPU budget recipe, with a GPU-sized batch
    RECIPE=cifar10_budget; EXTRA=(--batch-size 512 --lr 0.003)
  fi
else
  EXTRA=()
fi
[[ "${COMPILE:-1}" == 1 ]] && EXTRA+=(--compile)
read -r -a MORE <<< "${TRAIN_ARGS:-}"
EXTRA+=("${MORE[@]}")
if [[ -z "$CIFAR" || ! -f "$CIFAR" ]]; then
  echo "CIFAR-10 archive not found; set CIFAR=/path/to/cifar10-train.tar.gz (skipping the training run)"
  exit 0
fi
rm -rf "$RUN"
if (( DRY )); then
  # a 3-step run on the CPU: checks the recipe, the data path and the metrics parsing below, nothing more
  "$PY" - "$CIFAR" "$RUN" "$RECIPE" <<'EOF'
import sys
from vitkit.train.fit import fit
from vitkit.train.recipe import build_config
data, out, recipe = sys.argv[1:4]
fit(build_config(recipe, data=data, out=out, stop_after_steps=3, epochs=1, progress=False, val_split=0.02))
EOF
else
  timeout "$(awk "BEGIN{print int($MINUTES * 60 + 90)}")" "$PY" -m vitkit train --data "$CIFAR" --recipe "$RECIPE" --minutes "$MINUTES" \
    --out "$RUN" --no-progress "${EXTRA[@]}" 2>&1 | tee "$OUT/train_log.txt" || echo "training run: stopped at its time limit"
fi
cp "$RUN"/metrics.jsonl "$OUT/" 2>/dev/null || true

"$PY" - "$RUN" <<'EOF'
import sys
from vitkit.train.logging import read_metrics
recs = [r for r in read_metrics(sys.argv[1]) if r.get("kind") == "val" and "val_top1" in r]
hit = next((r for r in recs if r["val_top1"] >= 0.94), None)
best = max((r["val_top1"] for r in recs), default=None)
print(f"validation evaluations: {len(recs)}; best top-1: {best if best is None else f'{best:.2%}'}")
print(f"time to 94 %: {hit['time']:.0f} s (step {hit['step']})" if hit else "time to 94 %: not reached in this run")
EOF
