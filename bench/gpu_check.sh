#!/usr/bin/env bash
# One GPU check of the workflow (issues 16, 22), under 8 minutes in all. On the GPU host, from
# the checkout's root:
#     source .device/setup_device.sh && bash bench/gpu_check.sh
# Steps (each under `timeout`, each independent; a failed step is noted and the next one runs;
# a step is skipped when the time left is too short for it):
#   1. nvidia-smi and the versions, then the GPU tests (`pytest -m gpu`, tests/test_gpu.py,
#      under a minute: CUDA vs CPU equality, bf16/fp16 paths, no per-batch synchronisation,
#      the torch.compile graph count, the card's precision; their output into summary.md);
#   2. bench/run_benchmark.py on CUDA at 256 px on synthetic data, both tasks (ResNet50,
#      U-Net/ResNet34), at the paper's batch (30), then at a large one (128): limit vs
#      workflow, training and inference, data-path share; arrays resident on the GPU;
#   3. the same at batch 30 with the host data path (pinned batches), for comparison;
#   4. the real 10-patient sample through Snakemake (bench/gpu_sample.yaml), four jobs on
#      the one GPU (gpu_jobs_per_device=4, --resources gpu=4), with each job's wall time;
#   5. if time is left, batch 30 with torch.compile (bench_compile.json).
# Everything goes to $OUT (default ./gpu-check-out): summary.md (all of it, readable),
# bench.md/.json, bench_large.json, bench_host.json, bench_compile.json, workflow.log,
# workflow_jobs.tsv (8 files at most).
# Knobs for a dry run on the CPU (tests/test_gpu_check.py): GPU_CHECK_DEVICE (cuda),
# GPU_CHECK_SIZE (256), GPU_CHECK_BATCHES ("30 128"), GPU_CHECK_BENCH_ARGS (extra arguments),
# GPU_CHECK_CLASSIFIER (resnet50), GPU_CHECK_ENCODER (resnet34), GPU_CHECK_BUDGET (seconds, 480),
# GPU_CHECK_SNAKEMAKE_ARGS (extra, e.g. -n), GPU_CHECK_LOCAL_DIR (/tmp/local), GPU_CHECK_SLOTS
# (jobs sharing the GPU, 4), GPU_CHECK_COMPILE (1; 0 skips step 5), PYTHON (python3).
set -u
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
SIZE=${GPU_CHECK_SIZE:-256}
BATCHES=${GPU_CHECK_BATCHES:-30 128}
BUDGET=${GPU_CHECK_BUDGET:-480}
CLASSIFIER=${GPU_CHECK_CLASSIFIER:-resnet50}
ENCODER=${GPU_CHECK_ENCODER:-resnet34}
LOCAL_DIR=${GPU_CHECK_LOCAL_DIR:-/tmp/local}
SLOTS=${GPU_CHECK_SLOTS:-4}
SUMMARY="$OUT/summary.md"
START=$SECONDS
CORES=$("$PY" -c "import os; print(len(os.sched_getaffinity(0)))" 2>/dev/null || echo 4)
export PYTHONUNBUFFERED=1

left() { echo $((BUDGET - (SECONDS - START))); }
note() { echo "$*" | tee -a "$SUMMARY"; }

# step NAME SECONDS [--log FILE] COMMAND...: run with a time limit no longer than the time
# left (output to FILE, else to the terminal).
step() {
  local name=$1 limit=$2 rc began log=/dev/stdout
  shift 2
  if [ "$1" = "--log" ]; then
    log=$2
    shift 2
  fi
  local remaining
  remaining=$(left)
  if [ "$remaining" -lt 30 ]; then
    note "- $name: skipped ($remaining s left of the ${BUDGET} s budget)"
    return 0
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  began=$SECONDS
  timeout --signal=TERM --kill-after=15 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  note "- $name: exit $rc after $((SECONDS - began)) s (limit $limit s)"
  return 0
}

{
  echo "# GPU check ($(date -u '+%Y-%m-%d %H:%M UTC'))"
  echo
  echo "Commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown); $CORES cores."
  echo
  echo '```'
  nvidia-smi 2>&1 | head -25 || echo "nvidia-smi: not found"
  "$PY" -c "import torch, timm, segmentation_models_pytorch as smp; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-', 'timm', timm.__version__, 'smp', smp.__version__)" 2>&1
  echo '```'
  echo
  echo "## Steps"
  echo
} > "$SUMMARY"
cat "$SUMMARY"

# The GPU tests first (skipped, not failed, without CUDA); output at the end of summary.md.
step "GPU tests (pytest -m gpu)" 90 --log "$OUT/gpu_tests.log" \
  "$PY" -m pytest -m gpu tests/ -q -s -rfEs -p no:cacheprovider

COMMON=(--device "$DEVICE" --image-size "$SIZE" --classifier "$CLASSIFIER" --arch Unet
  --encoder "$ENCODER" --threads "$CORES" --no-naive --workdir /tmp --metric-slices 256
  --warmup 3 --batches 10)
FIRST=${BATCHES%% *}
LARGE=${BATCHES#* }
# Separate runs, each with its own limit, so that one slow or failing run loses only its rows.
# shellcheck disable=SC2086
step "benchmark, batch $FIRST, arrays on the device" 150 \
  "$PY" bench/run_benchmark.py --output "$OUT/bench.md" --batch-size "$FIRST" --repeats 2 \
  "${COMMON[@]}" ${GPU_CHECK_BENCH_ARGS:-}
# shellcheck disable=SC2086
step "benchmark, batch $LARGE, arrays on the device" 100 \
  "$PY" bench/run_benchmark.py --output "$OUT/bench_large.md" --batch-size $LARGE \
  --repeats 1 "${COMMON[@]}" ${GPU_CHECK_BENCH_ARGS:-}
# shellcheck disable=SC2086
step "benchmark, batch $FIRST, host data path (pinned batches)" 70 \
  "$PY" bench/run_benchmark.py --output "$OUT/bench_host.md" --batch-size "$FIRST" \
  --data-path host --repeats 1 "${COMMON[@]}" ${GPU_CHECK_BENCH_ARGS:-}
rm -f "$OUT/bench_large.md" "$OUT/bench_host.md"  # the same tables go into summary.md

RESULTS=$(
  "$PY" -c "import yaml; print(yaml.safe_load(open('bench/gpu_sample.yaml'))['results_dir'])" \
    2>/dev/null || echo /tmp/brainmri-gpu-sample
)
if [ -d "$LOCAL_DIR" ]; then
  # shellcheck disable=SC2086
  step "real sample through Snakemake ($SLOTS jobs on one GPU)" 240 --log "$OUT/workflow.log" \
    "$PY" -m snakemake --configfile bench/gpu_sample.yaml --cores "$CORES" --scheduler greedy \
    --resources gpu="$SLOTS" \
    --config "data={source: local, local_dir: $LOCAL_DIR}" gpu_jobs_per_device="$SLOTS" \
    --keep-going ${GPU_CHECK_SNAKEMAKE_ARGS:-}
else
  note "- real sample: skipped ($LOCAL_DIR not found; source .device/setup_device.sh first)"
fi

# Last and optional (when time is left): torch.compile, limit and workflow compiled alike.
if [ "${GPU_CHECK_COMPILE:-1}" = 1 ]; then
  # shellcheck disable=SC2086
  step "benchmark, batch $FIRST, torch.compile" 120 \
    "$PY" bench/run_benchmark.py --output "$OUT/bench_compile.md" --batch-size "$FIRST" \
    --compile --repeats 1 "${COMMON[@]}" ${GPU_CHECK_BENCH_ARGS:-}
  rm -f "$OUT/bench_compile.md"
else
  note "- torch.compile: skipped (GPU_CHECK_COMPILE=${GPU_CHECK_COMPILE})"
fi

# Per-job wall time from the rules' benchmark files (the `s` column), and the summaries.
"$PY" - "$RESULTS" "$OUT" <<'PYTHON' >> "$SUMMARY" 2>&1 || true
import csv, json, sys
from pathlib import Path

results, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for tsv in sorted((results / "benchmarks").rglob("*.tsv")) if results.is_dir() else []:
    with tsv.open() as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            rows.append((str(tsv.relative_to(results / "benchmarks")), float(row["s"])))
if rows:
    with (out / "workflow_jobs.tsv").open("w") as handle:
        handle.write("job\tseconds\n")
        handle.writelines(f"{job}\t{seconds:.1f}\n" for job, seconds in rows)
    print("\n## Workflow jobs on the real sample (wall s)\n")
    print("| job | s |\n| --- | ---: |")
    for job, seconds in rows:
        print(f"| {job} | {seconds:.1f} |")
metrics = results / "report" / "metrics.json"
if metrics.is_file():
    print("\n## Real-sample report metrics\n\n```")
    print(json.dumps(json.loads(metrics.read_text()), indent=1)[:3000])
    print("```")
sys.path.insert(0, ".")
try:
    from bench.benchmark import format_markdown
except Exception as error:  # the summary must not fail for a missing module
    format_markdown = None
    print(f"(bench.benchmark not importable: {error})")
for name, title in (
    ("bench.json", "arrays on the device, paper's batch"),
    ("bench_large.json", "arrays on the device, large batch"),
    ("bench_host.json", "host data path (pinned batches)"),
    ("bench_compile.json", "torch.compile"),
):
    path = out / name
    if not path.is_file():
        print(f"\n## {name}: not written\n")
        continue
    print(f"\n## Benchmark: {title} ({name})\n")
    text = format_markdown(json.loads(path.read_text())) if format_markdown else path.read_text()
    print(text.replace("# Benchmark\n", "", 1))
PYTHON
if [ -f "$OUT/gpu_tests.log" ]; then
  { echo; echo "## GPU tests (pytest -m gpu, last 40 lines)"; echo; echo '```'
    tail -40 "$OUT/gpu_tests.log"; echo '```'; } >> "$SUMMARY"
  rm -f "$OUT/gpu_tests.log"  # in summary.md (8 files at most)
fi
if [ -f "$OUT/workflow.log" ]; then
  { echo; echo "## Workflow log (last 30 lines)"; echo; echo '```'; tail -30 "$OUT/workflow.log"; echo '```'; } >> "$SUMMARY"
fi
note ""
note "Total: $((SECONDS - START)) s."
ls -l "$OUT"
