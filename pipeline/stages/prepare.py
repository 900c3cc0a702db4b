"""Stage 1: the checkpoint, the data sources, the disjoint calibration / control / evaluation split, the
calibration and control images, the gates and the target's typed options."""
from __future__ import annotations

from pathlib import Path

import torch

from convnext_deploy.calibration.batches import load_array
from convnext_deploy.calibration.fashion_mnist import FashionMNIST
from convnext_deploy.calibration.imagefolder import ImageFolder
from convnext_deploy.calibration.imagelist import calibration_source
from convnext_deploy.calibration.split import make_split
from convnext_deploy.pipeline.core import gate_file as gates_mod
from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.measure.machine import cpu_profile, profile_line
from convnext_deploy.pipeline.models.checkpoints import LoadedCheckpoint, load_checkpoint
from convnext_deploy.pipeline.models.reference import ensure_reference
from convnext_deploy.pipeline.stages.context import DEFAULT, SMOOTHING_OFF, Context, DeployConfig
from convnext_deploy.targets import get_target
from convnext_deploy.targets.base import CalibrationData, LabelledData

_LICENSES = {"ours": "Apache-2.0 (convnext-deploy reference checkpoint, trained on Fashion-MNIST, MIT)",
             "official": "MIT (facebookresearch/ConvNeXt weights)"}


def model_info(ck: LoadedCheckpoint) -> dict:
    """What an artifact may carry about its checkpoint (Core ML puts it in the package's metadata)."""
    acc = ck.metadata.get("accuracy") or {}
    dataset = (ck.metadata.get("dataset") or {}).get("name")
    return {"variant": ck.variant.name, "name": ck.variant.long_name, "class_names": list(ck.class_names),
            "preprocessing": ck.preprocessing.to_dict(), "checkpoint_sha256": ck.sha256,
            "reference_accuracy": {"top1": acc.get("top1"), "dataset": dataset} if acc.get("top1") else None,
            "license": ck.metadata.get("license") or _LICENSES.get(ck.source_format),
            **({"labels_note": ck.labels_note} if ck.labels_note else {})}


def sources(ck: LoadedCheckpoint, cfg: DeployConfig):
    """(calibration source, evaluation source, the task in words): the user's ImageFolder trees, or the
    reference task the checkpoint was trained on."""
    if cfg.calib_data or cfg.eval_data:
        if not (cfg.calib_data and cfg.eval_data):
            raise UserError("pass both --calib-data (images: a tree, a flat folder or a file list) and --eval-data "
                            "(an ImageFolder tree), or neither")
        calib = calibration_source(cfg.calib_data, list(ck.class_names))  # labels not needed
        evals = ImageFolder(cfg.eval_data, list(ck.class_names))
        return calib, evals, f"ImageFolder ({cfg.eval_data}; labels by {evals.label_rule})"
    if ck.metadata.get("dataset", {}).get("name") == "fashion-mnist":
        return FashionMNIST("train"), FashionMNIST("test"), "Fashion-MNIST (reference task)"
    raise UserError(
        f"{ck.path} was not trained on the reference task; pass --calib-data TRAIN_DIR --eval-data VAL_DIR "
        "(ImageFolder trees, e.g. ImageNet train and val)"
    )


def _checkpoint(cfg: DeployConfig, log) -> LoadedCheckpoint:
    path = Path(cfg.checkpoint) if cfg.checkpoint else ensure_reference(cfg.variant, cfg.train_reference, log)
    ck = load_checkpoint(path, cfg.variant)
    if not all(torch.isfinite(p).all() for p in ck.model.parameters()):
        raise UserError(f"{ck.path} holds NaN/inf weights; it cannot be deployed")
    return ck


def prepare(cfg: DeployConfig, log=print, checkpoint: LoadedCheckpoint | None = None,
            decisions: bool = True) -> Context:
    """`checkpoint`: an already loaded one (the bench's weights as initialised); `decisions=False`: no control
    split is held out (the sensitivity command and the bench decide nothing)."""
    target = get_target(cfg.target)
    log(profile_line())  # INT8 speed and numerics depend on it: every run says which CPU it measured on
    avail = target.available()
    if not avail.ok and not avail.proxy:
        raise UserError(f"target {cfg.target} cannot run here: {avail.reason}")
    notes = []
    if not avail.ok:  # the target names what could not be made here (TensorRT: "engine not built")
        notes.append(f"{target.not_built_note}: {avail.reason}")
        log(f"WARNING: {cfg.target} {notes[-1]}; building what runs here and measuring its proxy instead")
    if cfg.image_size % 32:
        raise UserError(f"--image-size {cfg.image_size} is not a multiple of 32 (ConvNeXt downsamples by 32)")
    ck = checkpoint or _checkpoint(cfg, log)
    torch.set_num_threads(cfg.threads)
    device, mode = _device(cfg, target, log)
    path = (device.int8() if device else cpu_profile())["path"]
    gate_cfg = gates_mod.load_gates(cfg.gates, cfg.target, ck.variant.name, path)
    int8_defaults = path_defaults(target, path, cfg.options, notes, log)
    overrides = {**int8_defaults, **cfg.options}
    if cfg.accuracy_control:
        if not target.accuracy_control:
            raise UserError(f"target {cfg.target} has no built-in accuracy control; drop --accuracy-control")
        if "max_top1_drop_pp" not in gate_cfg:
            raise UserError(f"--accuracy-control needs max_top1_drop_pp in {cfg.gates} for {cfg.target}/{ck.variant.name}")
        overrides["accuracy_control"] = gate_cfg["max_top1_drop_pp"] / 100.0
    options = target.make_options(**overrides)
    names = [DEFAULT, SMOOTHING_OFF, *(r.name for r in target.int8_recipes)]
    if cfg.recipe not in ("auto", *names):
        raise UserError(f"--recipe {cfg.recipe!r} is not an INT8 recipe of {target.name}; choose auto or one of: "
                        + ", ".join(repr(n) for n in names))
    calib_src, eval_src, task = sources(ck, cfg)
    int8_decisions = decisions and "int8" in target.precisions
    fallback_on = int8_decisions and cfg.fallback and "max_top1_drop_pp" in gate_cfg and not cfg.accuracy_control
    judged_choice = int8_decisions and cfg.recipe == "auto" and bool({"max_top1_drop_pp", "min_agreement"} & set(gate_cfg))
    # the control split is held out of the evaluation side: by default at most a tenth of it (and 1,000), so a small
    # evaluation tree keeps its images; asked for, up to half
    wanted = min(1000, len(eval_src) // 10) if cfg.n_control is None else min(cfg.n_control, len(eval_src) // 2)
    n_control = wanted if (cfg.accuracy_control or fallback_on or judged_choice) else 0
    if cfg.accuracy_control and n_control < 1:
        raise UserError(f"{eval_src.name} is too small to hold out a control split for --accuracy-control")
    if fallback_on and n_control < 1:
        fallback_on = False
        notes.append(f"accuracy fallback off: {eval_src.name} is too small to hold out a control split")
    split = make_split(calib_src, eval_src, cfg.n_calib, cfg.n_eval, cfg.seed, n_control=n_control,
                       control_from="evaluation")
    log(f"data: {len(split.calibration)} calibration ({split.calibration.source}), "
        f"{len(split.evaluation)} evaluation ({split.evaluation.source})")
    calib_x, _ = load_array(calib_src, split.calibration.indices, ck.preprocessing, desc="calibration")
    calibration = CalibrationData(calib_x, split.calibration.ids_sha256, split.calibration.source)
    control = None
    if split.control is not None:
        ctrl_x, ctrl_y = load_array(eval_src, split.control.indices, ck.preprocessing, desc="control")
        control = LabelledData(ctrl_x, ctrl_y, split.control.ids_sha256)
    return Context(cfg, target, avail, ck, gate_cfg, calib_src, eval_src, task, split, calibration, control,
                   options, fallback_on, notes, log, native_precisions(target, notes, log), device, mode,
                   int8_defaults)


def path_defaults(target, path: str, options: dict, notes: list[str], log) -> dict:
    """The target's default-option overrides for the deploy's INT8 path: on x86 without VNNI its saturation-safe
    settings (Target.saturation_safe), less those the user set, so the default recipe computes there what the
    model means, at the speed measured there. Nothing elsewhere: VNNI and ARM accumulate full 8-bit exactly."""
    safe = {k: v for k, v in (target.saturation_safe or {}).items() if k not in options}
    if path != "avx2" or not safe or "int8" not in target.precisions:
        return {}
    said = ", ".join(f"{k}={v}" for k, v in safe.items())
    notes.append(f"INT8 default on this path (x86 without VNNI): {said}, weights whose u8×s8 pair sums cannot "
                 "saturate at int16 (full 8-bit weights do there, for no speed gained)")
    log(f"NOTE: {notes[-1]}")
    return safe


def _device(cfg: DeployConfig, target, log):
    """(the --device profile, how it is measured); checked before anything is built, the emulation included."""
    if cfg.device is None:
        return None, "host"
    from convnext_deploy.pipeline.device import emulator
    from convnext_deploy.pipeline.device.profiles import get_profile, how_measured

    device = get_profile(cfg.device)
    mode = how_measured(device)
    if cfg.device_eval < 1:
        raise UserError(f"--device-eval {cfg.device_eval} must be ≥ 1 (the evaluation images run on the device's "
                        "kernels)")
    if mode == "emulated" and (not target.available().ok or (device.arch == "aarch64"
                                                             and target.extra not in emulator.WHEELS)):
        raise UserError(f"--device {device.name} is a CPU, emulated with its runtime's own wheel; {target.name} runs "
                        f"on {target.hardware} and cannot run there: deploy it without --device")
    if mode == "emulated":
        emulator.find(device.arch)  # one line naming what is missing, before minutes of building
    log(f"device: {device.label()}; " + (
        "this machine takes its INT8 path: every figure is measured here" if mode == "native" else
        f"emulated (qemu -cpu {device.qemu_cpu}): its accuracy on its own kernels, its speed not measured"))
    return device, mode


def native_precisions(target, notes: list[str], log) -> tuple[str, ...]:
    """The target's precisions less BF16 on a CPU without native BF16: emulated, it converts every op to FP32
    and back, many times slower than FP32: a figure that says nothing about BF16."""
    prof = cpu_profile()
    if "bf16" not in target.precisions or prof["bf16_native"]:
        return target.precisions
    missing = "the ARM BF16 extension" if "asimd" in prof.get("flags", ()) else "AVX-512 BF16 or AMX"
    notes.append(f"bf16 not built: {prof['cpu']} has no native BF16 (no {missing}), so BF16 would be "
                 "emulated in FP32 and slower than FP32")
    log(f"NOTE: {notes[-1]}")
    return tuple(p for p in target.precisions if p != "bf16")
