"""What every stage of a deploy reads: the user's configuration and the prepared context."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from convnext_deploy.calibration.split import Split
from convnext_deploy.pipeline.models.checkpoints import LoadedCheckpoint
from convnext_deploy.targets.base import Availability, CalibrationData, LabelledData, Runner, Target

# 3: the target's runtime could not run here (no GPU, not macOS), a proxy was measured and reported instead; or the
# device is emulated and its speed gates could not be measured (the gate file's allow_emulated accepts that).
# 4: an internal error (a bug): the CLI prints its traceback. 2 also covers faults of the machine (disk full).
EXIT_OK, EXIT_GATE_FAILED, EXIT_USER_ERROR, EXIT_NOT_BUILT = 0, 1, 2, 3

# the INT8 candidates every target with INT8 has, besides those it declares (Target.int8_recipes)
DEFAULT = "ours (default)"
SMOOTHING_OFF = "ours without outlier smoothing"


@dataclass
class DeployConfig:
    target: str
    variant: str
    checkpoint: Path | None = None
    train_reference: bool = True  # no checkpoint given and the variant's reference missing: train it first
    n_calib: int = 500
    n_eval: int | None = None  # None: the whole evaluation split
    image_size: int = 224  # deployment resolution for latency
    gates: Path = Path("gates.toml")
    out: Path | None = None
    threads: int = 2
    batch_sizes: tuple[int, ...] = (1, 8)
    latency_runs: int = 100
    # the most seconds one decision's timing may add rounds for, until its ratios are within ±3 % (95 % interval)
    timing_budget_s: float = 60.0
    loads: int = 3  # fresh loads of every timed artifact a latency measurement is spread over (measure.latency: why)
    calib_data: Path | None = None  # ImageFolder roots; default: the checkpoint's own dataset
    eval_data: Path | None = None
    options: dict = field(default_factory=dict)  # overrides of the target's typed build options
    seed: int = 0
    alternatives: bool = True  # also build and measure the target's other INT8 recipes
    plan_only: bool = False  # stop after the estimate of memory and time (pipeline.stages.plan)
    screen: bool | None = None  # screen the candidates on a slice first (None: for large variants; decisions.screen)
    recipe: str = "auto"  # auto: the fastest INT8 candidate meeting the accuracy gates on this CPU; or one's name
    accuracy_control: bool = False  # INT8 bounded by the gate's max_top1_drop_pp (targets that offer it)
    n_control: int | None = None  # labelled images held out of the evaluation side for decisions (None: 1,000, ≤ a tenth)
    sensitivity: int = 0  # >0: per-layer INT8 sensitivity on that many calibration images, into the report
    smoothing: float | None = 0.5  # SmoothQuant α for the INT8 builds (pipeline.decisions.outliers); None: off
    fallback: bool = True  # INT8 missing max_top1_drop_pp on the control split → layers back to float
    fallback_max_layers: int = 8
    fallback_max_minutes: float = 30.0
    input: str = "image"  # what the shipped artifacts take: "image" (uint8 NHWC pixels) or "tensor" (float NCHW)
    device: str | None = None  # a device profile (pipeline/device/profiles.py); None: this machine
    device_eval: int = 500  # evaluation images run on an emulated device's kernels


@dataclass
class Context:
    """Made by `prepare`; read, never changed, by every later stage (notes only grow)."""

    cfg: DeployConfig
    target: Target
    availability: Availability
    ck: LoadedCheckpoint
    gates: dict  # the gate values applied to this target and variant
    calib_src: object  # calibration.Source
    eval_src: object
    task: str  # what the accuracy figures are measured on, in words
    split: Split
    calibration: CalibrationData
    control: LabelledData | None  # the labelled control split (decisions), held out of the evaluation side
    options: object  # the target's typed build options
    fallback_on: bool
    notes: list[str]
    log: Callable[[str], None]
    precisions: tuple[str, ...] = ()  # what is built here: the target's, less those this CPU can only emulate
    device: object = None  # the --device profile (pipeline.device.profiles.DeviceProfile), None: this machine
    device_mode: str = "host"  # host | native (this machine takes the device's INT8 path) | emulated
    # the option overrides the deploy's INT8 path gives the default recipe (prepare.path_defaults), under the user's
    int8_defaults: dict = field(default_factory=dict)

    @property
    def emulated(self) -> bool:
        return self.device_mode == "emulated"

    @property
    def sizes(self) -> tuple[int, int]:
        """(accuracy resolution: the checkpoint's own, latency resolution: the deployment's)."""
        return self.ck.preprocessing.input_size, self.cfg.image_size

    @property
    def has_int8(self) -> bool:
        return "int8" in self.precisions


def runner_entry(r: Runner, precision: str) -> dict:
    """What measured a figure: runtime, device, precision asked for and executed, real or proxy."""
    return {"runtime": r.runtime, "device": r.device, "precision_requested": precision,
            "precision_executed": r.precision, "threads": r.threads,
            "kind": "proxy" if r.proxy else "real", "proxy": r.proxy}
