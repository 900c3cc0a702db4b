"""One deploy: checkpoint → data split → ONNX export → target builds → accuracy → latency → gates → report.

Stages pass plain data. Export and builds are cached under keys of their inputs, so a re-run resumes,
and the report directory is published atomically.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from calibration.batches import iter_batches, load_array
from calibration.fashion_mnist import FashionMNIST
from calibration.imagefolder import ImageFolder
from calibration.split import Split, make_split
from pipeline import gates as gates_mod
from pipeline import machine
from pipeline.cache import cached_dir, key_of, source_digest
from pipeline.checkpoints import LoadedCheckpoint, load_checkpoint, sha256_file
from pipeline.errors import UserError
from pipeline.export import export_cached, parity_dict
from pipeline.latency import measure
from pipeline.reference import require_reference
from pipeline.validate import accuracy, predict_many
from targets import get_spec, load_target
from targets.base import Artifact, BuildRequest, CalibrationData, LabelledData, Runner

# 3: the target's runtime could not run here (no GPU, not macOS); a proxy was measured and reported instead.
EXIT_OK, EXIT_GATE_FAILED, EXIT_USER_ERROR, EXIT_NOT_BUILT = 0, 1, 2, 3


@dataclass
class DeployConfig:
    target: str
    variant: str
    checkpoint: Path | None = None
    n_calib: int = 500
    n_eval: int | None = None  # None: the whole evaluation split
    image_size: int = 224  # deployment resolution for latency
    gates: Path = Path("gates.toml")
    out: Path | None = None
    threads: int = 2
    batch_sizes: tuple[int, ...] = (1, 8)
    latency_runs: int = 100
    calib_data: Path | None = None  # ImageFolder roots; default: the checkpoint's own dataset
    eval_data: Path | None = None
    options: dict = field(default_factory=dict)  # target build options (e.g. calibrate_method)
    seed: int = 0
    alternatives: bool = True  # also build and measure the target's other INT8 recipes
    accuracy_control: bool = False  # INT8 bounded by the gate's max_top1_drop_pp (targets that offer it)
    n_control: int = 1000  # labelled images held out of the evaluation side, for fallback and accuracy-control decisions
    sensitivity: int = 0  # >0: per-layer INT8 sensitivity on that many calibration images, into the report
    smoothing: float | None = 0.5  # SmoothQuant α for the INT8 builds (pipeline.outliers); None: off
    fallback: bool = True  # INT8 missing max_top1_drop_pp on the control split → layers back to float
    fallback_max_layers: int = 8
    fallback_max_minutes: float = 30.0


@dataclass
class DeployResult:
    report: dict
    out_dir: Path
    exit_code: int


def _sources(ck: LoadedCheckpoint, cfg: DeployConfig):
    if cfg.calib_data or cfg.eval_data:
        if not (cfg.calib_data and cfg.eval_data):
            raise UserError("pass both --calib-data and --eval-data (ImageFolder trees), or neither")
        calib = ImageFolder(cfg.calib_data, list(ck.class_names))
        evals = ImageFolder(cfg.eval_data, list(ck.class_names))
        return calib, evals, f"ImageFolder ({cfg.eval_data}; labels by {evals.label_rule})"
    dataset = ck.metadata.get("dataset", {}).get("name")
    if dataset == "fashion-mnist":
        return FashionMNIST("train"), FashionMNIST("test"), "Fashion-MNIST (reference task)"
    raise UserError(
        f"{ck.path} was not trained on the reference task; pass --calib-data TRAIN_DIR --eval-data VAL_DIR "
        "(ImageFolder trees, e.g. ImageNet train and val)"
    )


_LICENSES = {"ours": "Apache-2.0 (convnext-deploy reference checkpoint, trained on Fashion-MNIST, MIT)",
             "official": "MIT (facebookresearch/ConvNeXt weights)"}


def model_info(ck: LoadedCheckpoint) -> dict:
    """What an artifact may carry about its checkpoint (Core ML puts it in the package's metadata)."""
    acc = ck.metadata.get("accuracy") or {}
    dataset = (ck.metadata.get("dataset") or {}).get("name")
    return {"variant": ck.variant.name, "name": ck.variant.long_name, "class_names": list(ck.class_names),
            "preprocessing": ck.preprocessing.to_dict(), "checkpoint_sha256": ck.sha256,
            "reference_accuracy": {"top1": acc.get("top1"), "dataset": dataset} if acc.get("top1") else None,
            "license": ck.metadata.get("license") or _LICENSES.get(ck.source_format)}


def _runner_entry(r: Runner, precision: str) -> dict:
    return {"runtime": r.runtime, "device": r.device, "precision_requested": precision,
            "precision_executed": r.precision, "threads": r.threads,
            "kind": "proxy" if r.proxy else "real", "proxy": r.proxy}


def _torch_runner(model: torch.nn.Module, threads: int) -> Runner:
    torch.set_num_threads(threads)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy()

    return Runner(run, f"torch {torch.__version__} eager", machine.device_label(threads), "fp32", threads)


def _state_digest(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class Int8Source:
    """What the INT8 builds start from: the checkpoint's model, outlier-smoothed unless switched off, and its export."""

    model: torch.nn.Module
    export_path: Path | None
    smoothing: dict | None


def int8_source(ck: LoadedCheckpoint, calib_x: np.ndarray, manifest_sha: str, alpha: float | None,
                export_path: Path | None, log=print) -> Int8Source:
    if not alpha:
        return Int8Source(ck.model, export_path, None)
    from pipeline.outliers import migrate, outlier_stats

    before = outlier_stats(ck.model, calib_x)
    model, info = migrate(ck.model, calib_x, alpha)
    after = outlier_stats(model, calib_x)
    info.update(outlier_ratio_before=before.worst_ratio, outlier_ratio_after=after.worst_ratio,
                worst_layer_before=before.worst_layer, calibration_ids_sha256=manifest_sha)
    log(f"smoothing (α {alpha}): largest norm-output channel range / median {before.worst_ratio:.1f} → "
        f"{after.worst_ratio:.1f} ({before.worst_layer})")
    if export_path is None:  # a torch-source target converts the smoothed model itself
        return Int8Source(model, None, info)
    export = export_cached(model, key_of("smoothed", ck.sha256, alpha, manifest_sha), ck.variant.name, calib_x[:32])
    return Int8Source(model, export.path, info)


def build_artifacts(target_name: str, export_path: Path, model, calibration: CalibrationData,
                    precisions: tuple[str, ...], options: dict, log,
                    validation: LabelledData | None = None, input_sizes: tuple[int, ...] = (),
                    model_info: dict | None = None) -> dict[str, Artifact]:
    module = load_target(target_name)
    env = module.describe_environment()
    # a target that converts from torch (Core ML) is keyed on the model's weights, not on an ONNX file
    onnx_sha = sha256_file(export_path) if export_path is not None else _state_digest(model)
    out = {}
    for precision in precisions:
        key = key_of("build", target_name, precision, onnx_sha, module.build_config(precision, options),
                     calibration.manifest_sha256 if precision == "int8" else None, env, source_digest(module),
                     input_sizes, model_info)

        def build(tmp: Path, precision=precision) -> None:
            int8 = precision == "int8"
            art = module.build(BuildRequest(precision, export_path, model, tmp, calibration if int8 else None,
                                            validation if int8 else None, input_sizes, dict(options),
                                            dict(model_info or {})))
            art.save_metadata(tmp)

        directory, cached = cached_dir(f"artifacts/{target_name}", key, build)
        log(f"{target_name} {precision}: {'cached' if cached else 'built'} ({directory})")
        out[precision] = Artifact.load_metadata(directory)
    return out


def run_deploy(cfg: DeployConfig, log=print) -> DeployResult:
    spec = get_spec(cfg.target)
    module = load_target(cfg.target)
    avail = module.available()
    if not avail.ok and not avail.proxy:
        raise UserError(f"target {cfg.target} cannot run here: {avail.reason}")
    notes = []
    if not avail.ok:  # the target names what could not be made here (TensorRT: "engine not built")
        notes.append(f"{getattr(module, 'NOT_BUILT_NOTE', 'not run on the target runtime')}: {avail.reason}")
        log(f"WARNING: {cfg.target} {notes[-1]}; building what runs here and measuring its proxy instead")
    if cfg.image_size % 32:
        raise UserError(f"--image-size {cfg.image_size} is not a multiple of 32 (ConvNeXt downsamples by 32)")

    ck_path = Path(cfg.checkpoint) if cfg.checkpoint else require_reference(cfg.variant)
    ck = load_checkpoint(ck_path, cfg.variant)
    if not all(torch.isfinite(p).all() for p in ck.model.parameters()):
        raise UserError(f"{ck.path} holds NaN/inf weights; it cannot be deployed")
    torch.set_num_threads(cfg.threads)
    pp = ck.preprocessing
    gate_cfg = gates_mod.load_gates(cfg.gates, cfg.target, ck.variant.name)
    options = dict(cfg.options)
    if cfg.accuracy_control:
        if not getattr(module, "ACCURACY_CONTROL", False):
            raise UserError(f"target {cfg.target} has no built-in accuracy control; drop --accuracy-control")
        if "max_top1_drop_pp" not in gate_cfg:
            raise UserError(f"--accuracy-control needs max_top1_drop_pp in {cfg.gates} for {cfg.target}/{ck.variant.name}")
        options["accuracy_control"] = gate_cfg["max_top1_drop_pp"] / 100.0
    calib_src, eval_src, task = _sources(ck, cfg)
    fallback_on = (cfg.fallback and "int8" in spec.precisions and "max_top1_drop_pp" in gate_cfg
                   and not cfg.accuracy_control)
    # the control split is held out of the evaluation side: at most a tenth of it, so evaluation keeps the rest
    n_control = min(cfg.n_control, len(eval_src) // 10) if (cfg.accuracy_control or fallback_on) else 0
    if cfg.accuracy_control and n_control < 1:
        raise UserError(f"{eval_src.name} is too small to hold out a control split for --accuracy-control")
    if fallback_on and n_control < 1:
        fallback_on = False
        notes.append(f"accuracy fallback off: {eval_src.name} is too small to hold out a control split")
    split: Split = make_split(calib_src, eval_src, cfg.n_calib, cfg.n_eval, cfg.seed, n_control=n_control,
                              control_from="evaluation")
    manifest_sha = split.calibration.ids_sha256  # the INT8 build depends on the calibration samples only
    log(f"data: {len(split.calibration)} calibration ({split.calibration.source}), "
        f"{len(split.evaluation)} evaluation ({split.evaluation.source})")
    calib_x, _ = load_array(calib_src, split.calibration.indices, pp, desc="calibration")
    calibration = CalibrationData(calib_x, manifest_sha, split.calibration.source)
    validation = None
    if split.control is not None:
        ctrl_x, ctrl_y = load_array(eval_src, split.control.indices, pp, desc="control")
        validation = LabelledData(ctrl_x, ctrl_y)
        if cfg.accuracy_control:
            options["control_ids_sha256"] = split.control.ids_sha256

    converter = getattr(module, "CONVERTS_FROM_TORCH", None)  # e.g. coremltools: no ONNX involved
    export = None
    if converter is None:
        export = export_cached(ck.model, ck.sha256, ck.variant.name, calib_x[:32])
        log(f"export: opset {export.opset}, parity max |Δlogit| {export.parity.max_abs_diff:.2e}, "
            f"agreement {export.parity.top1_agreement:.3f} ({'cached' if export.cached else 'exported'})")
    export_path = export.path if export else None

    sizes = (pp.input_size, cfg.image_size)
    info = model_info(ck)
    src8 = int8_source(ck, calib_x, manifest_sha, cfg.smoothing, export_path, log) if "int8" in spec.precisions else None
    built = build_artifacts(cfg.target, export_path, ck.model, calibration,
                            tuple(p for p in spec.precisions if p != "int8"), options, log, None, sizes, info)
    if src8 is not None:
        built.update(build_artifacts(cfg.target, src8.export_path, src8.model, calibration, ("int8",), options, log,
                                     validation, sizes, info))
    artifacts = {p: built[p] for p in spec.precisions}
    runners = {p: module.load_runner(a, cfg.threads) for p, a in artifacts.items()}
    torch_ref = _torch_runner(ck.model, cfg.threads)

    fallback, plain_runner = None, None
    if fallback_on and validation is not None:
        fallback = _fallback(module, cfg, ck, gate_cfg, artifacts, runners, src8, calibration, validation,
                             calib_src, split, sizes, info, options, log)
        chosen = fallback.pop("artifact", None)
        if fallback["float_layers"]:
            plain_runner = runners["int8"]
            artifacts["int8"], runners["int8"] = chosen, module.load_runner(chosen, cfg.threads)

    alternatives = dict(getattr(module, "INT8_ALTERNATIVES", {})) if cfg.alternatives and "int8" in artifacts else {}
    peer = getattr(module, "PEER_DEFAULT_INT8", {}).get("recipe")
    if alternatives and src8 is not None and src8.smoothing:
        alternatives["ours without outlier smoothing"] = {"_plain": True}

    def alt_build(opts: dict) -> Artifact:
        plain_src = opts.get("_plain") or opts.get("recipe") == peer  # the peer's default never smooths
        model, path = (ck.model, export_path) if plain_src else (src8.model, src8.export_path)
        return build_artifacts(cfg.target, path, model, calibration, ("int8",),
                               {**cfg.options, **{k: v for k, v in opts.items() if k != "_plain"}}, log,
                               input_sizes=sizes, model_info=info)["int8"]

    alt_artifacts = {name: alt_build(opts) for name, opts in alternatives.items()}
    alt_runners = {name: module.load_runner(a, cfg.threads) for name, a in alt_artifacts.items()}

    # Accuracy: at the checkpoint's own resolution, every runner on the same streamed batches.
    batches = iter_batches(eval_src, split.evaluation.indices, pp, batch_size=100, desc="evaluation")
    preds = predict_many({"torch_fp32": torch_ref.run, **{p: r.run for p, r in runners.items()},
                          **{f"alt:{n}": r.run for n, r in alt_runners.items()},
                          **({"plain:int8": plain_runner.run} if plain_runner else {})}, batches)
    acc = {"torch_fp32": {**accuracy(preds["torch_fp32"]), **_runner_entry(torch_ref, "fp32")}}
    base = spec.reference  # the target's own reference precision (FP32; FP16 for Core ML)
    for p, r in runners.items():
        entry = {**accuracy(preds[p], preds[base] if base and p != base else None), **_runner_entry(r, p)}
        ref = accuracy(preds[p], preds["torch_fp32"])
        entry["vs_torch"] = {"agreement": ref["agreement"], "top1_drop_pp": ref["top1_drop_pp"]}
        entry["input_size"] = pp.input_size
        acc[p] = entry
    acc["torch_fp32"]["input_size"] = pp.input_size
    for p, a in acc.items():
        log(f"accuracy {p}: top-1 {a['top1'] * 100:.2f}%, top-5 {a['top5'] * 100:.2f}%"
            + (f", agreement {a['agreement'] * 100:.2f}%, drop {a['top1_drop_pp']:+.2f} pp" if "agreement" in a else ""))

    # Latency: deployment and checkpoint resolutions, each batch size, all precisions interleaved.
    latency = []
    timed = {p: r.run for p, r in runners.items() if r.timed}
    extra = {f"{p} ({label})": (p, r) for p, a in artifacts.items()  # e.g. Core ML on CPU_ONLY beside ALL
             for label, r in getattr(module, "latency_runners", lambda a, t: {})(a, cfg.threads).items()}
    if plain_runner is not None and plain_runner.timed:  # what the fallback cost in speed, in the same rounds
        extra[PLAIN_INT8] = ("int8", plain_runner)
    timed.update({k: r.run for k, (_, r) in extra.items()})
    entries = {**{p: _runner_entry(r, p) for p, r in runners.items()},
               **{k: _runner_entry(r, p) for k, (p, r) in extra.items()}}
    untimed = [p for p, r in runners.items() if not r.timed]
    if untimed:
        notes.append(f"latency not measured for {', '.join(untimed)}: "
                     f"{runners[untimed[0]].proxy} runs on this CPU, and its speed says nothing about the target")
    for size in sorted({cfg.image_size, pp.input_size}) if timed else ():
        for batch in cfg.batch_sizes:
            runs = cfg.latency_runs if batch == 1 else max(10, cfg.latency_runs // 4)
            res = measure(timed, batch=batch, input_size=size, runs=runs, warmup=5 if batch == 1 else 2)
            for p, lat in res.items():
                latency.append({"precision": p, **lat.to_dict(), **entries[p],
                                "role": "deployment" if size == cfg.image_size else "checkpoint"})
                log(f"latency {p} {size}px b{batch}: p50 {lat.p50_ms:.2f} ms, {lat.images_per_s:.1f} img/s")

    compared = _compare_alternatives(runners, artifacts, alt_runners, alt_artifacts, preds, cfg, log)
    if fallback is not None:
        _fallback_figures(fallback, preds, latency, base, cfg.image_size, log)

    sensitivity = (fallback or {}).get("sensitivity")
    if cfg.sensitivity and "int8" in artifacts and sensitivity is None:
        from pipeline import sensitivity as sens

        if not sens.supported(module):
            notes.append(f"per-layer sensitivity not available for {cfg.target}")
        else:
            n = min(cfg.sensitivity, len(split.calibration))
            sensitivity = _measure_sensitivity(module, cfg.target, ck, artifacts, src8, calibration, calib_src,
                                               split, n, cfg.threads, log)

    figures = _gate_figures(acc, latency, cfg.image_size, base)
    proxy = any(r.proxy for r in runners.values())
    verdicts = gates_mod.check(gate_cfg, figures, proxy)

    report = {
        "tool": "convnext-deploy 0.1.0",
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "target": {"name": spec.name, "hardware": spec.hardware, "precisions": list(spec.precisions),
                   "reference": spec.reference,
                   "environment": module.describe_environment()},
        "machine": machine.describe(),
        "model": {"variant": ck.variant.name, "name": ck.variant.long_name, "checkpoint": str(ck.path),
                  "checkpoint_sha256": ck.sha256, "checkpoint_format": ck.source_format,
                  "num_classes": ck.num_classes, "preprocessing": pp.to_dict(),
                  "trained_on": ck.metadata.get("dataset", {}), "recipe": {k: v for k, v in ck.metadata.get("recipe", {}).items() if k != "history"}},
        "data": {"task": task, "accuracy_resolution": pp.input_size, "latency_resolution": cfg.image_size,
                 "calibration": {"source": split.calibration.source, "n": len(split.calibration),
                                 "ids_sha256": split.calibration.ids_sha256},
                 "evaluation": {"source": split.evaluation.source, "n": len(split.evaluation),
                                "ids_sha256": split.evaluation.ids_sha256},
                 "seed": split.seed, "shared_source": split.shared_source,
                 "control": None if split.control is None else {"source": split.control.source,
                                                                "n": len(split.control),
                                                                "ids_sha256": split.control.ids_sha256}},
        "export": ({"opset": export.opset, "parity": parity_dict(export.parity), "cache_key": export.key} if export
                   else {"converter": converter}),
        "artifacts": [{"precision": p, "files": [f.name for f in a.files], "sha256": a.sha256(),
                       "size_bytes": a.size_bytes(), "metadata": a.metadata, "proxy": a.proxy}
                      for p, a in artifacts.items()],
        "accuracy": acc,
        "latency": latency,
        "int8_recipes": compared,
        "sensitivity": sensitivity,
        "smoothing": src8.smoothing if src8 else None,
        "fallback": fallback,
        "notes": notes,
        "engine_built": avail.ok,
        "gates": {"file": str(cfg.gates), "applied": gate_cfg, "figures": figures,
                  "verdicts": [v.to_dict() for v in verdicts], "passed": all(v.passed for v in verdicts)},
    }
    out_dir = Path(cfg.out) if cfg.out else Path("runs") / f"{cfg.target}-{ck.variant.name}"
    from reports import write_report

    write_report(out_dir, report, files=[f for a in artifacts.values() for f in a.files],
                 manifest=split.manifest_json())
    for v in verdicts:
        log(("PASS " if v.passed else "FAIL ") + v.line())
    code = EXIT_OK if report["gates"]["passed"] else EXIT_GATE_FAILED
    if not avail.ok:
        log(f"{cfg.target}: {notes[0]} (exit {EXIT_NOT_BUILT}: proxy figures only)")
        code = EXIT_NOT_BUILT
    return DeployResult(report, out_dir, code)


PLAIN_INT8 = "int8 (all layers INT8, before the fallback)"


def _reference_for(target: str, base: str, artifacts: dict, src8: Int8Source) -> Artifact:
    """The float graph the INT8 artifact was quantized from (smoothed weights included), for sensitivity."""
    if src8.export_path is not None:
        return Artifact(target, "fp32", [src8.export_path])
    return artifacts[base]


def _measure_sensitivity(module, target, ck, artifacts, src8, calibration, calib_src, split, n, threads, log) -> dict:
    from pipeline import sensitivity as sens

    base = get_spec(target).reference
    return sens.measure(module, target, ck, _reference_for(target, base, artifacts, src8), artifacts["int8"],
                        calib_src, split.calibration.indices, sens.SensitivityConfig(n, threads), log,
                        model=src8.model, calibration=calibration)


def _fallback(module, cfg: DeployConfig, ck, gate_cfg: dict, artifacts: dict, runners: dict, src8: Int8Source,
              calibration: CalibrationData, validation: LabelledData, calib_src, split: Split, sizes, info,
              options: dict, log) -> dict:
    """The accuracy-bounded fallback (pipeline.fallback) on the control split, and on a target with its own
    accuracy control (OpenVINO: nncf.quantize_with_accuracy_control) that too, keeping the faster of those
    that meet the bound."""
    from pipeline import fallback as fb
    from pipeline import sensitivity as sens

    base = get_spec(cfg.target).reference
    fcfg = fb.FallbackConfig(float(gate_cfg["max_top1_drop_pp"]), gate_cfg.get("min_agreement"),
                             cfg.fallback_max_layers, cfg.fallback_max_minutes)
    ref_top1, ref_preds = fb.control_top1(runners[base], validation)
    plain_top1, plain_preds = fb.control_top1(runners["int8"], validation)
    drop, agree = (ref_top1 - plain_top1) * 100.0, float((plain_preds == ref_preds).mean())
    out = {"bound_pp": fcfg.max_drop_pp, "min_agreement": fcfg.min_agreement,
           "control": {"source": split.control.source, "n": len(split.control), "ids_sha256": split.control.ids_sha256},
           "reference_control_top1": ref_top1, "plain_control_drop_pp": drop, "plain_control_agreement": agree,
           "triggered": fb.misses(fcfg, drop, agree), "float_layers": [],
           "budget": {"max_float_layers": cfg.fallback_max_layers, "max_minutes": cfg.fallback_max_minutes}}
    log(f"fallback: plain INT8 on {len(split.control)} control images: top-1 drop {drop:+.2f} pp, agreement "
        f"{agree * 100:.2f} % ({fb.bound_text(fcfg)}){'' if out['triggered'] else ': no layer needs float'}")
    if not out["triggered"]:
        return out
    if not sens.supported(module):
        raise UserError(f"the INT8 artifact misses the accuracy gates on the control split and {cfg.target} "
                        "has no per-layer sensitivity to rank layers by; pass --no-fallback")
    n = min(max(cfg.sensitivity, 256), len(split.calibration))
    ranking_src = _measure_sensitivity(module, cfg.target, ck, artifacts, src8, calibration, calib_src, split, n,
                                       cfg.threads, log)
    out["sensitivity"] = ranking_src

    def build(layers: list[str]) -> Artifact:
        return build_artifacts(cfg.target, src8.export_path, src8.model, calibration, ("int8",),
                               {**options, "float_layers": list(layers)}, log, input_sizes=sizes, model_info=info)["int8"]

    res = fb.search(build, lambda a: module.load_runner(a, cfg.threads), ranking_src["ranking"], validation,
                    (ref_top1, ref_preds), artifacts["int8"], runners["int8"], fcfg, log)
    out.update(res.to_dict(), method="layers back to float by measured sensitivity")
    out["artifact"] = res.artifact
    if getattr(module, "ACCURACY_CONTROL", False):
        out["artifact"], out["float_layers"] = _compare_accuracy_control(
            module, cfg, res, out, fcfg, (ref_top1, ref_preds), calibration, validation, src8, sizes, info, options, log)
    return out


def _compare_accuracy_control(module, cfg, res, out, fcfg, reference, calibration, validation, src8,
                              sizes, info, options, log) -> tuple[Artifact, list[str]]:
    """Our fallback next to the target's own accuracy control: both judged on the same control split, the
    faster one at the deployment size (batch 1, interleaved) kept among those that meet the bound."""
    from pipeline import fallback as fb

    import time as _time

    t0 = _time.monotonic()
    ac = build_artifacts(cfg.target, src8.export_path, src8.model, calibration, ("int8",),
                         {**options, "accuracy_control": fcfg.max_drop_pp / 100.0}, log, validation, sizes, info)["int8"]
    ac_seconds = _time.monotonic() - t0
    ac_runner = module.load_runner(ac, cfg.threads)
    ac_top1, ac_preds = fb.control_top1(ac_runner, validation)
    ac_drop, ac_agree = (reference[0] - ac_top1) * 100.0, float((ac_preds == reference[1]).mean())
    ours_runner = module.load_runner(res.artifact, cfg.threads)
    lat = measure({"ours": ours_runner.run, "accuracy_control": ac_runner.run}, batch=1, input_size=cfg.image_size,
                  runs=max(20, cfg.latency_runs // 2), warmup=3)
    last = min(res.rounds, key=lambda r: fb.score(fcfg, r["control_drop_pp"], r["control_agreement"]))
    rows = [{"method": "ours (sensitivity-ranked fallback)", "control_drop_pp": last["control_drop_pp"],
             "control_agreement": last["control_agreement"], "met": res.met,
             "float_layers": len(res.float_layers), "p50_ms": lat["ours"].p50_ms,
             "build_seconds": sum(r["seconds"] for r in res.rounds)},
            {"method": "nncf.quantize_with_accuracy_control", "control_drop_pp": ac_drop, "control_agreement": ac_agree,
             "met": not fb.misses(fcfg, ac_drop, ac_agree), "float_layers": len(ac.metadata.get("reverted_to_float", [])),
             "p50_ms": lat["accuracy_control"].p50_ms, "build_seconds": ac_seconds}]
    met = [r for r in rows if r["met"]] or rows
    keep = min(met, key=lambda r: r["p50_ms"] if r["met"] else fb.score(fcfg, r["control_drop_pp"], r["control_agreement"]))
    for r in rows:
        r["kept"] = r is keep
        log(f"fallback compare: {r['method']}: control drop {r['control_drop_pp']:+.2f} pp, {r['float_layers']} float "
            f"layers, p50 {r['p50_ms']:.2f} ms at {cfg.image_size}px{' (kept)' if r['kept'] else ''}")
    out["compared"] = rows
    if keep is rows[1]:
        out["method"] = "nncf.quantize_with_accuracy_control"
        out["met"] = keep["met"]
        return ac, list(ac.metadata.get("reverted_to_float", []))
    return res.artifact, res.float_layers


def _fallback_figures(fallback: dict, preds: dict, latency: list[dict], base: str, size: int, log) -> None:
    """Plain vs final INT8 re-measured on the evaluation split, and the p50 the fallback cost."""
    if "plain:int8" in preds:
        plain = accuracy(preds["plain:int8"], preds[base])
        final = accuracy(preds["int8"], preds[base])
        fallback["evaluation"] = {"plain_top1_drop_pp": plain["top1_drop_pp"], "final_top1_drop_pp": final["top1_drop_pp"],
                                  "plain_agreement": plain["agreement"], "final_agreement": final["agreement"],
                                  "n": final["n"]}
        log(f"fallback on the evaluation split: top-1 drop {plain['top1_drop_pp']:+.2f} pp (all INT8) → "
            f"{final['top1_drop_pp']:+.2f} pp ({len(fallback['float_layers'])} layers in float)")

    def p50(name):
        return next((e["p50_ms"] for e in latency if e["precision"] == name and e["batch"] == 1
                     and e["input_size"] == size), None)

    plain_ms, final_ms = p50(PLAIN_INT8), p50("int8")
    if plain_ms and final_ms:
        fallback["latency"] = {"plain_p50_ms": plain_ms, "final_p50_ms": final_ms, "cost": final_ms / plain_ms,
                               "input_size": size, "batch": 1}
        log(f"fallback latency cost: p50 {plain_ms:.2f} → {final_ms:.2f} ms ({final_ms / plain_ms:.2f}×)")


def _compare_alternatives(runners, artifacts, alt_runners, alt_artifacts, preds, cfg, log) -> list[dict]:
    """Our INT8 next to the target's other INT8 recipes: accuracy on the evaluation split, p50 at the
    deployment size, batch 1, interleaved with FP32 in one measurement."""
    if not alt_runners or not all(r.timed for r in (*runners.values(), *alt_runners.values())):
        return []
    timed = {"fp32": runners["fp32"].run, "int8": runners["int8"].run, **{n: r.run for n, r in alt_runners.items()}}
    lat = measure(timed, batch=1, input_size=cfg.image_size, runs=cfg.latency_runs, warmup=5)
    rows = []
    for name, art, pred_key in [("ours (default)", artifacts["int8"], "int8"),
                                *[(n, alt_artifacts[n], f"alt:{n}") for n in alt_runners]]:
        a = accuracy(preds[pred_key], preds["fp32"])
        key = "int8" if pred_key == "int8" else name
        ops = art.metadata.get("ops", {})
        rows.append({"recipe": name, "options": art.metadata.get("quantization", {}), "top1": a["top1"],
                     "top1_drop_pp": a["top1_drop_pp"], "agreement": a["agreement"], "n": a["n"],
                     "p50_ms": lat[key].p50_ms, "fp32_p50_ms": lat["fp32"].p50_ms,
                     "int8_speedup": lat["fp32"].p50_ms / lat[key].p50_ms, "input_size": cfg.image_size, "batch": 1,
                     "threads": cfg.threads, "integer_kernels": ops.get("integer_kernels"),
                     "float_conv_matmul_left": ops.get("float_conv_matmul_left"),
                     "runtime": runners["fp32"].runtime, "kind": "real"})
        log(f"recipe {name}: top-1 drop {a['top1_drop_pp']:+.2f} pp, p50 {lat[key].p50_ms:.2f} ms "
            f"({rows[-1]['int8_speedup']:.2f}× FP32)")
    return rows


def _gate_figures(acc: dict, latency: list[dict], deploy_size: int, reference: str = "fp32") -> dict:
    int8 = acc.get("int8", {})

    def p50(precision):
        for e in latency:
            if e["precision"] == precision and e["batch"] == 1 and e["input_size"] == deploy_size:
                return e["p50_ms"]
        return None

    f32, i8 = p50(reference), p50("int8")
    return {
        "top1_drop_pp": int8.get("top1_drop_pp"),
        "agreement": int8.get("agreement"),
        "p50_ms": i8,
        "int8_speedup": (f32 / i8) if (f32 and i8) else None,
    }


def run_sensitivity(cfg: DeployConfig, n_images: int = 256, log=print) -> tuple[dict, Path]:
    """`convnext-deploy sensitivity`: the deploy's own calibration split, export and INT8 build, then the
    target's per-layer measurement on the first `n_images` calibration images."""
    from pipeline import sensitivity as sens

    spec = get_spec(cfg.target)
    module = load_target(cfg.target)
    if not sens.supported(module):
        raise UserError(f"per-layer sensitivity is not available for target {cfg.target}")
    avail = module.available()
    if not avail.ok and not avail.proxy:
        raise UserError(f"target {cfg.target} cannot run here: {avail.reason}")
    ck = load_checkpoint(Path(cfg.checkpoint) if cfg.checkpoint else require_reference(cfg.variant), cfg.variant)
    torch.set_num_threads(cfg.threads)
    calib_src, eval_src, _ = _sources(ck, cfg)
    split = make_split(calib_src, eval_src, cfg.n_calib, cfg.n_eval, cfg.seed)
    calib_x, _ = load_array(calib_src, split.calibration.indices, ck.preprocessing, desc="calibration")
    calibration = CalibrationData(calib_x, split.calibration.ids_sha256, split.calibration.source)
    converts = getattr(module, "CONVERTS_FROM_TORCH", None)
    export = None if converts else export_cached(ck.model, ck.sha256, ck.variant.name, calib_x[:32]).path
    sizes, info = (ck.preprocessing.input_size, cfg.image_size), model_info(ck)
    src8 = int8_source(ck, calib_x, calibration.manifest_sha256, cfg.smoothing, export, log)
    arts = build_artifacts(cfg.target, export, ck.model, calibration, (spec.reference,), dict(cfg.options), log,
                           input_sizes=sizes, model_info=info)
    arts.update(build_artifacts(cfg.target, src8.export_path, src8.model, calibration, ("int8",), dict(cfg.options),
                                log, input_sizes=sizes, model_info=info))
    result = _measure_sensitivity(module, cfg.target, ck, arts, src8, calibration, calib_src, split, n_images,
                                  cfg.threads, log)
    result["variant"] = ck.variant.name
    out = Path(cfg.out) if cfg.out else Path("runs") / f"sensitivity-{cfg.target}-{ck.variant.name}"
    sens.write(result, out)
    return result, out
