"""Before the first heavy stage: how much memory and time the deploy will take, and whether this machine has it.

The estimate is a model of each stage in what drives it, with coefficients fitted to deploys measured here (see
COEFFICIENTS): the FP32 weight bytes W (every copy of the model: the torch modules, the sessions, a build's graph),
the activations of the largest batch a runtime holds, and the process as it stands after `prepare` (its resident
size is read, not guessed: the toolchains and the calibration images are in it). Builds and exports run in forked
children (pipeline.core.forked), so their peak adds to the parent's rather than accumulating. Time is counted in
forward passes of the model on this CPU, timed once here on two images (`probe_forward_s`), plus the work that
scales with the weights (exports, graph passes), plus the timing budgets the decisions may spend.

Where the peak exceeds the memory this machine can give the deploy, it stops with one line naming options that
fit (`fitting_options`), before anything is written.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from convnext_deploy.calibration.split import more_control_count

GIB = 1 << 30

# Fitted to measured deploys on this project's machines (2 cores; ONNX Runtime, OpenVINO): atto and T from the
# test suite, B from `make bench-scale`. Each is an upper fit: the measured stage peaks sit at or under it.
COEFFICIENTS = {
    "export_child_w": 2.5,  # an export child's own growth, in W: the folded copy, the traced program (streamed save)
    "export_mib": 700.0,  # the export stage's own passes, whatever the model: smoothing statistics, parity checks
    "build_child_w": 5.0,  # an INT8 build child's: pre-processing, the calibration session, the quantized copy
    "finish_child_w": 4.0,  # a finish child's: the graph, its input rewritten, saved tensor by tensor
    "activation_factor": 6.0,  # a session's arena over the stage-1 MLP activation of its largest batch
    "export_s_per_gb": 120.0,  # seconds per GB of FP32 weights of one export (tracing, proto, checks)
    "build_s_per_gb": 60.0,  # seconds per GB of one INT8 build's graph passes (besides calibration)
    "calibration_forwards": 2.0,  # an unoptimised calibration session's pass, in FP32 forwards
    "int8_forward": 0.45,  # an INT8 candidate's pass over the control split, in FP32 forwards
    "validate_forwards": 0.6,  # each runner's pass over the evaluation split (batched), in FP32 forwards
    "latency_s": 30.0,  # seconds a latency table's batch size takes at most (its rounds fit the budget)
    "stage_mib": 160.0,  # what any heavy stage adds whatever the model: a session's runtime, torch's workspace
}


@dataclass
class Plan:
    """The estimate, per stage and whole: peak resident memory of the process tree (bytes) and seconds."""

    stages: dict[str, dict] = field(default_factory=dict)  # stage → {"peak_bytes", "seconds"}
    available_bytes: int = 0
    forward_s: float = 0.0
    weight_bytes: int = 0
    work: dict = field(default_factory=dict)  # what it was estimated from (Work), so a record can be re-estimated

    @property
    def peak_bytes(self) -> int:
        return max(s["peak_bytes"] for s in self.stages.values())

    @property
    def seconds(self) -> float:
        return sum(s["seconds"] for s in self.stages.values())

    def fits(self) -> bool:
        return self.peak_bytes <= self.available_bytes

    def line(self) -> str:
        return (f"plan: peak memory ~{self.peak_bytes / GIB:.1f} GiB of {self.available_bytes / GIB:.1f} GiB available, "
                f"~{self.seconds / 60:.0f} min (one FP32 forward {self.forward_s * 1e3:.0f} ms here; "
                f"{self.weight_bytes / GIB:.2f} GiB of FP32 weights)")

    def to_dict(self) -> dict:
        return {"stages": {k: {"peak_mib": round(v["peak_bytes"] / (1 << 20)), "seconds": round(v["seconds"], 1)}
                           for k, v in self.stages.items()},
                "peak_mib": round(self.peak_bytes / (1 << 20)), "seconds": round(self.seconds, 1),
                "available_mib": round(self.available_bytes / (1 << 20)), "forward_ms": round(self.forward_s * 1e3, 1),
                "weight_bytes": self.weight_bytes, "coefficients": COEFFICIENTS, "work": self.work,
                "method": "a model of each stage fitted to measured deploys (pipeline/measure/footprint.py)"}


def available_bytes() -> int:
    """What the deploy can use: this process's resident size plus the memory the kernel says is available, under
    a cgroup's limit where one is set."""
    from convnext_deploy.pipeline.measure.memory import rss_bytes

    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        k, _, v = line.partition(":")
        info[k] = int(v.split()[0]) * 1024
    total = info.get("MemAvailable", info.get("MemTotal", 0)) + (rss_bytes() or 0)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total


def probe_forward_s(model, size: int, threads: int) -> float:
    """Seconds of one FP32 forward of one image at `size` px in torch on this CPU (the faster of two calls of two
    images, halved): what every stage's passes over images are counted in."""
    import torch

    torch.set_num_threads(threads)
    x = torch.zeros(2, model.in_chans, size, size)
    best = float("inf")
    with torch.no_grad():
        for _ in range(2):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    return best / 2


def activation_bytes(dims: tuple[int, ...], batch: int, size: int) -> int:
    """The stage-1 MLP's hidden activation of `batch` images at `size` px, float32: the largest tensor of a
    ConvNeXt, which a runtime's arena holds a few of."""
    return batch * (size // 4) ** 2 * 4 * dims[0] * 4


@dataclass
class Work:
    """What a deploy will do, in the terms the estimate counts."""

    weight_bytes: int
    dims: tuple[int, ...]
    calib_size: int  # the checkpoint's own resolution: calibration, control and evaluation passes
    deploy_size: int  # latency
    n_calib: int
    n_eval: int
    n_control: int
    max_batch: int
    candidates: int  # INT8 candidates built in full, the default included
    timed_at_once: int  # runners a timing holds loaded at once (the reference included)
    smoothing: bool
    loads: int
    timing_budget_s: float
    precisions: int
    base_rss: int  # the process after prepare
    forward_s: float  # one FP32 forward at the deployment size
    judged: bool = True  # the decisions judge accuracy on the control split (accuracy gates and a control split)
    fp32_runner_w: float = 2.0  # a loaded FP32 runner: its weights and their prepacked copies, in W (the target's)
    int8_runner_w: float = 0.25  # an INT8 runner's, as a share of the FP32 runner's (the target's)


CALIBRATION_BATCH_PIXELS = 1 << 18  # as targets/ort_tools.py: the calibration session's batch, bounded by pixels


def estimate(w: Work, available: int) -> Plan:
    c, W = COEFFICIENTS, w.weight_bytes
    gb = W / 1e9
    f_calib = w.forward_s * (w.calib_size / w.deploy_size) ** 2
    torch_models = W * (1 + w.smoothing) - W  # the checkpoint's module is in base_rss already
    calib_batch = max(1, min(32, CALIBRATION_BATCH_PIXELS // (w.calib_size ** 2)))
    act = lambda batch, size: c["activation_factor"] * activation_bytes(w.dims, batch, size)  # noqa: E731
    session = w.fp32_runner_w * W
    int8_session = session * w.int8_runner_w
    shipped = w.base_rss + c["stage_mib"] * (1 << 20)  # from finish on: the smoothed model let go (stages.build)
    parent = shipped + torch_models
    image = 3 * w.calib_size ** 2 * 4
    # at a gate's boundary more control images are drawn (pipeline.decisions.judge), as many as memory and time allow
    extended = more_control_count(w.n_control, image, f_calib) if w.judged and w.n_control else 0
    control_bytes = image * extended  # the control split itself is in base_rss
    judged = w.n_control + extended  # images every judged runner passes over
    stages = {
        "export": {"peak_bytes": parent + c["export_mib"] * (1 << 20) + c["export_child_w"] * W,
                   "seconds": (1 + w.smoothing) * (c["export_s_per_gb"] * gb + 64 * f_calib) + w.n_calib * f_calib},
        # the sessions are loaded once the builds' children are done (pipeline.stages.build)
        "build": {"peak_bytes": parent + max(session + int8_session, c["build_child_w"] * W + act(calib_batch, w.calib_size)),
                  "seconds": (1 + w.candidates) * c["build_s_per_gb"] * gb
                  + (1 + w.smoothing) * w.n_calib * c["calibration_forwards"] * f_calib},
        "decide": {"peak_bytes": parent + 2 * session + (w.timed_at_once - 1) * int8_session + control_bytes
                   + w.timed_at_once * act(1, w.deploy_size),
                   "seconds": 2 * w.timing_budget_s + judged * f_calib * (1 + w.candidates * c["int8_forward"])},
        # the built sessions let go before the children, the finished ones loaded after them
        "finish": {"peak_bytes": shipped + max(c["finish_child_w"] * W, session + int8_session),
                   "seconds": w.precisions * c["build_s_per_gb"] * gb / 2},
        # one set of sessions at a time: the accuracy pass's are let go before the latency loads its own
        "validate": {"peak_bytes": shipped + session + 2 * int8_session + 2 * act(w.max_batch, w.deploy_size),
                     "seconds": (1 + w.precisions + w.candidates) * w.n_eval * f_calib * c["validate_forwards"]
                     + (1 + (w.max_batch > 1)) * min(c["latency_s"], w.timing_budget_s)},
    }
    from dataclasses import asdict

    return Plan(stages, available, w.forward_s, W, asdict(w))


def fitting_options(w: Work, available: int) -> list[str]:
    """The options, alone or together, whose estimate fits `available` (fewest changes first)."""
    from dataclasses import replace

    steps = [("--no-alternatives", dict(candidates=1, timed_at_once=2)), ("--batches 1", dict(max_batch=1)),
             ("--loads 1", dict(loads=1)), ("--no-smoothing", dict(smoothing=False))]
    tried, out = w, []
    for flag, change in steps:
        if estimate(replace(w, **change), available).fits():
            return [flag]
        tried = replace(tried, **change)
        out.append(flag)
        if estimate(tried, available).fits():
            return out
    return []
