#!/usr/bin/env bash
# Does predict_volume over many patients take the time of inference, not of loading? Runs
# workflow_scripts/predict_volume.py of two code trees (BEFORE, e.g. a checkout without
# the load-once change, and AFTER, this one) with a run's models on 1 and on N patients of the
# real sample (Kaggle layout), and prints CPU seconds (user + sys) and wall seconds of each.
# The cost per extra patient is (t_N - t_1) / (N - 1); what is left of t_1 is the fixed cost
# (start-up and loading the models once). Usage (from the repository root):
#   [TTA=1] [SAMPLE=lgg-mri-segmentation.zip] bench/volume_loading.sh RUN_DIR BEFORE_REPO [ARCH] [N]
# e.g. bench/volume_loading.sh /tmp/predict-demo /work/main unet 10
set -euo pipefail
run=$1 before=$2 arch=${3:-unet} n=${4:-10}
py=${PYTHON:-python}
sample=${SAMPLE:-../shared/data/kaggle-mini/lgg-mri-segmentation.zip}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
unzip -q "$sample" 'kaggle_3m/TCGA_*' -d "$work"
mapfile -t patients < <(find "$work/kaggle_3m" -mindepth 1 -maxdepth 1 -type d | sort | head -n "$n")
models=(--classifiers "$run"/classification/*/model.pt
  --segmenters "$run/segmentation/$arch"/fold*/model.pt
  --method majority --classifier-threshold 0.5 --segmentation-threshold 0.5 ${TTA:+--tta})
printf 'code\tpatients\tslices\tcpu_s\twall_s\n'
for side in before after; do
  repo=$before
  [[ $side == after ]] && repo=$PWD
  for count in 1 "$n"; do
    out=$work/$side-$count
    slices=$(find "${patients[@]:0:count}" -name '*.tif' ! -name '*_mask.tif' | wc -l)
    start=$(date +%s.%N)
    PYTHONPATH=$repo /usr/bin/time -f '%U %S' -o "$work/time" "$py" \
      "$repo/workflow_scripts/predict_volume.py" --inputs "${patients[@]:0:count}" \
      "${models[@]}" --csv "$out/volumes.csv" --patients-dir "$out/patients" \
      2> "$out.log" || { cat "$out.log"; exit 1; }
    end=$(date +%s.%N)
    read -r user sys < "$work/time"
    printf '%s\t%s\t%s\t%.1f\t%.1f\n' "$side" "$count" "$slices" \
      "$(echo "$user + $sys" | bc)" "$(echo "$end - $start" | bc)"
  done
done
