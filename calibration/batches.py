"""Stream preprocessed batches from a source: one batch in memory at a time, with a progress bar."""
from __future__ import annotations

import sys
from typing import Iterator, Sequence

import numpy as np

from convnext_deploy.calibration.preprocess import preprocess
from convnext_deploy.calibration.split import Source
from convnext_deploy.pipeline.models.variants import Preprocessing


def progress(iterable, total: int, desc: str):
    """tqdm on a terminal; silent in CI logs and pipes."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="img", disable=not sys.stderr.isatty(), leave=False)


def iter_batches(
    source: Source,
    indices: Sequence[int],
    pp: Preprocessing,
    *,
    input_size: int | None = None,
    batch_size: int = 64,
    desc: str = "reading",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (NCHW float32 images, int64 labels) in index order."""
    images: list[np.ndarray] = []
    labels: list[int] = []
    for i in progress(indices, len(indices), desc):
        img, label = source[i]
        images.append(preprocess(img, pp, input_size))
        labels.append(label)
        if len(images) == batch_size:
            yield np.stack(images), np.asarray(labels, np.int64)
            images, labels = [], []
    if images:
        yield np.stack(images), np.asarray(labels, np.int64)


def load_array(source: Source, indices: Sequence[int], pp: Preprocessing, *, input_size: int | None = None,
               desc: str = "reading") -> tuple[np.ndarray, np.ndarray]:
    """The whole selection as one array: for small sets only (calibration, training at 32 px)."""
    xs, ys = zip(*iter_batches(source, indices, pp, input_size=input_size, batch_size=1024, desc=desc)) if indices else ((), ())
    if not xs:
        raise ValueError("no samples selected")
    return np.concatenate(xs), np.concatenate(ys)
