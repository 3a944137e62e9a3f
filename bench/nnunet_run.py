"""nnU-Net v2 (the unmodified ``nnunetv2`` package, bench/requirements-nnunet.txt) inside the
quality benchmark: one outer fold's planning, training and prediction, each in a process of its
own (bench/quality_nnunet.py starts them) so that nnU-Net's environment (``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results``, read when nnunetv2 is imported) is the fold's and
the training's CPU seconds are this process's.

  python bench/nnunet_run.py prepare --root FOLD_DIR
  python bench/nnunet_run.py train --root FOLD_DIR --budget 100 --seed 42
  python bench/nnunet_run.py predict --root FOLD_DIR --inputs DIR --output DIR [--no-mirroring]

``prepare``: nnU-Net's fingerprint extraction, planning (``ExperimentPlanner``) and
preprocessing of the ``2d`` configuration, then the fold's ``splits_final.json`` (its train and
inner validation patients as fold 0). ``train``: :class:`nnUNetTrainerBudget`, nnU-Net's own
trainer (augmentation, deep supervision, Dice + CE loss, SGD with the poly schedule) whose
only change is the training length. ``predict``: nnU-Net's ``nnUNetPredictor`` (sliding window,
Gaussian weighting, mirroring TTA unless ``--no-mirroring``) on every case of ``--inputs``,
the tumor probability of each saved as ``<case>.npy`` (Z, H, W) float32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

DATASET = "Dataset001_LGG"
CONFIGURATION = "2d"
PLANS = "nnUNetPlans"


def environment(root: Path, step: str) -> dict[str, str]:
    """The environment nnU-Net reads (set before nnunetv2 is imported): the fold's folders,
    data augmentation in this process (``nnUNet_n_proc_DA=0``; the planner sets torch's
    threads to that number, so 1 there), no torch.compile, one thread for the libraries."""
    return {
        "nnUNet_raw": str(root / "nnUNet_raw"),
        "nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
        "nnUNet_results": str(root / "nnUNet_results"),
        "nnUNet_n_proc_DA": "1" if step == "prepare" else "0",
        "nnUNet_compile": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "BLOSC_NTHREADS": "1",
    }


def cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process and of its finished children (nnU-Net's worker pools)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time(), children.ru_utime + children.ru_stime


def prepare(root: Path) -> dict[str, float]:
    """Fingerprint, plan and preprocess the fold's dataset (2d only), one worker process."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
        preprocess,
    )

    own, children = cpu_seconds()
    wall = time.perf_counter()
    extract_fingerprints([1], num_processes=1, check_dataset_integrity=True)
    plan_experiments([1])
    preprocess([1], PLANS, configurations=(CONFIGURATION,), num_processes=(1,))
    own_end, children_end = cpu_seconds()
    return {
        "prepare_cpu_seconds": round(own_end - own + children_end - children, 1),
        "prepare_wall_seconds": round(time.perf_counter() - wall, 1),
    }


def budget_trainer():
    """nnU-Net's trainer, ended by a CPU-seconds budget (defined here: nnunetv2 is imported
    only once the environment is set)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    class BudgetSpent(Exception):
        pass

    class nnUNetTrainerBudget(nnUNetTrainer):  # nnU-Net's naming
        """``nnUNetTrainer`` whose training ends when ``budget`` CPU seconds of this process
        are spent, as ``nnUNetTrainer_Xepochs`` ends it after X epochs. Shorter epochs
        (``ITERATIONS`` training and ``VAL_ITERATIONS`` validation batches, nnU-Net's 5:1)
        so that several validate and checkpoint inside the budget; after the first, the
        number of epochs (and so the poly schedule's length) is set to what the budget
        holds at that epoch's cost. An epoch starts only while at least half the last
        epoch's cost is left (the rule of the benchmark's recipe models); training then
        ends as nnU-Net ends it (``on_train_end``: checkpoint_final.pth)."""

        ITERATIONS = 10
        VAL_ITERATIONS = 2
        budget = float("inf")

        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_iterations_per_epoch = self.ITERATIONS
            self.num_val_iterations_per_epoch = self.VAL_ITERATIONS
            self.num_epochs = 1000  # an upper bound until the first epoch is measured
            self.epoch_marks: list[float] = []

        def spent(self) -> float:
            return time.process_time() - self.clock_start

        def on_epoch_start(self):
            now = self.spent()
            last = now - self.epoch_marks[-1] if self.epoch_marks else 0.0
            if len(self.epoch_marks) == 1:  # the first epoch's whole cost, checkpoint included
                epochs = int((self.budget - self.epoch_marks[0]) / max(last, 1e-6) + 0.5)
                self.num_epochs = max(1, min(epochs, 1000))
                self.lr_scheduler.max_steps = self.num_epochs
                self.print_to_log_file(f"budget {self.budget:.0f} CPU-s: {self.num_epochs} epochs")
            if self.epoch_marks and (
                self.current_epoch >= self.num_epochs or self.budget - now < last / 2
            ):
                raise BudgetSpent
            self.epoch_marks.append(now)
            super().on_epoch_start()

        def run_training(self):
            self.clock_start = time.process_time()
            try:
                super().run_training()
            except BudgetSpent:
                self.on_train_end()

    return nnUNetTrainerBudget


def train(root: Path, budget: float, seed: int) -> dict:
    """Train fold 0 of the fold's dataset, 2d, on the CPU under ``budget`` CPU seconds."""
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    preprocessed = root / "nnUNet_preprocessed" / DATASET
    plans = load_json(str(preprocessed / f"{PLANS}.json"))
    plans["continue_training"] = False  # as nnU-Net's get_trainer_from_args sets it
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    trainer = budget_trainer()(plans, CONFIGURATION, 0, dataset_json, torch.device("cpu"))
    trainer.budget = budget
    start = time.process_time()
    trainer.run_training()
    marks = trainer.epoch_marks
    config = plans["configurations"][CONFIGURATION]
    return {
        "seconds": round(time.process_time() - start, 1),
        "epochs_run": len(marks),
        "epochs_planned": trainer.num_epochs,
        "stopped_by": "epochs" if len(marks) >= trainer.num_epochs else "budget",
        "setup_seconds": round(marks[0], 1) if marks else None,
        "iterations_per_epoch": trainer.num_iterations_per_epoch,
        "batch_size": config["batch_size"],
        "patch_size": config["patch_size"],
        "trainer": type(trainer).__name__,
        "checkpoint": "checkpoint_final.pth",
    }


def model_folder(root: Path, trainer: str = "nnUNetTrainerBudget") -> Path:
    return root / "nnUNet_results" / DATASET / f"{trainer}__{PLANS}__{CONFIGURATION}"


def predictor(root: Path, mirroring: bool):
    """nnU-Net's predictor with the fold's checkpoint_final.pth. Initialised by hand with
    the network ``nnUNetTrainer`` builds (the budget trainer does not change it): nnU-Net's
    own loader looks the trainer class up inside the nnunetv2 package only."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = model_folder(root)
    dataset_json = load_json(str(folder / "dataset.json"))
    plans = PlansManager(load_json(str(folder / "plans.json")))
    checkpoint = torch.load(
        folder / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False
    )
    configuration = plans.get_configuration(checkpoint["init_args"]["configuration"])
    network = nnUNetTrainer.build_network_architecture(
        plans, configuration,
        determine_num_input_channels(plans, configuration, dataset_json),
        plans.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=False,
    )  # fmt: skip
    network.load_state_dict(checkpoint["network_weights"])
    predictor = nnUNetPredictor(
        tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
        perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False,
    )  # fmt: skip
    predictor.manual_initialization(
        network, plans, configuration, [checkpoint["network_weights"]], dataset_json,
        checkpoint["trainer_name"], checkpoint["inference_allowed_mirroring_axes"],
    )  # fmt: skip
    return predictor


def predict(root: Path, inputs: Path, output: Path, mirroring: bool) -> dict:
    """Tumor probabilities (Z, H, W) of every case in ``inputs`` as ``output/<case>.npy``."""
    import numpy as np
    import torch
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    torch.set_num_threads(1)
    model = predictor(root, mirroring)
    files = create_lists_from_splitted_dataset_folder(str(inputs), ".nii.gz")
    start = time.process_time()
    results = model.predict_from_files_sequential(files, None, save_probabilities=True)
    output.mkdir(parents=True, exist_ok=True)
    for case_files, (_, probabilities) in zip(files, results, strict=True):
        name = Path(case_files[0]).name[: -len("_0000.nii.gz")]
        np.save(output / f"{name}.npy", np.asarray(probabilities[1], dtype=np.float32))
    return {"cases": len(files), "seconds": round(time.process_time() - start, 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("step", choices=("prepare", "train", "predict"))
    parser.add_argument("--root", required=True, type=Path, help="the fold's nnU-Net folder")
    parser.add_argument("--budget", type=float, default=100.0, help="training CPU seconds")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--inputs", type=Path, help="predict: a folder of cases")
    parser.add_argument("--output", type=Path, help="predict: where the .npy files go")
    parser.add_argument("--no-mirroring", action="store_true", help="predict without TTA")
    parser.add_argument("--info", type=Path, help="write what the step cost here (JSON)")
    args = parser.parse_args(argv)
    expected = environment(args.root, args.step)
    if any(os.environ.get(key) != value for key, value in expected.items()):
        os.environ.update(expected)  # a direct call: re-run with nnU-Net's environment set
        os.execv(sys.executable, [sys.executable, __file__, *sys.argv[1:]])
    if args.step == "prepare":
        info = prepare(args.root)
    elif args.step == "train":
        info = train(args.root, args.budget, args.seed)
    else:
        info = predict(args.root, args.inputs, args.output, not args.no_mirroring)
    if args.info:
        args.info.write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
