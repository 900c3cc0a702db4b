"""What a target is: one declared contract, and the plain data that crosses it.

Each target module (targets/<name>.py) ends with one `TARGET = Target(...)` entry: its name, hardware,
precisions, typed build options, the functions every target has (available, describe_environment,
build_config, build, load_runner) and the capabilities some have (INT8 recipes to compare, accuracy control,
extra latency runners, a per-layer probe for sensitivity, the note shown when its runtime cannot run here).
`targets/__init__.py` lists the entries in one table. Nothing reads a target module's attributes by name.

Toolchains are imported inside the functions, never at module import, so the CLI works with none of them.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

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


def calibration_record(calibration: CalibrationData | None, what: str = "INT8") -> dict:
    """What an INT8 build records of the images it was calibrated on (their manifest ties the artifact to them);
    a build with none is refused rather than quantized on ranges from nowhere."""
    if calibration is None or len(calibration.images) == 0:
        raise ValueError(f"{what} needs calibration data")
    return {"images": len(calibration.images), "manifest_sha256": calibration.manifest_sha256}


def options_config(options, names: tuple[str, ...] | None = None) -> dict:
    """A target's frozen options as a build config: the `names` fields (all by default) in that order, tuples as
    lists, so the config reads back from report.json and artifact.json as it was keyed."""
    values = asdict(options) if names is None else {k: getattr(options, k) for k in names}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass
class LabelledData:
    """Preprocessed labelled images disjoint from calibration and evaluation (accuracy-control decisions)."""

    images: np.ndarray
    labels: np.ndarray
    ids_sha256: str = ""  # the control split's manifest digest (a build that decides on it is keyed on it)


@dataclass
class BuildRequest:
    precision: str  # fp32 | fp16 | bf16 | w8 | int8
    onnx_path: Path | None  # the checked export; None for a target that converts from torch
    torch_model: object  # the torch.nn.Module the build starts from (ONNX targets name float layers with it)
    out_dir: Path  # an empty directory the target writes its files into
    calibration: CalibrationData | None = None
    validation: LabelledData | None = None
    input_sizes: tuple[int, ...] = ()  # the square input sizes the artifact will be run at
    options: Any = None  # the target's own typed options (Target.options), recorded in the artifact
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
    # a device with its own clock (TensorRT: CUDA events around the engine): batch → milliseconds on that clock,
    # without host↔device copies; the latency harness times the host clock otherwise
    device_ms: Callable[[np.ndarray], float] | None = None
    # an artifact whose own input is not the float batch (targets.image_input): float batch → its input, and the
    # call on that input (a latency is timed on it, the conversion outside the clock)
    feed: Callable[[np.ndarray], np.ndarray] | None = None
    native: Callable[[np.ndarray], np.ndarray] | None = None
    # the settings the runtime resolved, which a device must be given to compute the same (OpenVINO: the
    # INFERENCE_PRECISION_HINT that executed: f32 where the CPU has no BF16, whatever the build asked for)
    settings: dict = field(default_factory=dict)
    # the compute layers by kind and the precision they executed in, where the runtime says (OpenVINO's runtime
    # model): {"compute": {"Convolution f16": 40, …}, "other": {…}, "kernels": {"Convolution f16 (…)": 40}}; on ARM
    # its INT8 IR runs in float
    layers: dict = field(default_factory=dict)
    # the ops of the graph a runtime executes after its own fusions, where it rewrites the file (ONNX Runtime:
    # {"executed": {op: n}, "integer_kernels": {…}, "float_conv_matmul_left": n, …}); OpenVINO's are in `layers`
    ops: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Int8Recipe:
    """An INT8 recipe a deploy builds and measures beside the target's default: overrides of the target's
    options, whether it starts from the outlier-smoothed weights (the peer's default never does), and the graph
    form of the export it starts from (pipeline.models.graph_forms; ONNX targets)."""

    name: str
    options: dict = field(default_factory=dict)
    smoothed: bool = True
    form: str | None = None  # None: the target's own form (Target.form)


# images × H × W per inference batch: 100 at ≤ 51 px, 5 at 224 px. A session's arena keeps its largest batch's
# activations for the session's life, and a deploy holds several sessions: at 20 images of 224 px a ConvNeXt-B
# session kept about half a gigabyte each; 5 images give the same images per second.
INFERENCE_BATCH_PIXELS = 1 << 18


def inference_batch(size: int, cap: int = 100) -> int:
    """Images per batch when a runner predicts many at `size` px, bounded by pixels: a runtime's arena keeps the
    largest batch's activations for the session's life, so a fixed image count would hold gigabytes at 224 px."""
    return max(1, min(cap, INFERENCE_BATCH_PIXELS // (size * size)))


PROBE_CHUNK_PIXELS = 1 << 17  # images × H × W per probe chunk: 64 images at 32–45 px, 2 at 224 px


def probe_chunks(images: np.ndarray):
    """The probe images in chunks whose activations stay small whatever the resolution."""
    step = max(1, min(64, PROBE_CHUNK_PIXELS // (images.shape[2] * images.shape[3])))
    for i in range(0, len(images), step):
        yield images[i:i + step]


@dataclass
class LayerProbe:
    """A target's view of its INT8 artifact for the one per-layer sensitivity loop (pipeline.decisions.sensitivity).

    `run(floated, tapped)` runs the probe images through the artifact with the `floated` layers back in float
    and yields, chunk by chunk (`probe_chunks`), [logits, output of each `tapped` layer]: the loop reduces each
    chunk to sums before the next, so memory holds one chunk of activations, never every layer's for every image.
    `layers` are in network order."""

    layers: list[str]
    run: Callable[[set, list], Iterator[list]]
    runtime: str
    kind: str  # real | proxy
    modules: list[str] | None = None  # checkpoint names of `layers`, where the target knows them
    ops: list[str] | None = None
    details: dict = field(default_factory=dict)  # how the probe was made (rebuilt_proxy_max_abs_diff, …)
    # the all-float logits → checks of the surgery (float_graph_max_abs_diff: equal to the float model's?)
    check: Callable[[np.ndarray], dict] | None = None


@dataclass(frozen=True)
class Target:
    """One row of the target table: what the deploy may ask of a target, declared, never discovered."""

    name: str
    hardware: str
    precisions: tuple[str, ...]  # the first is the target's reference: INT8 drops and speed-ups are against it
    extra: str  # pip extra that installs its toolchain
    options: type  # its typed build options (a frozen dataclass; every one has `float_layers`)
    available: Callable[[], Availability]
    describe_environment: Callable[[], dict]
    build_config: Callable[[str, Any], dict]  # (precision, options) → the effective settings, recorded and keyed
    build: Callable[[BuildRequest], Artifact]
    load_runner: Callable[[Artifact, int], Runner]
    converter: str | None = None  # set when it converts from the torch model (no ONNX involved): how
    int8_recipes: tuple[Int8Recipe, ...] = ()  # compared with the default in every deploy
    peer_default: str | None = None  # the name of the recipe in int8_recipes that is the peer's default
    accuracy_control: bool = False  # offers its own accuracy-bounded INT8 (options.accuracy_control)
    extra_runners: Callable[[Artifact, int], dict] | None = None  # more timed runners of one artifact (label → Runner)
    layer_probe: Callable[..., LayerProbe] | None = None  # (artifacts, images, threads, model, calibration)
    profile: Callable[[Artifact, int, int], dict] | None = None  # (artifact, threads, size) → where the time goes
    not_built_note: str = "not run on the target runtime"  # shown when only a proxy runs here
    # what its FP32 runner holds here, in FP32 weight bytes: the weights and the runtime's prepacked copies
    fp32_runner_w: float = 2.0
    int8_runner_w: float = 0.25  # its INT8 runner's, as a share of the FP32 runner's (a Q/DQ proxy in float: 1)
    # the INT8 paths the runtime's own users take (the bench's peers): a build request → label → INT8 artifact
    user_paths: Callable[[BuildRequest], dict] | None = None
    # the runtime's own way to a stream's throughput: (artifact, threads, input size) → run_many(images) → logits
    stream_runner: Callable[[Artifact, int, int], Callable[[np.ndarray], np.ndarray]] | None = None
    # the graph form (pipeline.models.graph_forms) its artifacts start from unless a recipe names another: the one
    # its runtime runs fastest, by measurement (the recipe choice keeps measuring the others)
    form: str = "channels_last"
    # the last step before validation (targets.image_input): (artifact, Finish, an empty directory) → the artifact a
    # device runs as it is: its input (an image, or the float tensor), labels and preprocessing inside the model file
    finish: Callable[[Artifact, Any, Path], Artifact] | None = None
    # its load_runner runs the peak's ONNX graphs (peak_onnx: a GEMM, a 1×1 convolution) and says what executed them
    gemm_peak: bool = False
    # an x86 CPU runtime: INT8 artifact → whether its u8×s8 products can pass int16 in a pair (full 8-bit weights),
    # which VPMADDUBSW saturates on x86 without VNNI: its numerics then differ between a VNNI CPU and an AVX2 one
    saturates_without_vnni: Callable[[Artifact], bool] | None = None
    # the options that make its default INT8 recipe saturation-safe (7-bit or unsigned weights), applied where the
    # deploy's INT8 path is x86 without VNNI: there full 8-bit weights change the numerics and buy no speed
    saturation_safe: dict | None = None

    @property
    def reference(self) -> str:
        return self.precisions[0]

    @property
    def module(self) -> str:
        """The module that builds it: its code (and what that imports) keys the build cache."""
        return self.build.__module__

    def make_options(self, **overrides):
        """The target's typed options with `overrides`; a field it does not have is a user error."""
        from dataclasses import fields

        known = {f.name for f in fields(self.options)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            from convnext_deploy.pipeline.core.errors import UserError

            raise UserError(f"target {self.name} has no build option {unknown[0]!r} (it has: {', '.join(sorted(known))})")
        return self.options(**{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def peak_onnx(path: Path, form: str, int8: bool, n: int) -> list[int]:
    """A runtime's peak graph (pipeline.measure.peak) every runtime here reads like an artifact: an n×n×n product
    as a GEMM ("gemm") or a 1×1 convolution ("conv1x1"), FP32 or Q/DQ INT8 (targets.peak_graphs); returns the
    shape of its float input."""
    from convnext_deploy.targets.peak_graphs import write_peak_onnx

    return write_peak_onnx(path, form, int8, n)
