"""Inference cost per patient (issue 33): CPU seconds of nnU-Net's predictor and of the
workflow's volume prediction (workflow_scripts/predict_volume.py's code path) on the same
held-out patients of one outer fold of the quality benchmark, one thread each.

  OMP_NUM_THREADS=1 nice -n 19 python bench/inference_cost.py \\
      --fold-dir results/quality/models/nnunet/fold0 \\
      --segmenters results/quality/models/recipe/fold0/model.pt \\
      --kaggle results/quality/raw_lgg/kaggle_3m --out results/inference_cost

Each measurement runs in a process of its own (so its CPU seconds are only its own):

* ``nnunet``: bench/nnunet_run.py's predictor (nnU-Net's ``nnUNetPredictor`` as
  ``nnUNetv2_predict`` runs by default: sliding window, step 0.5, Gaussian weighting, mirroring;
  ``--no-mirroring`` without it) with the fold's ``checkpoint_final.pth``; per patient
  ``predict_from_files_sequential`` on its ``inputs/test`` NIfTI case (read, nnU-Net's
  preprocessing, prediction, resampling back to the case's shape).
* ``workflow``: predict_volume.py's steps (``EnsembleModels``, then per patient
  ``read_input``, ``predict_volume``, ``write_patient``) with ``--segmenters`` (the recipe's
  fold model(s)), one classifier (the workflow's ensemble needs one; an untrained ResNet18 of
  config/cpu.yaml's classifier settings at 64 px: its cost does not depend on its weights), the
  cpu.yaml post-processing; inputs either the Kaggle slice folders (the workflow's input,
  256 px TIFFs resized to 64) or the same NIfTI files nnU-Net reads (``--nifti``, 64 px).

Model loading (after the imports) is measured apart from per-patient prediction; CPU seconds are
``time.process_time()`` (user + system of the process, all its threads). Writes
``<out>/<name>.json`` per measurement and ``<out>/inference_cost.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CASE = "_0000.nii.gz"
POSTPROCESS = '{"min_component_voxels": 16, "keep_largest": true}'  # config/cpu.yaml's


def test_patients(fold_dir: Path) -> list[str]:
    """The held-out patients of the fold (the cases nnU-Net's predictor read)."""
    inputs = fold_dir / "inputs" / "test"
    return sorted(p.name[: -len(CASE)] for p in inputs.glob(f"*{CASE}"))


def summary(load: float, per_patient: dict[str, float], **extra) -> dict:
    values = list(per_patient.values())
    return {
        "load_cpu_s": round(load, 2),
        "patients": len(values),
        "per_patient_cpu_s": {k: round(v, 3) for k, v in per_patient.items()},
        "mean_cpu_s": round(sum(values) / len(values), 3),
        "total_cpu_s": round(sum(values), 2),
        **extra,
    }


def measure_nnunet(args: argparse.Namespace) -> dict:
    """nnU-Net's predictor, loaded once, then each test case on its own (one thread)."""
    from bench import nnunet_run

    expected = nnunet_run.environment(args.fold_dir, "predict")
    if any(os.environ.get(k) != v for k, v in expected.items()):
        os.environ.update(expected)  # nnU-Net reads its folders when it is imported
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    import torch
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    torch.set_num_threads(1)
    start = time.process_time()
    predictor = nnunet_run.predictor(args.fold_dir, not args.no_mirroring)
    load = time.process_time() - start
    files = create_lists_from_splitted_dataset_folder(
        str(args.fold_dir / "inputs" / "test"), ".nii.gz"
    )
    per_patient = {}
    for case in files:
        name = Path(case[0]).name[: -len(CASE)]
        start = time.process_time()
        results = predictor.predict_from_files_sequential([case], None, save_probabilities=True)
        _ = [probabilities[1] for _, probabilities in results]
        per_patient[name] = time.process_time() - start
    return summary(
        load,
        per_patient,
        mirroring=not args.no_mirroring,
        tile_step_size=predictor.tile_step_size,
        threads=torch.get_num_threads(),
    )


def nifti_folders(fold_dir: Path, patients: list[str], root: Path) -> dict[str, Path]:
    """Each patient's nnU-Net case as predict_volume's NIfTI folder (copies named *_pre,
    *_flair, *_post: channels 0000 pre-contrast, 0001 FLAIR, 0002 post-contrast; the workflow
    refuses links out of an input folder)."""
    folders = {}
    for patient in patients:
        folder = root / patient
        folder.mkdir(parents=True)
        for channel, sequence in (("0000", "pre"), ("0001", "flair"), ("0002", "post")):
            source = fold_dir / "inputs" / "test" / f"{patient}_{channel}.nii.gz"
            shutil.copyfile(source, folder / f"{patient}_{sequence}.nii.gz")
        folders[patient] = folder
    return folders


def classifier_checkpoint(path: Path) -> Path:
    """An untrained classifier of config/cpu.yaml's settings (ResNet18, 64 px, no pretraining)."""
    import torch

    from brainmri.models import build_classifier, save_checkpoint

    torch.manual_seed(0)
    settings = {"backbone": "resnet18", "input_size": 64, "pretrained": False}
    save_checkpoint(
        path,
        build_classifier(settings),
        "classification",
        settings,
        preprocessing={"array_size": 64},
    )
    return path


def with_preprocessing(path: Path, folder: Path, size: int = 64) -> Path:
    """A copy of a benchmark segmenter checkpoint that records its preprocessing (the
    benchmark's models are trained on --size arrays and do not), for predict_volume's loader."""
    import torch

    from brainmri.models import safe_torch_load

    checkpoint = safe_torch_load(path)
    if "preprocessing" in checkpoint:
        return path
    checkpoint["preprocessing"] = {"array_size": size}
    target = folder / f"segmenter{len(list(folder.glob('segmenter*.pt')))}.pt"
    torch.save(checkpoint, target)
    return target


def measure_workflow(args: argparse.Namespace) -> dict:
    """predict_volume.py's steps: models loaded once, then each patient read, predicted and
    written; the classifier and segmentation calls inside also timed."""
    import torch

    from brainmri.accelerator import configure_torch
    from brainmri.evaluation.decision import add_ensemble_arguments, ensemble_rule
    from brainmri.inference.ensemble import EnsembleModels
    from brainmri.inference.predict import array_size
    from brainmri.inference.volume import predict_volume, write_patient
    from brainmri.inference.volume_io import read_input

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="inference_cost_"))
    classifier = classifier_checkpoint(work / "classifier.pt")
    segmenters = [with_preprocessing(p, work) for p in args.segmenters]
    patients = test_patients(args.fold_dir)
    if args.nifti:
        inputs = nifti_folders(args.fold_dir, patients, work / "inputs")
    else:
        inputs = {p: args.kaggle / p for p in patients}
    parser = argparse.ArgumentParser()
    add_ensemble_arguments(parser)
    options = [
        "--method",
        "majority",
        "--classifier-threshold",
        "0.5",
        "--segmentation-threshold",
        "0.5",
        "--postprocess",
        POSTPROCESS,
    ]
    rule_args = parser.parse_args([*options, *(["--tta"] if args.tta else [])])
    device = torch.device("cpu")
    configure_torch(device, torch.get_num_threads())
    start = time.process_time()
    size = array_size([classifier, *segmenters])
    models = EnsembleModels(
        [classifier], segmenters, ensemble_rule(rule_args), device, rule_args.tta
    )
    load = time.process_time() - start
    inside = {"segment": 0.0, "classify": 0.0}

    def timed(key, method):
        def call(*a, **k):
            begin = time.process_time()
            try:
                return method(*a, **k)
            finally:
                inside[key] += time.process_time() - begin

        return call

    models.segment_folds = timed("segment", models.segment_folds)
    models.probabilities = timed("classify", models.probabilities)
    per_patient, parts = {}, {}
    for patient, path in inputs.items():
        before = dict(inside)
        start = time.process_time()
        volume = read_input(path, "axial")
        read = time.process_time()
        result = predict_volume(volume, models, size, 0.5, rule_args.postprocess)
        predicted = time.process_time()
        write_patient(volume, result, work / "out" / patient)
        end = time.process_time()
        per_patient[patient] = end - start
        parts[patient] = {
            "read": round(read - start, 3),
            "predict": round(predicted - read, 3),
            "write": round(end - predicted, 3),
            "segment": round(inside["segment"] - before["segment"], 3),
            "classify": round(inside["classify"] - before["classify"], 3),
            "slices": len(volume.slices),
        }
    mean = {
        k: round(sum(p[k] for p in parts.values()) / len(parts), 3)
        for k in ("read", "predict", "write", "segment", "classify")
    }
    return summary(
        load,
        per_patient,
        tta=rule_args.tta,
        segmenters=[str(p) for p in args.segmenters],
        input="nifti" if args.nifti else "kaggle",
        mean_parts=mean,
        parts=parts,
        threads=torch.get_num_threads(),
        size=size,
    )


def run_all(args: argparse.Namespace) -> None:
    """Every measurement in a process of its own, then the table."""
    args.out.mkdir(parents=True, exist_ok=True)
    common = [
        "--fold-dir",
        str(args.fold_dir),
        "--segmenters",
        *map(str, args.segmenters),
        "--kaggle",
        str(args.kaggle),
    ]
    runs = {
        "nnunet_mirroring": ["nnunet"],
        "nnunet_no_mirroring": ["nnunet", "--no-mirroring"],
        "workflow_kaggle": ["workflow"],
        "workflow_kaggle_tta": ["workflow", "--tta"],
        "workflow_nifti": ["workflow", "--nifti"],
    }
    for name, extra in runs.items():
        if args.only and name not in args.only:
            continue
        target = args.out / f"{name}.json"
        command = [sys.executable, __file__, *extra, *common, "--json", str(target)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        subprocess.run(command, env=env, check=True)
    lines = [
        "| measurement | patients | load CPU s | CPU s per patient (mean) | total |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for target in sorted(args.out.glob("*.json")):
        info = json.loads(target.read_text())
        lines.append(
            f"| {target.stem} | {info['patients']} | {info['load_cpu_s']:.2f} | "
            f"{info['mean_cpu_s']:.2f} | {info['total_cpu_s']:.1f} |"
        )
    (args.out / "inference_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", nargs="?", choices=("all", "nnunet", "workflow"), default="all")
    parser.add_argument("--fold-dir", type=Path, required=True, help="models/nnunet/fold<k>")
    parser.add_argument("--segmenters", nargs="+", type=Path, required=True)
    parser.add_argument("--kaggle", type=Path, required=True, help="Kaggle patient folders")
    parser.add_argument("--out", type=Path, default=Path("results/inference_cost"))
    parser.add_argument("--only", nargs="+", help="all: only these measurements")
    parser.add_argument("--no-mirroring", action="store_true", help="nnunet: no mirroring")
    parser.add_argument("--tta", action="store_true", help="workflow: flip TTA")
    parser.add_argument("--nifti", action="store_true", help="workflow: nnU-Net's NIfTI cases")
    parser.add_argument("--json", type=Path, help="nnunet / workflow: write the result here")
    args = parser.parse_args(argv)
    args.fold_dir = args.fold_dir.resolve()
    if args.step == "all":
        run_all(args)
        return
    info = measure_nnunet(args) if args.step == "nnunet" else measure_workflow(args)
    print(json.dumps({k: v for k, v in info.items() if k not in ("parts",)}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
