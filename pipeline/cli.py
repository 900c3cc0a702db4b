"""`convnext-deploy`: the command line. User errors print one line and exit non-zero, never a traceback.

Exit codes: 0 done, every gate met; 1 a gate missed (and nothing else is exit 1, but `validate`'s own check: the
bundle's model or preprocessing disagrees with its reference outputs here); 2 the input or the machine (bad option
or file, a bundle file whose sha256 changed; out of space, permission denied, read-only); 3 the target's runtime is
not here, proxy figures reported, or the --device is emulated and its speed gates could not be measured
(`validate`: checksums verified, nothing run); 4 internal error, a bug (traceback printed); 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from convnext_deploy.pipeline.core.errors import UserError, machine_error
from convnext_deploy.pipeline.core.settings import batches, loads, timing_budget
from convnext_deploy.pipeline.device.check import add_device_check
from convnext_deploy.pipeline.device.profiles import add_device_args


def _zoo(command: str):
    """A zoo command, imported when it runs (the CLI starts without torch)."""
    def run(args) -> int:
        from convnext_deploy.pipeline.models import zoo_commands

        return getattr(zoo_commands, command)(args)
    return run


def _cmd_deploy(args) -> int:
    from convnext_deploy.pipeline.deploy import EXIT_NOT_BUILT, DeployConfig, run_deploy
    from convnext_deploy.reports.cells import verdict_passed

    options = {}
    if args.calib_method:
        options["calibrate_method"] = args.calib_method
    cfg = DeployConfig(
        target=args.target, variant=args.variant, checkpoint=Path(args.checkpoint) if args.checkpoint else None,
        train_reference=not args.no_train_reference,
        n_calib=args.calib, n_eval=args.eval, image_size=args.image_size, gates=Path(args.gates),
        out=Path(args.out) if args.out else None, threads=args.threads, latency_runs=args.runs,
        calib_data=Path(args.calib_data) if args.calib_data else None,
        eval_data=Path(args.eval_data) if args.eval_data else None, options=options,
        alternatives=not args.no_alternatives, screen=args.screen, plan_only=args.plan_only,
        recipe=args.recipe, accuracy_control=args.accuracy_control,
        sensitivity=args.sensitivity, smoothing=_smoothing(args), fallback=not args.no_fallback,
        fallback_max_layers=args.fallback_max_layers, fallback_max_minutes=args.fallback_max_minutes,
        n_control=args.control, timing_budget_s=timing_budget(args.timing_budget), input=args.input,
        loads=loads(args.loads), device=args.device, device_eval=args.device_eval, batch_sizes=batches(args.batches),
    )
    if args.control is not None and args.control < 0:
        raise UserError(f"--control {args.control} must be ≥ 0 (labelled images held out for decisions; 0: none)")
    if args.fallback_max_layers < 0 or args.fallback_max_minutes <= 0:
        raise UserError("--fallback-max-layers must be ≥ 0 and --fallback-max-minutes > 0")
    result = run_deploy(cfg, log=lambda m: print(m, flush=True))
    if cfg.plan_only:
        print(json.dumps(result.report["plan"]))
        return result.exit_code
    print(f"report: {result.out_dir / 'report.html'}")
    if result.exit_code == EXIT_NOT_BUILT:
        what = "emulated" if (result.report.get("device") or {}).get("measured") == "emulated" else "proxy"
        print(f"convnext-deploy: {result.report['notes'][0]}; {what} figures reported, exit 3", file=sys.stderr)
    elif result.exit_code:
        failed = [v for v in result.report["gates"]["verdicts"] if not verdict_passed(v)]
        print(f"convnext-deploy: {len(failed)} gate(s) not met: "
              + "; ".join(f"{v['gate']} {v['status']}" for v in failed), file=sys.stderr)
    return result.exit_code


def _smoothing(args) -> float | None:
    if args.no_smoothing:
        return None
    if not 0.0 < args.smoothing_alpha < 1.0:
        raise UserError(f"--smoothing-alpha {args.smoothing_alpha} must be between 0 and 1 (exclusive); "
                        "--no-smoothing switches it off")
    return args.smoothing_alpha


def _smoothing_args(s) -> None:
    s.add_argument("--smoothing-alpha", type=float, default=0.5,
                   help="SmoothQuant α: how much of each norm channel's outlier range moves into the next layer's "
                        "weights before INT8 (default 0.5)")
    s.add_argument("--no-smoothing", action="store_true", help="quantize the checkpoint's weights as they are")


def _cmd_sensitivity(args) -> int:
    from convnext_deploy.pipeline.deploy import DeployConfig, run_sensitivity

    cfg = DeployConfig(target=args.target, variant=args.variant,
                       checkpoint=Path(args.checkpoint) if args.checkpoint else None, n_calib=args.calib,
                       out=Path(args.out) if args.out else None, threads=args.threads,
                       calib_data=Path(args.calib_data) if args.calib_data else None,
                       eval_data=Path(args.eval_data) if args.eval_data else None, smoothing=_smoothing(args))
    if args.images < 1 or args.images > args.calib:
        raise UserError(f"--images {args.images} must be between 1 and --calib ({args.calib}): it is a slice of the calibration split")
    result, out = run_sensitivity(cfg, args.images, log=lambda m: print(m, flush=True))
    print("most sensitive: " + ", ".join(result["ranking"][:5]))
    print(f"sensitivity: {out / 'sensitivity.md'}")
    return 0


def _cmd_summarize(args) -> int:
    from convnext_deploy.reports.summary import summarize

    rows, written = summarize([Path(r) for r in args.reports], Path(args.out))
    print(written["summary.md"].read_text(), end="")
    print(f"summary: {written['summary.md']}, {written['summary.html']} ({len(rows)} rows)")
    return 0


def _cmd_bundle(args) -> int:
    from convnext_deploy.pipeline.ship.bundle import make_bundle

    make_bundle(Path(args.run_dir), with_fp32=args.with_fp32,
                checkpoint=Path(args.checkpoint) if args.checkpoint else None, log=lambda m: print(m, flush=True))
    return 0


def _cmd_validate(args) -> int:
    from convnext_deploy.pipeline.ship.verify import validate_bundle

    if args.runs < 0 or (args.threads is not None and args.threads < 1):
        raise UserError("--runs must be ≥ 0 (0: no latency measurement) and --threads ≥ 1")
    if args.device:  # None: the device's INT8 path is this machine's, validate here
        from convnext_deploy.pipeline.device.guest import validate_on_device

        code = validate_on_device(args.device, args.bundle, args.images, args.labels, args.threads)
        if code is not None:
            return code
    return validate_bundle(Path(args.bundle), Path(args.images) if args.images else None,
                           Path(args.labels) if args.labels else None, args.runs, args.threads,
                           log=lambda m: print(m, flush=True))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convnext-deploy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("variants", help="list the ConvNeXt variants")
    s.set_defaults(func=_zoo("variants"))

    s = sub.add_parser("inspect", help="describe a checkpoint (official, timm, Hugging Face or ours)")
    s.add_argument("checkpoint")
    s.add_argument("--variant", help="fail unless the checkpoint is this variant")
    s.set_defaults(func=_zoo("inspect"))

    s = sub.add_parser("reference", help="train a reference checkpoint on Fashion-MNIST (resumable)")
    s.add_argument("--variant", required=True)
    s.add_argument("--epochs", type=int)
    s.add_argument("--image-size", type=int)
    s.add_argument("--lr", type=float)
    s.add_argument("--out", help="checkpoint path (default: reference/convnext_<variant>_fashion-mnist.safetensors)")
    s.add_argument("--force", action="store_true", help="retrain even if the checkpoint exists")
    s.set_defaults(func=_zoo("reference"))

    s = sub.add_parser("deploy", help="export, quantize, build, validate and gate one target")
    s.add_argument("--target", required=True)
    s.add_argument("--variant", required=True)
    s.add_argument("--checkpoint", help="default: the variant's reference checkpoint (trained first when missing)")
    s.add_argument("--no-train-reference", action="store_true",
                   help="without --checkpoint and no reference checkpoint: stop with one line instead of training it")
    s.add_argument("--calib", type=int, default=500, help="calibration images (default 500)")
    s.add_argument("--eval", type=int, default=None, help="evaluation images (default: the whole split)")
    s.add_argument("--image-size", type=int, default=224, help="deployment resolution for latency (default 224)")
    s.add_argument("--gates", default="gates.toml")
    s.add_argument("--out", help="report directory (default runs/<target>-<variant>)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--runs", type=int, default=100, help="timed runs at batch 1 (default 100)")
    s.add_argument("--timing-budget", metavar="SECONDS",
                   help="most seconds one decision (recipe choice, latency-aware step) adds timing rounds for, until "
                        "its speed ratios are within ±3 %% (default 60, or $CONVNEXT_DEPLOY_TIMING_BUDGET_S)")
    s.add_argument("--loads", metavar="N",
                   help="fresh loads of each timed artifact its latency rounds are spread over, so intervals carry "
                        "the spread between loads (default 3, or $CONVNEXT_DEPLOY_LOADS)")
    s.add_argument("--batches", metavar="LIST",
                   help="batch sizes the latency table times, 1 among them (default 1,8, or $CONVNEXT_DEPLOY_BATCHES)")
    s.add_argument("--calib-data", help="images to calibrate on, no labels needed: an ImageFolder tree (e.g. ImageNet "
                                        "train), a flat folder of images, or a text file of image paths, one a line")
    s.add_argument("--eval-data", help="ImageFolder tree to evaluate on (e.g. ImageNet val)")
    s.add_argument("--calib-method", choices=["minmax", "percentile", "entropy"])
    s.add_argument("--input", choices=["image", "tensor"], default="image",
                   help="what the shipped artifacts take: image (default: uint8 RGB pixels, NHWC, of the resized and "
                        "cropped image; mean/std inside the model) or tensor (float32 NCHW, normalised)")
    s.add_argument("--recipe", default="auto",
                   help="INT8 recipe: auto (default: the fastest candidate that meets the accuracy gates on the "
                        "control split, measured on this CPU) or a candidate's name as the report lists it")
    s.add_argument("--plan-only", action="store_true",
                   help="print the estimate of peak memory and time (and whether it fits here) as JSON and stop")
    s.add_argument("--screen", action=argparse.BooleanOptionalAction, default=None,
                   help="time every INT8 candidate on a slice of the model first and build in full only those that "
                        "can win (default: on from ConvNeXt-S up)")
    s.add_argument("--no-alternatives", action="store_true",
                   help="build only the default INT8 recipe (and the one --recipe names): no candidates to choose from")
    s.add_argument("--accuracy-control", action="store_true",
                   help="bound INT8 by the gate file's max_top1_drop_pp (OpenVINO: nncf.quantize_with_accuracy_control)")
    s.add_argument("--sensitivity", type=int, default=0, metavar="N",
                   help="add per-layer INT8 sensitivity, measured on N calibration images, to the report")
    _smoothing_args(s)
    s.add_argument("--no-fallback", action="store_true",
                   help="do not return layers to float when INT8 misses max_top1_drop_pp on the control split")
    s.add_argument("--control", type=int, default=None, metavar="N",
                   help="labelled images held out of the evaluation side for the recipe choice and the fallback "
                        "(default 1000 and at most a tenth of that side; up to half when given)")
    add_device_args(s, deploy=True)
    s.add_argument("--fallback-max-layers", type=int, default=8, help="fallback budget: layers in float (default 8)")
    s.add_argument("--fallback-max-minutes", type=float, default=30.0,
                   help="fallback budget in minutes, its per-layer ranking included (a third at most; default 30)")
    s.set_defaults(func=_cmd_deploy)

    s = sub.add_parser("sensitivity", help="per-layer INT8 sensitivity (SQNR, float-alone gain) of a target's artifact")
    s.add_argument("--target", required=True)
    s.add_argument("--variant", required=True)
    s.add_argument("--checkpoint", help="default: the variant's reference checkpoint")
    s.add_argument("--calib", type=int, default=500, help="calibration images the INT8 artifact is built with")
    s.add_argument("--images", type=int, default=256, help="calibration images measured on (default 256)")
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--out", help="output directory (default runs/sensitivity-<target>-<variant>)")
    s.add_argument("--batches", metavar="LIST",
                   help="batch sizes the latency table times, 1 among them (default 1,8, or $CONVNEXT_DEPLOY_BATCHES)")
    s.add_argument("--calib-data", help="images to calibrate on, no labels needed: an ImageFolder tree (e.g. ImageNet "
                                        "train), a flat folder of images, or a text file of image paths, one a line")
    s.add_argument("--eval-data", help="ImageFolder tree to evaluate on (e.g. ImageNet val)")
    _smoothing_args(s)
    s.set_defaults(func=_cmd_sensitivity)

    s = sub.add_parser("summarize", help="merge deploy reports (report.json) into one table: Markdown + HTML")
    s.add_argument("reports", nargs="+", metavar="REPORT", help="report.json files or the report directories holding them")
    s.add_argument("--out", default="runs/summary", help="output directory (default runs/summary)")
    s.set_defaults(func=_cmd_summarize)

    s = sub.add_parser("bundle", help="write RUN_DIR/bundle/: the artifact its gates passed, labels, preprocessing, "
                                      "model card, predict.py, reference outputs, SHA256SUMS (a deploy does it itself)")
    s.add_argument("run_dir", metavar="RUN_DIR", help="a deploy's report directory (e.g. runs/onnxruntime-atto)")
    s.add_argument("--with-fp32", action="store_true",
                   help="also the target's float reference artifact (FP32; Core ML: FP16)")
    s.add_argument("--checkpoint", help="the deployed checkpoint, where report.json's path no longer finds it")
    s.set_defaults(func=_cmd_bundle)

    s = sub.add_parser("validate", help="check a bundle on this machine: checksums, reference outputs on the local "
                                        "runtime, top-1 and latency next to the card's (exit 3: runtime not here)")
    s.add_argument("bundle", metavar="BUNDLE", help="a bundle directory (e.g. runs/onnxruntime-atto/bundle)")
    s.add_argument("--images", help="labelled images: DIR/<class>/<image> (class names of labels.txt, or one "
                                    "folder per class in label order), or a flat folder with --labels")
    s.add_argument("--labels", help="CSV of `file,label` lines for a flat --images folder (label: name or index)")
    s.add_argument("--runs", type=int, default=50, help="timed runs per latency figure (default 50; 0: none)")
    s.add_argument("--threads", type=int, help="runtime threads (default: the card's)")
    add_device_args(s, deploy=False)
    s.set_defaults(func=_cmd_validate)

    add_device_check(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:  # MachineError too
        print(f"convnext-deploy: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("convnext-deploy: interrupted; finished stages are cached, re-run to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `convnext-deploy variants | head`: the reader left, nothing is wrong
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when stdout is flushed
        return 0
    except Exception as e:
        err = machine_error(e) if isinstance(e, OSError) else None
        if err is not None:
            print(f"convnext-deploy: error: {err}", file=sys.stderr)
            return err.exit_code
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        print(f"convnext-deploy: internal error (a bug, not your input): {type(e).__name__}: {first}; "
              "please report it with the traceback above", file=sys.stderr)
        return 4


if __name__ == "__main__":
    sys.exit(main())
