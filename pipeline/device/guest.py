"""This project's code run on an emulated device: on_device.py under qemu-user with the device's -cpu, the guest
told which CPU it is where qemu cannot say (x86: `machine.CPUINFO_ENV`)."""
from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from convnext_deploy.pipeline.device import emulator
from convnext_deploy.pipeline.device.profiles import DeviceProfile, emulated_cpuinfo
from convnext_deploy.pipeline.measure.machine import CPUINFO_ENV

ON_DEVICE = Path(__file__).resolve().with_name("on_device.py")


def where(profile: DeviceProfile) -> str:
    """The emulator as a report names it, e.g. "qemu-aarch64 10.0.2 -cpu neoverse-v1"."""
    em = emulator.find(profile.arch)
    return f"qemu-{em.arch} {emulator.version(em)} -cpu {profile.qemu_cpu}"


def run_guest(profile: DeviceProfile, argv: list[str], timeout: float, env: dict | None = None,
              script: Path | None = ON_DEVICE) -> subprocess.CompletedProcess:
    """`python SCRIPT ARGV` (`script` None: `python ARGV`) on the device's kernels, `env` set in the guest, output
    captured; UserError past `timeout` or when the emulation is not set up."""
    em = emulator.find(profile.arch)
    with tempfile.TemporaryDirectory(prefix="convnext-guest-") as tmp:
        guest = dict(env or {})
        cpuinfo = emulated_cpuinfo(profile)
        if cpuinfo:
            (Path(tmp) / "cpuinfo.txt").write_text(cpuinfo)
            guest[CPUINFO_ENV] = str(Path(tmp) / "cpuinfo.txt")
        return emulator.run(em, profile.qemu_cpu, [*([str(script)] if script else []), *argv], timeout=timeout,
                            env=guest)


VALIDATE_TIMEOUT_S = 1800.0  # a bundle's 200 reference images at up to 2 s each under emulation, and the loads


def validate_emulated(profile: DeviceProfile, argv: list[str], log=print) -> int:
    """`convnext-deploy validate ARGV` run on the device's kernels (no latency: emulation has no speed); its exit
    code. The lines it prints are this command's."""
    log(f"validate on {profile.label()}: emulated ({where(profile)}): numerics only, latency not measured")
    done = run_guest(profile, ["--cli", "validate", *argv, "--runs", "0"], timeout=VALIDATE_TIMEOUT_S)
    for line in done.stdout.splitlines():
        log(line)
    for line in done.stderr.splitlines():
        if "MIDR_EL1" not in line:  # OpenVINO on qemu: it reads the core's id from sysfs, which qemu does not have
            print(line, file=sys.stderr)
    return done.returncode


def validate_on_device(name: str, bundle, images, labels, threads) -> int | None:
    """`validate --device NAME`: its exit code where the device is emulated; None where this machine takes the
    device's INT8 path (validate runs here, as without --device)."""
    from convnext_deploy.pipeline.device.profiles import get_profile, how_measured

    profile = get_profile(name)
    if how_measured(profile) == "native":
        print(f"validate on {profile.label()}: this machine takes its INT8 path; run here", flush=True)
        return None
    argv = [str(Path(bundle).resolve()), *(["--images", str(Path(images).resolve())] if images else []),
            *(["--labels", str(Path(labels).resolve())] if labels else []),
            *(["--threads", str(threads)] if threads else [])]
    return validate_emulated(profile, argv, log=lambda m: print(m, flush=True))
