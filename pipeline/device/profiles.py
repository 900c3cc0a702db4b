"""The devices a deploy can be made for (`--device NAME`), each a CPU this machine may not be.

A profile names the core, its ISA features as the kernel lists them (/proc/cpuinfo `flags` or `Features`: the
INT8/FP16/BF16 paths follow from them, `machine.cpu_profile`), the qemu CPU model that runs the runtimes' own
kernels for that core, and what is known of the runtimes there. `this machine` (no --device) stays the default.
A profile is *native* where this machine takes the same INT8 path on the same architecture: its figures, speed
included, are measured here; otherwise they come from emulation, numerics only.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.measure.machine import cpu_flags, cpu_profile

X86, ARM = "x86_64", "aarch64"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    arch: str  # x86_64 | aarch64
    features: tuple[str, ...]  # the kernel's names (x86 `flags`, ARM `Features`) of the INT8/FP16/BF16 extensions
    qemu_cpu: str | None  # qemu's -cpu model; None where qemu cannot emulate the core (TCG has no AVX-512)
    core: str  # the core, as machine.cpuinfo_fields names it from a recorded /proc/cpuinfo

    @property
    def fp16_arithmetic(self) -> bool:
        """ARMv8.2 half-precision arithmetic: OpenVINO's CPU plugin then runs float (and its INT8 simulation) at f16
        by default (ARM's `asimdhp`; x86 has no such default)."""
        return "asimdhp" in self.features

    def int8(self) -> dict:
        """The INT8/BF16 paths of this core (`machine.cpu_profile` of its features)."""
        return cpu_profile(set(self.features), self.description)

    def label(self) -> str:
        return f"{self.name}: {self.description}"


_ARMV82 = ("fp", "asimd", "fphp", "asimdhp", "asimddp")
PROFILES = {p.name: p for p in (
    DeviceProfile("x86-avx2", "x86-64 with AVX2, without VNNI (AMD EPYC Zen 3: GitHub's ubuntu-latest runners)", X86,
                  ("avx2",), "Haswell-v4", "Intel Haswell (AVX2, no VNNI)"),
    DeviceProfile("x86-vnni", "x86-64 with AVX-512 VNNI (Intel Xeon Cascade Lake and later, AMD EPYC Zen 4/5)", X86,
                  ("avx2", "avx512f", "avx512_vnni"), None, "x86-64 with AVX-512 VNNI"),
    DeviceProfile("rpi4", "Raspberry Pi 4 (Arm Cortex-A72)", ARM, ("fp", "asimd"), "cortex-a72", "ARM Cortex-A72"),
    DeviceProfile("rpi5", "Raspberry Pi 5 (Arm Cortex-A76)", ARM, _ARMV82, "cortex-a76", "ARM Cortex-A76"),
    DeviceProfile("graviton2", "AWS Graviton2 (Arm Neoverse-N1)", ARM, _ARMV82, "neoverse-n1", "ARM Neoverse-N1"),
    DeviceProfile("graviton3", "AWS Graviton3 (Arm Neoverse-V1)", ARM, (*_ARMV82, "sve", "i8mm", "bf16"),
                  "neoverse-v1", "ARM Neoverse-V1"),
    DeviceProfile("neoverse-n2", "Arm Neoverse-N2 (Microsoft Cobalt 100: GitHub's ubuntu-24.04-arm runners)", ARM,
                  (*_ARMV82, "sve", "sve2", "i8mm", "bf16"), "neoverse-n2", "ARM Neoverse-N2"),
)}


def get_profile(name: str) -> DeviceProfile:
    if name not in PROFILES:
        raise UserError(f"unknown --device {name!r}; choose one of: {', '.join(PROFILES)} (or leave it out: this "
                        "machine)")
    return PROFILES[name]


def _host_arch() -> str:
    machine = platform.machine().lower()
    return ARM if machine in ("aarch64", "arm64") else X86 if machine in ("x86_64", "amd64") else machine


def is_native(profile: DeviceProfile) -> bool:
    """Whether this machine computes what the device computes: same architecture, same INT8 path."""
    return profile.arch == _host_arch() and cpu_profile()["path"] == profile.int8()["path"]


def how_measured(profile: DeviceProfile) -> str:
    """"native" or "emulated"; a device this machine can neither be nor emulate is refused in one line."""
    if is_native(profile):
        return "native"
    if profile.qemu_cpu is None:
        raise UserError(f"--device {profile.name} cannot be measured here: this CPU takes the "
                        f"{cpu_profile()['path']} INT8 path ({', '.join(cpu_flags()) or 'no INT8 extension'}), and "
                        "qemu cannot emulate the device's (its TCG has no AVX-512); deploy on such a machine")
    return "emulated"


def add_device_args(parser, deploy: bool) -> None:
    """`--device` (and for a deploy `--device-eval`) of a CLI command."""
    names = ", ".join(PROFILES)
    parser.add_argument("--device", metavar="NAME", help=(
        f"the device the bundle is for (default: this machine): {names}. One this machine is not is emulated "
        "(qemu-user, `make setup-emulation`): its accuracy gates are judged on its own kernels, its speed is not "
        "measured (exit 3 unless the gate file sets allow_emulated = true)") if deploy else (
        f"run it on a device profile's kernels ({names}); one this machine is not is emulated (`make "
        "setup-emulation`): numerics only, no latency"))
    if deploy:
        parser.add_argument("--device-eval", type=int, default=500, metavar="N",
                            help="evaluation images run on an emulated device's kernels (default 500)")


def emulated_cpuinfo(profile: DeviceProfile) -> str | None:
    """The /proc/cpuinfo an emulated x86 run is told it has (`machine.CPUINFO_ENV`): qemu-x86_64 hands the guest
    the host's, while its kernels follow the emulated cpuid. qemu-aarch64 ≥ 8.2 writes the emulated core's own."""
    if profile.arch != X86 or profile.qemu_cpu is None:
        return None
    return (f"vendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 60\nmodel name\t: {profile.core}\n"
            "stepping\t: 1\nflags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 popcnt avx f16c fma bmi1 bmi2 movbe "
            f"{' '.join(profile.features)}\n\n")
