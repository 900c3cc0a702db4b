"""Runs on the device's kernels: under qemu-user with the device's -cpu (emulated), or on the device itself.

    python on_device.py --job JOB.json
    python on_device.py --cli validate BUNDLE …   (any convnext-deploy command that needs no torch)

The job names the target, each artifact (files and metadata, as the deploy built them) and an .npy
of the deploy's float batches; this loads every artifact with the target's own runner, the one the deploy measures
with, so what ran (executed precisions, resolved settings) is read back by the same code as on the host. It writes
`<precision>.npy` (the outputs), `<precision>_reference.npy` (on the bundle's reference inputs, where the job
names them) and `result.json` (what ran, and the CPU as this machine's kernel describes it).

Needs numpy and the target's runtime only: the checkout is imported as `convnext_deploy` from its folders (no
install, no torch), so the device's Python is the runtime's own wheel set.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # this file is REPO/pipeline/device/on_device.py


def importable(repo: Path = REPO) -> None:
    """The checkout's rooms (pipeline/, targets/ …) as convnext_deploy's subpackages, as pyproject.toml maps them."""
    sys.path.insert(0, str(repo))
    import convnext_deploy

    if str(repo) not in convnext_deploy.__path__:
        convnext_deploy.__path__.append(str(repo))


def run_job(job: dict) -> dict:
    import numpy as np

    from convnext_deploy.pipeline.measure.machine import cpu_profile
    from convnext_deploy.targets import get_target
    from convnext_deploy.targets.base import Artifact

    target, out = get_target(job["target"]), Path(job["out"])
    inputs = np.load(job["inputs"])
    reference = np.load(job["reference_inputs"]) if job.get("reference_inputs") else None
    batch = int(job.get("batch", 8))
    result = {"cpu_profile": cpu_profile(), "models": {}}
    for precision, a in job["artifacts"].items():
        start = time.perf_counter()
        runner = target.load_runner(Artifact(job["target"], precision, [Path(f) for f in a["files"]],
                                             a.get("metadata") or {}), int(job.get("threads", 1)))
        loaded = time.perf_counter()
        outputs = np.concatenate([runner.run(inputs[i:i + batch]) for i in range(0, len(inputs), batch)])
        np.save(out / f"{precision}.npy", outputs.astype(np.float32))
        if reference is not None and precision in job.get("reference_precisions", [precision]):
            # the bundle's reference inputs, the model's own (uint8 pixels for image input)
            call = runner.native or runner.run
            np.save(out / f"{precision}_reference.npy", np.concatenate(
                [call(reference[i:i + batch]) for i in range(0, len(reference), batch)]).astype(np.float32))
        result["models"][precision] = {
            "runtime": runner.runtime, "executed": runner.precision, "settings": runner.settings,
            "layers": runner.layers, "load_s": round(loaded - start, 2),
            "run_s": round(time.perf_counter() - loaded, 2), "images": len(inputs)}
    return result


def main(argv: list[str]) -> int:
    importable()
    if argv[:1] == ["--cli"]:
        from convnext_deploy.pipeline.cli import main as cli

        return cli(argv[1:])
    job = json.loads(Path(argv[1]).read_text())
    result = run_job(job)
    (Path(job["out"]) / "result.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
