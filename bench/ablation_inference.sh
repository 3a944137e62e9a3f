#!/usr/bin/env bash
# Inference-side ablation on a finished segmentation run (no retraining): the fold ensemble of
# ARCH with and without flip TTA, and with per-volume post-processing variants; the
# segmentation voter's test accuracy. Usage (from the repository root):
#   bench/ablation_inference.sh RUN_DIR OUT_DIR [ARCH] [FOLDS]
# Prints one TSV row per variant: variant, tumor-slice Dice, all-slice Dice, volume Dice,
# missed tumor slices (empty prediction), false-positive slices.
set -euo pipefail
run=$1 out=$2 arch=${3:-unet} folds=${4:-2}
py=${PYTHON:-python}
export PYTHONPATH=$PWD
common=(--manifest "$run/data/manifest.csv" --splits "$run/splits/splits.csv")
mkdir -p "$out"
for tta in plain tta; do
  probs=()
  for ((k = 0; k < folds; k++)); do
    dir=$out/$tta/fold$k
    mkdir -p "$dir"
    if [[ ! -f $dir/test_probabilities.npy ]]; then
      flag=(); [[ $tta == tta ]] && flag=(--tta)
      $py workflow_scripts/evaluate_segmenter.py --checkpoint "$run/segmentation/$arch/fold$k/model.pt" \
        --fold "$k" "${common[@]}" --images "$run/data/lgg/images.npy" \
        --masks "$run/data/lgg/masks.npy" --threshold 0.5 --threads 2 "${flag[@]}" \
        --val-metrics "$dir/val_metrics.json" --test-metrics "$dir/test_metrics.json" \
        --per-slice "$dir/per_slice.csv" --test-probabilities "$dir/test_probabilities.npy" \
        2> "$dir.log" || { cat "$dir.log"; exit 1; }
    fi
    probs+=("$dir/test_probabilities.npy")
  done
  for post in '{}' '{"min_component_voxels": 20}' '{"min_component_voxels": 100}' '{"keep_largest": true}'; do
    name=$tta-$(echo "$post" | tr -dc 'a-z0-9_')
    dir=$out/ensemble/$name
    mkdir -p "$dir"
    $py workflow_scripts/segmentation_ensemble.py --probabilities "${probs[@]}" "${common[@]}" \
      --masks "$run/data/lgg/masks.npy" --threshold 0.5 --postprocess "$post" --threads 2 \
      --metrics "$dir/test_metrics.json" --per-slice "$dir/per_slice.csv" \
      --output-probabilities "$dir/test_probabilities.npy" 2> "$dir.log"
    $py - "$dir" "$name" <<'PY'
import json, sys
import pandas as pd
d, name = sys.argv[1:]
r = json.load(open(f"{d}/test_metrics.json"))
s = pd.read_csv(f"{d}/per_slice.csv")
missed = int(((s.has_tumor == 1) & (s.pred_area == 0)).sum())
fp = int(((s.has_tumor == 0) & (s.pred_area > 0)).sum())
print(f"{name}\t{r['tumor_slices']['dice']['mean']:.3f}\t{r['all_slices']['dice']['mean']:.3f}"
      f"\t{r['volume_dice']['mean']:.3f}\t{missed}/{int((s.has_tumor == 1).sum())}\t{fp}")
PY
  done
  folds_csv=()
  for ((k = 0; k < folds; k++)); do folds_csv+=("$out/$tta/fold$k/per_slice.csv"); done
  $py workflow_scripts/segmentation_voter.py --probabilities "$out/ensemble/$tta-/test_probabilities.npy" \
    --fold-slices "${folds_csv[@]}" "${common[@]}" --output "$out/voter-$tta/test_predictions.csv" \
    --choice "$out/voter-$tta/min_pixels.json" 2>&1 | grep -o "Segmentation voter.*"
done
