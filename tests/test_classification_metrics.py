"""Classification metrics against scikit-learn, and the ensemble vote with its tie rule."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score

from brainmri.evaluation.classification import classification_metrics, decide, fig3_table, vote


def test_metrics_match_scikit_learn_on_hand_made_predictions():
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 1])
    preds = np.array([1, 1, 0, 1, 0, 0, 1, 0, 0, 1])
    probs = np.array([0.9, 0.8, 0.4, 0.7, 0.1, 0.2, 0.6, 0.3, 0.05, 0.95])
    metrics = classification_metrics(labels, preds, probs)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(labels, preds)) == 0.8
    tumor = metrics["classes"]["tumor"]
    assert tumor["precision"] == pytest.approx(precision_score(labels, preds))
    assert tumor["recall"] == pytest.approx(recall_score(labels, preds))
    assert tumor["f1-score"] == pytest.approx(f1_score(labels, preds))
    assert metrics["classes"]["no_tumor"]["recall"] == pytest.approx(4 / 5)
    assert metrics["macro_avg"]["f1-score"] == pytest.approx(
        f1_score(labels, preds, average="macro")
    )
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert metrics["confusion_matrix"] == [[4, 1], [1, 4]]
    assert (metrics["false_negatives"], metrics["false_positives"]) == (1, 1)
    table = fig3_table(metrics)
    assert list(table["class"]) == ["no_tumor", "tumor", "accuracy", "macro avg", "weighted avg"]


def test_roc_auc_is_null_with_one_class():
    metrics = classification_metrics(np.zeros(4, int), np.zeros(4, int), np.full(4, 0.2))
    assert metrics["roc_auc"] is None and "one class" in metrics["roc_auc_note"]


def test_majority_vote_of_three():
    preds = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 1, 0]])
    probs = np.where(preds == 1, 0.8, 0.2)
    pred, _mean, votes = vote(preds, probs, "majority", 0.5)
    assert pred.tolist() == [1, 1, 1, 0]
    assert votes.tolist() == [2, 2, 2, 0]


def test_ties_of_an_even_number_of_models_go_to_the_mean_probability():
    preds = np.array([[1, 1, 0, 1], [0, 0, 1, 1]])
    probs = np.array([[0.9, 0.55, 0.3, 0.9], [0.2, 0.3, 0.6, 0.8]])
    pred, _mean, votes = vote(preds, probs, "majority", 0.5)
    assert votes.tolist() == [1, 1, 1, 2]
    # ties: means 0.55 -> tumor, 0.425 -> no tumor, 0.45 -> no tumor; 2 votes -> tumor
    assert pred.tolist() == [1, 0, 0, 1]
    four = vote(
        np.array([[1], [1], [0], [0]]), np.array([[0.6], [0.6], [0.1], [0.1]]), "majority", 0.5
    )[0]
    assert four.tolist() == [0]  # mean 0.35


def test_soft_vote_can_differ_from_majority():
    preds = np.array([[1], [1], [0]])
    probs = np.array([[0.51], [0.51], [0.0]])
    assert vote(preds, probs, "majority", 0.5)[0].tolist() == [1]
    assert vote(preds, probs, "soft", 0.5)[0].tolist() == [0]  # mean 0.34


def test_unknown_method_is_an_error():
    with pytest.raises(ValueError, match="majority or soft"):
        vote(np.ones((2, 2), int), np.ones((2, 2)), "median", 0.5)


def test_the_cut_off_moves_ties_and_the_soft_vote():
    preds = np.array([[1], [0]])
    probs = np.array([[0.7], [0.2]])  # a 1-1 tie, mean 0.45
    assert vote(preds, probs, "majority", 0.5)[0].tolist() == [0]
    assert vote(preds, probs, "majority", 0.4)[0].tolist() == [1]
    assert vote(preds, probs, "soft", 0.4)[0].tolist() == [1]


@pytest.mark.parametrize("cutoff", [0.0, 1.0, 1.5])
def test_a_cut_off_outside_zero_one_is_refused(cutoff):
    with pytest.raises(ValueError, match="classifier cut-off"):
        decide(np.array([0.5]), cutoff)
