"""The training loop shared by classification and segmentation.

Adam (constant learning rate, or cosine annealing over the epochs), early stopping on validation
loss, best-validation-loss weights, a per-epoch history; precision, channels_last, the grad
scaler and compilation as the job's accelerator plan says (brainmri.accelerator). Every epoch the
whole state (model, optimizer, grad scaler, best weights, early-stopping counter, history, the
global python/numpy/torch/CUDA RNG states) is saved atomically to ``<resume_dir>/state.pt`` (the
previous one kept as ``state.prev.pt``); a killed job started again resumes from the last
completed epoch and ends bit-identical on the CPU, also because each epoch's data order,
augmentation and dropout are drawn from generators seeded with (seed, epoch). SIGTERM (a SLURM
time limit) stops the job at the next batch with exit status 143; the state of the last completed
epoch is on disk.
"""

from __future__ import annotations

import copy
import logging
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainmri.accelerator import AcceleratorPlan, CompiledForward, configure_torch, default_plan
from brainmri.training.evaluate import (  # some re-exported (__all__) for older importers
    MetricFn,
    MetricSums,
    Preempted,
    accuracy_per_sample,
    autocast,
    dice_per_sample,
    evaluate_all,
    predict_logits,
)
from brainmri.training.resume import (  # re-exported for older importers
    load_resume_state,
    rng_states,
    save_resume_state,
    set_rng_states,
)
from brainmri.training.schedule import make_scheduler, selection_score

log = logging.getLogger(__name__)

BatchIterator = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]
__all__ = [
    "FitSettings",
    "Preempted",
    "accuracy_per_sample",
    "autocast",
    "configure_torch",
    "dice_per_sample",
    "fit",
    "predict_logits",
]


@dataclass
class FitSettings:
    epochs: int
    lr: float
    weight_decay: float = 0.0
    patience: int | None = None
    seed: int = 42
    metric_name: str = "accuracy"
    lr_schedule: str = "constant"  # constant | cosine | warmup_cosine (see make_scheduler)
    warmup_epochs: int = 0
    # "val_loss" (lowest wins, the paper) or a history column such as "val_dice_tumor_slices"
    # (highest wins); also what early stopping watches.
    select_on: str = "val_loss"
    val_every: int = 1  # validate every N epochs (and after the last)
    compile: bool = False  # torch.compile the forward pass

    @classmethod
    def from_settings(cls, settings: dict[str, Any], seed: int, metric_name: str) -> FitSettings:
        """The fit settings of a job's training settings (the config's stage section)."""
        return cls(
            epochs=settings["epochs"],
            lr=settings["lr"],
            weight_decay=settings.get("weight_decay", 0.0),
            patience=settings.get("patience"),
            seed=seed,
            metric_name=metric_name,
            lr_schedule=settings.get("lr_schedule", "constant"),
            warmup_epochs=settings.get("warmup_epochs", 0),
            val_every=settings.get("val_every", 1),
            compile=settings.get("compile", False),
        )


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_val_loss: float
    history: list[dict[str, Any]] = field(default_factory=list)


def epoch_generator(seed: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator for one epoch's shuffling/augmentation: the same after a resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 101 + stream)


class _TermFlag:
    def __init__(self) -> None:
        self.raised = False
        self._previous = None

    def __enter__(self) -> _TermFlag:
        def handler(signum, frame):
            self.raised = True
            log.warning("SIGTERM received: stopping at the next batch")

        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def fit(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    metric_fn: MetricFn,
    train_batches: BatchIterator,
    val_batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None,
    settings: FitSettings,
    device: torch.device,
    resume_dir: Path,
    digest: str,
    plan: AcceleratorPlan | None = None,
) -> FitResult:
    """Train ``model``; ``metric_fn`` returns the per-sample metric (summed into the history).

    ``val_batches`` None (a final model on every training patient): no validation, no val_*
    history columns, every epoch counts as the best, so the last one is kept. ``plan``: the
    job's accelerator plan (None: :func:`brainmri.accelerator.default_plan` of ``device``)."""
    plan = plan or default_plan(device)
    plan.prepare_model(model)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = make_scheduler(optimizer, settings)
    scaler = plan.scaler()
    history: list[dict[str, Any]] = []
    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    best_loss, best_epoch, stale, start = float("inf"), -1, 0, 0
    best_score = float("-inf")

    state = load_resume_state(resume_dir, digest)
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history = list(state["history"])
        best_state, best_loss = state["best_state"], state["best_val_loss"]
        best_epoch, stale, start = state["best_epoch"], state["stale"], state["epoch"] + 1
        if state.get("scaler"):  # {}: saved by a disabled scaler; an enabled one starts afresh
            scaler.load_state_dict(state["scaler"])
        if scheduler is not None and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        if "rng" in state:
            set_rng_states(state["rng"], device)
        best_score = state.get("best_score", -best_loss)
        log.info("Resuming after epoch %d (best val loss %.4f)", start, best_loss)

    name = settings.metric_name
    forward = compiled(model, settings.compile or plan.compile, plan)
    with _TermFlag() as term:
        for epoch in range(start, settings.epochs):
            if settings.patience is not None and stale >= settings.patience:
                break
            began = time.perf_counter()
            torch.manual_seed(settings.seed * 7919 + epoch)  # dropout etc. of this epoch
            model.train()
            total_loss = torch.zeros((), dtype=torch.float64, device=device)
            train_metrics = MetricSums(name)
            count = 0
            for images, targets in train_batches(epoch):
                if term.raised:
                    raise Preempted(f"stopped by SIGTERM during epoch {epoch + 1}")
                optimizer.zero_grad(set_to_none=True)
                with plan.autocast():
                    logits = forward(images)
                    loss = loss_fn(logits.float(), targets)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                n = images.shape[0]
                total_loss += loss.detach().double() * n
                train_metrics.add(metric_fn(logits.detach().float(), targets))
                count += n
            train_means = train_metrics.means()
            row = {"epoch": epoch + 1, "train_loss": float(total_loss) / max(count, 1)}
            row.update({f"train_{k}": v for k, v in train_means.items()})
            val_loss = float("nan")
            if val_batches is None:  # no validation at all: the latest epoch is the best
                score = float(epoch)
            else:
                val_metrics = dict.fromkeys(train_means, float("nan"))
                if (epoch + 1) % settings.val_every == 0 or epoch + 1 == settings.epochs:
                    try:
                        val_loss, val_metrics = evaluate_all(
                            forward, loss_fn, metric_fn, val_batches(), device,
                            lambda: term.raised, name, plan,
                        )  # fmt: skip
                    except torch.OutOfMemoryError as error:
                        raise EvaluationOutOfMemory(str(error)) from error
                row["val_loss"] = val_loss
                row.update({f"val_{k}": v for k, v in val_metrics.items()})
                # Never improved on an epoch without validation (NaN scores -inf).
                score = selection_score(row, settings.select_on)
            improved = score > best_score
            if improved:
                best_score, best_loss, best_epoch, stale = score, val_loss, epoch, 0
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            else:
                stale += 1
            row.update(
                lr=optimizer.param_groups[0]["lr"],
                seconds=round(time.perf_counter() - began, 3),
                best=int(improved),
            )
            history.append(row)
            if scheduler is not None:
                scheduler.step()
            shown = "  ".join(
                f"{k} {v:.4f}" for k, v in row.items() if k.startswith(("train_", "val_"))
            )
            log.info(
                "epoch %d/%d  %s  %.1fs%s",
                epoch + 1,
                settings.epochs,
                shown,
                row["seconds"],
                "  *" if improved else "",
            )
            save_resume_state(
                resume_dir,
                {
                    "digest": digest,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "history": history,
                    "best_state": best_state,
                    "best_val_loss": best_loss,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "stale": stale,
                    "scaler": scaler.state_dict(),
                    **({"scheduler": scheduler.state_dict()} if scheduler is not None else {}),
                    "rng": rng_states(device),
                    "generators": {"seed": settings.seed, "next_epoch": epoch + 1},
                },
            )
            if term.raised:
                raise Preempted(f"stopped by SIGTERM after epoch {epoch + 1} (state saved)")
    if settings.patience is not None and stale >= settings.patience:
        log.info("Early stopping: no improvement of the validation loss for %d epochs", stale)
    if val_batches is None:
        log.info("No validation: keeping the last epoch (%d)", best_epoch + 1)
    else:
        log.info("Best validation loss %.4f at epoch %d", best_loss, best_epoch + 1)
    return FitResult(best_state, best_epoch, best_loss, history)


def compiled(model: nn.Module, enabled: bool, plan: AcceleratorPlan | None = None) -> nn.Module:
    """The forward pass compiled (:class:`brainmri.accelerator.CompiledForward`: one graph for
    training, one for evaluation) when ``enabled``, else ``model``; the module itself keeps
    the weights, so checkpoints and resume states are those of the plain model."""
    if not enabled:
        return model
    log.info("torch.compile: the first training and evaluation batches compile (seconds)")
    plan = plan or default_plan(next(model.parameters()).device)
    return CompiledForward(model, plan.compile_backend, plan.eval_batch)


class EvaluationOutOfMemory(torch.OutOfMemoryError):
    """Out of device memory during validation (its knob is eval_batch_size, not batch_size)."""


def out_of_memory_message(
    stage: str,
    plan: AcceleratorPlan,
    evaluation: bool = False,
    settings: dict[str, Any] | None = None,
) -> str:
    """The one line of a CUDA out-of-memory error: the knob of where it happened."""
    if evaluation:
        text = (
            f"CUDA ran out of memory in evaluation with evaluation batch {plan.eval_batch}: set "
            f"{stage}.eval_batch_size lower (null sizes it for the card) and run again"
        )
    else:
        batch = (settings or {}).get("batch_size", "?")
        text = (
            f"CUDA ran out of memory in training with batch size {batch}: lower "
            f"{stage}.batch_size in the config (or the model's own batch_size override) and "
            "run again"
        )
    if plan.job_slots > 1:
        text += (
            f"; {plan.job_slots} jobs share this GPU (gpu_jobs_per_device: {plan.job_slots}): "
            "fewer give each job more memory"
        )
    return text
