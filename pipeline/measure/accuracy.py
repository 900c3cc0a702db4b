"""Accuracy of one or more runners on the evaluation split, streamed: each batch is read once and fed
to every runner, and only top-5 indices are kept, so memory stays bounded at ImageNet-val scale."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from convnext_deploy.pipeline.core.errors import UserError


@dataclass
class Predictions:
    top5: np.ndarray  # (N, 5) class indices, best first
    labels: np.ndarray  # (N,)


def predict_many(runners: dict[str, Callable[[np.ndarray], np.ndarray]],
                 batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, Predictions]:
    tops: dict[str, list[np.ndarray]] = {k: [] for k in runners}
    labels: list[np.ndarray] = []
    for x, y in batches:
        labels.append(y)
        for name, run in runners.items():
            logits = np.asarray(run(x))
            if not np.isfinite(logits).all():
                raise UserError(f"{name} produced NaN/inf logits on the evaluation data; the artifact is broken "
                                "(check the checkpoint for NaN weights and the calibration data)")
            k = min(5, logits.shape[1])
            tops[name].append(np.argsort(-logits, axis=1, kind="stable")[:, :k])
    if not labels:
        raise UserError("the evaluation set is empty: pass --eval N with N ≥ 1")
    y = np.concatenate(labels)
    return {k: Predictions(np.concatenate(v), y) for k, v in tops.items()}


def accuracy(pred: Predictions, reference: Predictions | None = None) -> dict:
    """Top-1/top-5 and, against a reference, agreement and drop: each with the counts of images behind it, which the
    gates compare exactly (`gates.counted`)."""
    n = int(len(pred.labels))
    correct = int((pred.top5[:, 0] == pred.labels).sum())
    top5 = float((pred.top5 == pred.labels[:, None]).any(axis=1).mean())
    out = {"top1": correct / n, "top5": top5, "n": n, "correct": correct}
    if reference is not None:
        ref_correct = int((reference.top5[:, 0] == reference.labels).sum())
        agree = int((pred.top5[:, 0] == reference.top5[:, 0]).sum())
        out.update(agreement=agree / n, top1_drop_pp=(ref_correct - correct) / n * 100.0, agree=agree,
                   drop_images=ref_correct - correct, reference_correct=ref_correct)
    return out
