"""`convnext-deploy device-check RUN_DIR`, on the device itself: the artifacts of a deploy made for an emulated
`--device`, run natively on the very images its emulated figures came from, image by image against the emulated
predictions. It is how the deploy matrix's ARM jobs (real Neoverse-N2 runners) hold the emulation to the silicon.

Both sides run the runtime's own kernels for the same core, so they should agree image for image; a top-1 count
more than `TOLERANCE` of the images apart fails (exit 1), naming both figures and where each was measured.
"""
from __future__ import annotations

from pathlib import Path

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.device.profiles import get_profile, is_native
from convnext_deploy.pipeline.measure.machine import cpu_label, cpu_profile

TOLERANCE = 0.01  # of the images, at least one: a top-1 count that far apart is no longer "the same kernels"


def add_device_check(sub) -> None:
    """The `device-check` subcommand (the CLI imports this module at start: no numpy or torch here)."""
    s = sub.add_parser("device-check", help="on the device itself: a run deployed for an emulated --device, its "
                                            "artifacts on the same images, against the emulated figures "
                                            "(exit 1: apart)")
    s.add_argument("run_dir", metavar="RUN_DIR", help="the deploy's report directory (report.json and artifacts/)")
    s.add_argument("--threads", type=int, default=2)
    s.set_defaults(func=lambda a: device_check(Path(a.run_dir), a.threads, log=lambda m: print(m, flush=True)))


def _images(run_dir: Path, report: dict, device: dict):
    import numpy as np

    from convnext_deploy.calibration.batches import iter_batches
    from convnext_deploy.pipeline.models.variants import Preprocessing
    from convnext_deploy.pipeline.ship.reference_set import evaluation_source

    source = evaluation_source(report, report["model"].get("class_names") or [])
    xs, ys = zip(*iter_batches(source, device["indices"], Preprocessing.from_dict(report["model"]["preprocessing"]),
                               batch_size=64, desc="device images"))
    return np.concatenate(xs), np.concatenate(ys)


def device_check(run_dir: Path, threads: int = 2, log=print) -> int:
    import numpy as np

    from convnext_deploy.pipeline.ship.bundle import read_report, run_batched
    from convnext_deploy.targets import get_target
    from convnext_deploy.targets.base import Artifact

    report = read_report(run_dir)
    device = report.get("device") or {}
    if device.get("measured") != "emulated" or "indices" not in device:
        raise UserError(f"{run_dir} was not deployed for an emulated --device (its report has no emulated figures); "
                        "deploy with --device NAME first")
    profile = get_profile(device["name"])
    if not is_native(profile):
        raise UserError(f"this machine ({cpu_label()}, INT8 path {cpu_profile()['path']}) is not {profile.label()}: "
                        "run device-check on that device (the deploy matrix's ARM job does)")
    x, labels = _images(run_dir, report, device)
    target, rows = get_target(report["target"]["name"]), {a["precision"]: a for a in report["artifacts"]}
    failed = 0
    for precision, emulated in device["accuracy"].items():
        row = rows[precision]
        runner = target.load_runner(Artifact(target.name, precision, [run_dir / "artifacts" / f for f in row["files"]],
                                             row["metadata"]), threads)
        here = run_batched(runner.run, x).argmax(1)
        correct, n = int((here == labels).sum()), len(labels)
        same = int((here == np.asarray(emulated["predictions"])).sum())
        ok = abs(correct - emulated["correct"]) <= max(1, int(TOLERANCE * n))
        failed += not ok
        log(f"{precision}: top-1 here {correct}/{n} ({runner.device}; ran {runner.precision}) vs "
            f"{emulated['correct']}/{n} {device['label']} ({device['emulator']}); the same prediction on {same}/{n}: "
            + ("match" if ok else f"MISMATCH (more than {max(1, int(TOLERANCE * n))} images apart)"))
    log(f"device-check: {'PASS' if not failed else 'FAIL'}: {run_dir} on {cpu_label()}")
    return 1 if failed else 0
