"""Song-level metrics of the probe tasks: scikit-learn for AUC, AP, accuracy and R², mir_eval for keys."""

from __future__ import annotations

import mir_eval
import numpy as np
from sklearn.metrics import accuracy_score, average_precision_score, r2_score, roc_auc_score

from probes.tasks import Task


def score(task: Task, outputs: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """`outputs`: one row per song (logits, or predicted values); `targets`: class index, 0/1 tags, or values."""
    if task.kind == "multiclass":
        predicted = outputs.argmax(axis=1)
        scores = {"accuracy": float(accuracy_score(targets, predicted))}
        if task.monitor == "weighted_score":
            scores["weighted_score"] = key_weighted_score(task, predicted, targets)
        return scores
    if task.kind == "multilabel":
        # a tag absent from (or present in every song of) the split has no ROC curve: it is left out of the mean
        scored = [column for column in range(targets.shape[1]) if 0 < targets[:, column].sum() < len(targets)]
        truth, predicted = targets[:, scored], outputs[:, scored]
        return {
            "roc_auc": float(roc_auc_score(truth, predicted, average="macro")),
            "average_precision": float(average_precision_score(truth, predicted, average="macro")),
        }
    scores = {"r2": float(r2_score(targets, outputs))}
    if targets.shape[1] > 1:
        scores |= {f"r2_{name}": float(r2_score(targets[:, i], outputs[:, i])) for i, name in enumerate(task.labels)}
    return scores


def key_weighted_score(task: Task, predicted: np.ndarray, targets: np.ndarray) -> float:
    """mir_eval's weighted key score (1 correct, 0.5 fifth, 0.3 relative, 0.2 parallel), averaged over songs."""
    pairs = zip(predicted, targets, strict=True)
    return float(np.mean([mir_eval.key.weighted_score(task.labels[t], task.labels[p]) for p, t in pairs]))
