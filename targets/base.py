"""The one small protocol every target module implements, and the plain data that crosses it.

A target module (targets/<name>.py) provides four functions:

    available() -> Availability
    build_config(precision, options) -> dict        # the effective build settings (recorded, and keyed on)
    build(request: BuildRequest) -> Artifact        # one precision of one model
    load_runner(artifact: Artifact, threads: int) -> Runner
    describe_environment() -> dict                  # toolchain versions, device

and may define INT8_ALTERNATIVES: {name: build options}, other INT8 recipes that a deploy builds,
validates and times beside the default so the report shows what the choice is worth.

Toolchains are imported inside those functions, never at module import, so the CLI works with none
of them installed.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

import numpy as np


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""  # why not, and what to do about it
    proxy: bool = False  # a stand-in for the runtime can still build and run here (labelled as such)


def requires(*packages: str, hint: str) -> Availability:
    """Available when every package imports; otherwise name the first missing one and how to install it."""
    for name in packages:
        try:
            importlib.import_module(name)
        except ImportError as e:
            return Availability(False, f"{e.name or name} is not installed: {hint}")
    return Availability(True)


@dataclass
class CalibrationData:
    """Preprocessed calibration images (N, 3, H, W) float32 and the manifest they came from."""

    images: np.ndarray
    manifest_sha256: str
    source: str

    def batches(self, batch_size: int):
        for i in range(0, len(self.images), batch_size):
            yield self.images[i:i + batch_size]

    def equal_batches(self, max_batch: int = 32):
        """Batches all of one size (the largest divisor of N up to max_batch). ONNX Runtime's histogram
        calibrators (percentile, entropy) stack per-batch outputs and fail on a smaller last batch; dropping
        it would silently calibrate on fewer images than the manifest says."""
        n = len(self.images)
        return self.batches(max(d for d in range(1, min(max_batch, n) + 1) if n % d == 0))


@dataclass
class LabelledData:
    """Preprocessed labelled images disjoint from calibration and evaluation (accuracy-control decisions)."""

    images: np.ndarray
    labels: np.ndarray


@dataclass
class BuildRequest:
    precision: str  # fp32 | fp16 | bf16 | int8
    onnx_path: Path
    torch_model: object  # the FP32 torch.nn.Module (for targets whose converter starts from torch)
    out_dir: Path  # an empty directory the target writes its files into
    calibration: CalibrationData | None = None
    validation: LabelledData | None = None
    input_sizes: tuple[int, ...] = ()  # the square input sizes the artifact will be run at
    options: dict = field(default_factory=dict)  # target-specific, recorded in the artifact
    # what the checkpoint says about itself (variant, name, class_names, preprocessing, checkpoint_sha256,
    # reference_accuracy, license), for targets whose artifact carries it (a Core ML classifier)
    model_info: dict = field(default_factory=dict)


@dataclass
class Artifact:
    target: str
    precision: str
    files: list[Path]
    metadata: dict = field(default_factory=dict)  # quantization config, op counts, executed precision, …
    proxy: str | None = None  # set when numerics come from a stand-in for the real runtime

    def sha256(self) -> dict[str, str]:
        """Per file; a directory (a Core ML .mlpackage) hashes its files' relative paths and contents in order."""
        out = {}
        for f in self.files:
            h = hashlib.sha256()
            for part in _files_of(f):
                if part != f:
                    h.update(str(part.relative_to(f)).encode() + b"\0")
                with open(part, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            out[f.name] = h.hexdigest()
        return out

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for f in self.files for p in _files_of(f))

    def save_metadata(self, directory: Path) -> None:
        (directory / "artifact.json").write_text(json.dumps(
            {"target": self.target, "precision": self.precision, "files": [f.name for f in self.files],
             "metadata": self.metadata, "proxy": self.proxy}, indent=1, default=str))

    @classmethod
    def load_metadata(cls, directory: Path) -> "Artifact":
        d = json.loads((directory / "artifact.json").read_text())
        return cls(d["target"], d["precision"], [directory / f for f in d["files"]], d["metadata"], d["proxy"])


def _files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


@dataclass
class Runner:
    """float batch (N, 3, H, W) → logits (N, classes), plus what actually ran it."""

    run: Callable[[np.ndarray], np.ndarray]
    runtime: str  # e.g. "onnxruntime 1.32.0 CPUExecutionProvider"
    device: str
    precision: str  # the precision that executed, as the runtime reports it
    threads: int
    proxy: str | None = None
    timed: bool = True  # False when its latency would say nothing about the real runtime (a proxy)


class TargetModule(Protocol):
    NAME: str

    def available(self) -> Availability: ...
    def build_config(self, precision: str, options: dict) -> dict: ...
    def build(self, request: BuildRequest) -> Artifact: ...
    def load_runner(self, artifact: Artifact, threads: int) -> Runner: ...
    def describe_environment(self) -> dict: ...
