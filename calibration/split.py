"""Disjoint calibration / evaluation samples and the manifest that proves it.

Calibration is drawn only from the training side and evaluation only from the test side. When one
source must serve both (a user with only ImageNet val), it is carved into two disjoint parts.
Either way, any sample id found on both sides is refused.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
from PIL import Image

from convnext_deploy.pipeline.core.errors import UserError


class Source(Protocol):
    name: str
    class_names: tuple[str, ...]

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> tuple[Image.Image, int]: ...
    def sample_id(self, i: int) -> str: ...


def labels_of(source: Source) -> np.ndarray | None:
    """Labels without decoding images, where the source has them at hand."""
    if hasattr(source, "labels"):
        return np.asarray(source.labels)
    if hasattr(source, "samples"):
        return np.asarray([lbl for _, lbl in source.samples])
    return None


def select_balanced(labels: np.ndarray, n: int, rng: np.random.Generator, exclude: set[int] = frozenset()) -> list[int]:
    """n indices spread evenly across classes (round-robin over shuffled per-class lists)."""
    pools = []
    for c in np.unique(labels):
        idx = [int(i) for i in np.flatnonzero(labels == c) if int(i) not in exclude]
        rng.shuffle(idx)
        pools.append(idx)
    out: list[int] = []
    depth = 0
    while len(out) < n and any(depth < len(p) for p in pools):
        out.extend(p[depth] for p in pools if depth < len(p))
        depth += 1
    return sorted(out[:n])


@dataclass
class SampleList:
    source: str
    indices: list[int]
    ids_sha256: str

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Split:
    calibration: SampleList
    evaluation: SampleList
    seed: int
    shared_source: bool
    # labelled samples from the calibration side, disjoint from both, for accuracy-control decisions
    control: SampleList | None = None

    def manifest(self) -> dict:
        return asdict(self)

    def manifest_json(self) -> str:
        return json.dumps(self.manifest(), indent=1)


def _ids_digest(source: Source, indices: list[int]) -> str:
    h = hashlib.sha256()
    for i in indices:
        h.update(source.sample_id(i).encode())
        h.update(b"\n")
    return h.hexdigest()


def make_split(calib_source: Source, eval_source: Source, n_calib: int, n_eval: int | None, seed: int = 0,
               n_control: int = 0, control_from: str = "calibration") -> Split:
    """Pick n_calib class-balanced calibration samples, n_eval (None: all the rest) evaluation samples and,
    if asked, n_control labelled control samples that are in neither: from the calibration side, or held out of
    the evaluation side (`control_from="evaluation"`). The evaluation side is the one to decide on when the
    model was trained on the calibration side: on its own training images it flips fewer predictions under
    INT8 than on unseen ones, so a decision taken there would be optimistic."""
    if control_from not in ("calibration", "evaluation"):
        raise ValueError(f"control_from must be 'calibration' or 'evaluation', not {control_from!r}")
    if n_calib <= 0:
        raise UserError("the calibration set is empty: pass --calib N with N ≥ 1 (≥ 500 is advised for CNNs)")
    if len(calib_source) == 0:
        raise UserError(f"calibration source {calib_source.name} holds no samples")
    if len(eval_source) == 0:
        raise UserError(f"evaluation source {eval_source.name} holds no samples")
    rng = np.random.default_rng(seed)
    shared = calib_source.name == eval_source.name
    labels = labels_of(calib_source)
    if n_calib > len(calib_source) - (1 if shared else 0):
        raise UserError(f"--calib {n_calib} is more than {calib_source.name} holds ({len(calib_source)})")
    calib = (select_balanced(labels, n_calib, rng) if labels is not None
             else sorted(rng.choice(len(calib_source), n_calib, replace=False).tolist()))
    control: list[int] = []
    control_source = calib_source if control_from == "calibration" else eval_source
    if n_control:
        c_labels = labels if control_from == "calibration" else labels_of(eval_source)
        busy = set(calib) if (control_from == "calibration" or shared) else set()
        if c_labels is None:
            pool = sorted(set(range(len(control_source))) - busy)
            control = sorted(rng.choice(pool, min(n_control, len(pool)), replace=False).tolist())
        else:
            control = select_balanced(c_labels, n_control, rng, exclude=busy)
        if not control:
            raise UserError(f"no samples left in {control_source.name} for the accuracy-control set")
    taken = (set(calib) if shared else set()) | (set(control) if (shared or control_from == "evaluation") else set())
    rest = [i for i in range(len(eval_source)) if i not in taken]
    if n_eval is not None and n_eval < len(rest):
        rest = sorted(rng.choice(rest, n_eval, replace=False).tolist())
    if not rest:
        raise UserError(f"no evaluation samples left in {eval_source.name}")
    overlap = {calib_source.sample_id(i) for i in calib} & {eval_source.sample_id(i) for i in rest}
    overlap |= {control_source.sample_id(i) for i in control} & {eval_source.sample_id(i) for i in rest}
    if overlap:
        raise UserError(
            f"{len(overlap)} samples are in both the calibration and the evaluation set "
            f"(e.g. {sorted(overlap)[0]}); use separate training and test sources"
        )
    return Split(
        SampleList(calib_source.name, calib, _ids_digest(calib_source, calib)),
        SampleList(eval_source.name, rest, _ids_digest(eval_source, rest)),
        seed,
        shared,
        SampleList(control_source.name, control, _ids_digest(control_source, control)) if control else None,
    )


MORE_CONTROL_BYTES = 512 << 20  # the most extra control images held at once (float, the checkpoint's size)
MORE_CONTROL_SECONDS = 150.0  # the most the passes over them may take: the reference's and one candidate's
MORE_CONTROL_AT_LEAST = 2000  # drawn where memory and time allow, and three times the control split at least


def more_control_count(n_control: int, image_bytes: int, seconds_per_image: float) -> int:
    """How many more control images a decision at a gate's boundary draws: three times the control split, at least
    `MORE_CONTROL_AT_LEAST`, within what memory holds and what the passes over them take at the reference's measured
    speed, a candidate counted as slow as the reference (ConvNeXt-L at 224 px: 771 more images by memory were eight
    minutes of judging on a Zen 4; by time, 183). `seconds_per_image` 0: not timed yet, memory alone bounds it."""
    by_memory = MORE_CONTROL_BYTES // image_bytes - n_control
    by_time = int(MORE_CONTROL_SECONDS / (2 * seconds_per_image)) if seconds_per_image > 0 else by_memory
    return max(0, min(max(3 * n_control, MORE_CONTROL_AT_LEAST), by_memory, by_time))


def extend_control(split: Split, eval_source: Source, n: int, seed: int) -> SampleList | None:
    """Up to n more labelled control samples from the evaluation side that are in none of the split's lists (the
    evidence a decision at a gate's boundary asks for); None when none are left."""
    if split.control is None or split.control.source != eval_source.name or n <= 0:
        return None
    busy = set(split.evaluation.indices) | set(split.control.indices)
    if split.shared_source:
        busy |= set(split.calibration.indices)
    labels = labels_of(eval_source)
    rng = np.random.default_rng([seed, 1])  # its own stream: the split itself never changes
    if labels is None:
        pool = sorted(set(range(len(eval_source))) - busy)
        more = sorted(rng.choice(pool, min(n, len(pool)), replace=False).tolist()) if pool else []
    else:
        more = select_balanced(labels, n, rng, exclude=busy)
    if not more:
        return None
    return SampleList(eval_source.name, more, _ids_digest(eval_source, more))
