"""The run's ensemble decision, in one place: the evaluation (``ensemble_classifiers.py``), the
cascade, ``predict`` and ``predict_volume`` all decide with :func:`ensemble_decision` and gate
the segmentation with :func:`gate`.

The voters are the classifiers (a tumor vote at probability >= the cut-off
``classification.threshold``) and, with ``classification.segmentation_voter``, the segmentation
fold ensemble: tumor where its thresholded, per-volume post-processed mask has at least ``k``
pixels (``classification/segvoter/min_pixels.json``); its probability is its 0/1 decision, so
it counts in the mean probability as in its table. The vote is ``classification.ensemble``:
``majority`` or ``soft`` (:func:`brainmri.evaluation.classification.vote`), or ``segmentation``:
the voter decides alone (the classifiers' votes are still counted in ``votes``; the probability
is the voter's 0/1, so that ``pred`` is ``probability >= cut-off`` before smoothing); then, where
slices have an order (a patient's slice numbers), each decision becomes the majority of the
``classification.smooth_window`` decisions centred on it
(:func:`brainmri.evaluation.voting.smooth_decisions`).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from brainmri.errors import InputError
from brainmri.evaluation.classification import decide, vote
from brainmri.evaluation.postprocess import PostProcess, postprocess_arg
from brainmri.evaluation.voting import smooth_decisions, voter_decisions

SEGMENTATION_VOTER = "segmentation_voter"
# classification.ensemble: the classifiers' majority vote (the paper), their mean probability,
# or the segmentation voter alone.
METHODS = ("majority", "soft", "segmentation")


@dataclass(frozen=True)
class EnsembleRule:
    """How the run's ensemble decides: ``method`` (majority | soft | segmentation), the
    classifier ``cutoff``, the segmentation voter's ``min_pixels`` (None: no voter; required by
    ``segmentation``) and ``smooth_window`` (1: off)."""

    method: str
    cutoff: float
    min_pixels: int | None = None
    smooth_window: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown ensemble method {self.method!r} ({', '.join(METHODS)})")
        if self.method == "segmentation" and self.min_pixels is None:
            raise InputError(
                "ensemble method 'segmentation' needs the segmentation voter's k "
                "(classification.segmentation_voter.enabled: true)"
            )

    def voters(self, classifiers: list[str]) -> list[str]:
        """The names of the voters, the segmentation voter as ``segmentation_voter(k=K)``."""
        voter = [f"{SEGMENTATION_VOTER}(k={self.min_pixels})"] if self.min_pixels else []
        return [*classifiers, *voter]


@dataclass
class Decision:
    """Per slice: ``pred`` (0/1, after smoothing), ``probability`` (mean over the voters; the
    segmentation voter's 0/1 with method ``segmentation``),
    ``votes`` (tumor votes), ``segmentation_voter`` (its 0/1, None without it), and whether
    smoothing was applied (``smoothed``)."""

    pred: np.ndarray
    probability: np.ndarray
    votes: np.ndarray
    segmentation_voter: np.ndarray | None
    smoothed: bool


def ensemble_decision(
    rule: EnsembleRule,
    probabilities: np.ndarray,
    segmentation_areas: np.ndarray | None = None,
    order: tuple[np.ndarray, np.ndarray] | None = None,
    decisions: np.ndarray | None = None,
) -> Decision:
    """The ensemble's decision on N slices from the classifiers' tumor probabilities (M, N)
    and, with the voter, the segmentation's cleaned mask areas (N,). ``order``: (patient,
    slice number) per slice, for smoothing; None (independent images): no smoothing.
    ``decisions``: the classifiers' 0/1 where a table already holds them (else probability
    >= the cut-off)."""
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim != 2 or not len(probabilities):
        raise ValueError("probabilities must be (classifiers, slices)")
    if decisions is None:
        preds = [decide(p, rule.cutoff) for p in probabilities]
    else:
        preds = list(np.asarray(decisions, dtype=int))
    probs = list(probabilities)
    voter = None
    if rule.min_pixels is not None:
        if segmentation_areas is None:
            raise ValueError("the segmentation voter needs the segmentation's mask areas")
        voter = voter_decisions(segmentation_areas, rule.min_pixels)
        preds.append(voter)
        probs.append(voter.astype(float))
    if rule.method == "segmentation":  # the voter alone; every vote is still counted
        votes = np.stack(preds).sum(axis=0)
        pred, probability = voter, voter.astype(float)
    else:
        pred, probability, votes = vote(np.stack(preds), np.stack(probs), rule.method, rule.cutoff)
    smoothed = rule.smooth_window > 1 and order is not None
    if smoothed:
        pred = smooth_decisions(pred, order[0], order[1], rule.smooth_window)
    return Decision(pred.astype(int), probability, votes.astype(int), voter, smoothed)


def ensemble_predictions(
    frames: dict[str, pd.DataFrame],
    method: str,
    threshold: float,
    voter_areas: np.ndarray | None = None,
    min_pixels: int | None = None,
    smooth_window: int = 1,
    order: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[pd.DataFrame, int]:
    """Vote of the models' prediction tables (``{file name: frame}``): the table and the ties.

    Every table must hold the same ids in the same order with the same labels; the result has
    a backbone's columns (``prob_tumor`` = the mean probability) plus ``votes``, decided by
    :func:`ensemble_decision` (with ``min_pixels``, the
    segmentation voter on ``voter_areas``, and its decision as a ``segmentation_voter``
    column; with ``order`` (patient, slice number per row), smoothing along the slice order).
    """
    if not frames:
        raise ValueError("no predictions to ensemble")
    (first_name, reference), *others = frames.items()
    for name, frame in others:
        if (
            len(frame) != len(reference)
            or not (frame["id"].to_numpy() == reference["id"].to_numpy()).all()
        ):
            raise InputError(
                f"{name}: its ids differ from those of {first_name} "
                "(every model must predict the same test rows in the same order)"
            )
        if not (frame["label"].to_numpy() == reference["label"].to_numpy()).all():
            raise InputError(f"{name}: its labels differ from those of {first_name}")
    probs = np.stack([frame["prob_tumor"].to_numpy() for frame in frames.values()])
    preds = np.stack([frame["pred"].to_numpy() for frame in frames.values()])
    rule = EnsembleRule(method, threshold, min_pixels, smooth_window)
    decision = ensemble_decision(rule, probs, voter_areas, order, preds)
    voters = len(frames) + (min_pixels is not None)
    ties = int((2 * decision.votes == voters).sum()) if method == "majority" else 0
    result = reference[["id", "patient", "label"]].assign(
        prob_tumor=np.round(decision.probability, 6), pred=decision.pred, votes=decision.votes
    )
    if decision.segmentation_voter is not None:
        result["segmentation_voter"] = decision.segmentation_voter
    return result.reset_index(drop=True), ties


def gate(masks: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """The cascade: each slice's mask where the ensemble says tumor, an empty mask elsewhere."""
    masks = np.asarray(masks).astype(bool)
    pred = np.asarray(pred).astype(bool)
    if len(masks) != len(pred):
        raise ValueError(f"{len(pred)} decisions for {len(masks)} masks")
    return masks & pred[:, None, None]


def read_voter_choice(
    path: Path, threshold: float | None = None, post: PostProcess | None = None
) -> int:
    """``k`` from a run's ``classification/segvoter/min_pixels.json``. ``k`` was chosen on masks
    made with the segmentation threshold and post-processing recorded there: a prediction with
    other settings (``threshold``, ``post`` when given) is refused."""
    try:
        choice = json.loads(Path(path).read_text())
        k = int(choice["min_pixels"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a segmentation voter's min_pixels.json ({error})") from None
    if k < 1:
        raise InputError(f"{path}: min_pixels {k} must be at least 1")
    if threshold is not None and "threshold" in choice and choice["threshold"] != threshold:
        raise InputError(
            f"{path}: k was chosen at segmentation threshold {choice['threshold']}, not {threshold}"
        )
    recorded = choice.get("postprocess")
    if post is not None and recorded is not None and PostProcess.from_settings(recorded) != post:
        raise InputError(
            f"{path}: k was chosen with post-processing {recorded}, not {post.as_dict()}"
        )
    return k


def add_ensemble_arguments(parser: argparse.ArgumentParser) -> None:
    """The run's ensemble as options of predict.py and predict_volume.py (the rules pass the
    configured values and the run's min_pixels.json)."""
    parser.add_argument(
        "--method",
        choices=METHODS,
        required=True,
        help="classification.ensemble (segmentation needs --segmentation-voter)",
    )
    parser.add_argument("--classifier-threshold", type=float, required=True, help="cut-off")
    parser.add_argument("--segmentation-threshold", type=float, required=True)
    parser.add_argument("--tta", action="store_true", help="test-time flips (segmentation.tta)")
    parser.add_argument(
        "--postprocess",
        type=postprocess_arg,
        default="{}",
        help="JSON of segmentation.postprocess (per patient volume, 3-D; {} = off)",
    )
    parser.add_argument(
        "--segmentation-voter",
        type=Path,
        help="the run's classification/segvoter/min_pixels.json (the voter's k); none: no voter",
    )
    parser.add_argument(
        "--smooth-window",
        type=int,
        default=1,
        help="classification.smooth_window (odd; along a patient's slice order)",
    )


def ensemble_rule(args: argparse.Namespace) -> EnsembleRule:
    """The :class:`EnsembleRule` of :func:`add_ensemble_arguments`' options."""
    if args.smooth_window < 1 or args.smooth_window % 2 == 0:
        raise InputError(f"--smooth-window must be an odd number >= 1, not {args.smooth_window}")
    k = None
    if args.method == "segmentation" and args.segmentation_voter is None:
        raise InputError("--method segmentation needs --segmentation-voter (the voter decides)")
    if args.segmentation_voter is not None:
        k = read_voter_choice(
            args.segmentation_voter, args.segmentation_threshold, args.postprocess
        )
    return EnsembleRule(args.method, args.classifier_threshold, k, args.smooth_window)
