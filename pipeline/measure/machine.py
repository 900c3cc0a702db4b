"""What machine and software a figure was measured on."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

# A recorded /proc/cpuinfo to describe this machine as: under qemu-user the guest reads the host's /proc/cpuinfo
# while its kernels follow the emulated CPU's cpuid (-cpu Haswell-v4: AVX2 without VNNI), so an emulated run names
# the CPU it emulates here.
CPUINFO_ENV = "CONVNEXT_DEPLOY_CPUINFO"


def _cpuinfo() -> str:
    recorded = os.environ.get(CPUINFO_ENV)
    try:
        with open(recorded or "/proc/cpuinfo") as f:
            return f.read()
    except OSError as e:
        if recorded:
            from convnext_deploy.pipeline.core.errors import UserError

            raise UserError(f"{CPUINFO_ENV}={recorded}: cannot read it ({e.strerror}); unset it, or name a recorded "
                            "/proc/cpuinfo") from None
        return ""


def _fields(text: str) -> dict[str, str]:
    """The first value of each `key : value` line of a /proc/cpuinfo text (the first CPU's)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    return _this_cpu()[0] or platform.processor() or platform.machine()


# macOS has no /proc/cpuinfo: `sysctl` names the chip and its ARM features, given here their Linux `Features` names
SYSCTL_FEATURES = {"hw.optional.AdvSIMD": "asimd", "hw.optional.arm.FEAT_DotProd": "asimddp",
                   "hw.optional.arm.FEAT_I8MM": "i8mm", "hw.optional.arm.FEAT_BF16": "bf16"}
SYSCTL_NAME = "machdep.cpu.brand_string"


def _sysctl() -> str:
    """What `sysctl` prints for the chip's name and SYSCTL_FEATURES on macOS ("" elsewhere; a key an older macOS
    lacks is left out of what it prints)."""
    if sys.platform != "darwin":
        return ""
    try:
        return subprocess.run(["sysctl", SYSCTL_NAME, *SYSCTL_FEATURES], capture_output=True, text=True,
                              timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def sysctl_fields(text: str) -> tuple[str, set[str]]:
    """(chip name, flags) of a macOS `sysctl` text (`key: value` lines), the flags in /proc/cpuinfo's ARM names."""
    fields = _fields(text)
    return fields.get(SYSCTL_NAME, ""), {flag for key, flag in SYSCTL_FEATURES.items() if fields.get(key) == "1"}


def _this_cpu() -> tuple[str, set[str]]:
    text = _cpuinfo()
    return cpuinfo_fields(text) if text.strip() else sysctl_fields(_sysctl())


# ARM kernels name a core only by its implementer's part number (Arm Ltd, implementer 0x41)
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd05": "Cortex-A55", "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76",
             "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2"}


def cpuinfo_fields(text: str) -> tuple[str, set[str]]:
    """(model name, flags) of a /proc/cpuinfo text. x86 has "model name"; ARM boards a "Model" line, ARM servers
    only the core's part number, which names the core where a "model name" line is only generic ("ARMv8
    Processor rev 2", as qemu-aarch64 writes it)."""
    fields = _fields(text)
    part = fields.get("CPU part", "").lower()
    arm = (f"ARM {ARM_PARTS.get(part, 'core ' + part)}" if fields.get("CPU implementer", "").lower() == "0x41"
           and part else "")
    name = (f"{fields['Model']} ({arm})" if fields.get("Model") and arm else fields.get("Model") or arm
            ) if arm else fields.get("model name") or fields.get("Model") or fields.get("Hardware", "")
    return name, set((fields.get("flags") or fields.get("Features") or "").split())


# AMD names its cores' generations by family and model; Intel's family 6 models are too many to name here.
AMD_GENERATIONS = ((23, range(0x30), "Zen"), (23, range(0x30, 0x100), "Zen 2"), (25, range(0x10), "Zen 3"),
                   (25, range(0x20, 0x60), "Zen 3"), (25, range(0x10, 0x20), "Zen 4"), (25, range(0x60, 0x100), "Zen 4"),
                   (26, range(0x100), "Zen 5"))


def cpu_identity(text: str | None = None) -> dict:
    """Vendor, family, model and stepping of a /proc/cpuinfo text (this machine's by default); None where the
    kernel does not say (ARM has implementer and part instead, named in the model name)."""
    fields = _fields(_cpuinfo() if text is None else text)

    def number(key):
        v = fields.get(key, "")
        return int(v, 0) if v.isdigit() or v.startswith("0x") else None

    vendor, family, model = fields.get("vendor_id"), number("cpu family"), number("model")
    generation = next((g for fam, models, g in AMD_GENERATIONS if vendor == "AuthenticAMD" and family == fam
                       and model in models), None)
    return {"vendor": vendor, "cpu_family": family, "cpu_model": model, "stepping": number("stepping"),
            "generation": generation}


def cpu_label(text: str | None = None) -> str:
    """The CPU's name with its generation, or family and model, where the name alone does not tell them apart
    ("AMD EPYC" is a Zen 3 on one machine, a Zen 5 on another): the unit a training time or a speed is given per."""
    ident = cpu_identity(text)
    name = cpuinfo_fields(text)[0] if text is not None else cpu_name()
    detail = ", ".join(str(p) for p in (ident["generation"], ident["cpu_family"] is not None
                                        and f"family {ident['cpu_family']} model {ident['cpu_model']}") if p)
    return f"{name} ({detail})" if detail else name


# The ISA extensions that decide INT8/BF16 kernel choice (x86 flags; on ARM the `Features` names).
INT8_BF16_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
                   "asimd", "asimddp", "i8mm", "bf16")


def _all_flags() -> set[str]:
    return _this_cpu()[1]


def cpu_flags(flags: set[str] | None = None) -> list[str]:
    have = _all_flags() if flags is None else flags
    return [w for w in INT8_BF16_FLAGS if w in have]


# The INT8 paths by the short name a gate file scopes a gate to ([target.<t>.path.<name>]), first match wins
PATH_NAMES = (("AMX", "amx"), ("AVX-512 VNNI", "vnni"), ("AVX-VNNI", "vnni"), ("AVX2 without VNNI", "avx2"),
              ("ARM I8MM", "arm-i8mm"), ("ARM dot-product", "arm-dotprod"), ("ARM NEON", "arm-neon"), ("", "generic"))
INT8_PATHS = tuple(dict.fromkeys(short for _, short in PATH_NAMES))


def cpu_profile(flags: set[str] | None = None, name: str | None = None) -> dict:
    """The paths INT8 and BF16 take on this CPU, from its flags: the same model's INT8 speed and even its INT8
    numerics differ by path (without VNNI, u8×s8 pair sums in VPMADDUBSW saturate at int16). `flags` and `name`:
    another CPU's, e.g. a recorded /proc/cpuinfo (`cpuinfo_fields`)."""
    have = set(cpu_flags(flags))
    vnni = bool(have & {"avx512_vnni", "avx_vnni", "amx_int8"})
    if "amx_int8" in have:
        int8 = "AMX-INT8 tiles (and AVX-512 VNNI)"
    elif "avx512_vnni" in have:
        int8 = "AVX-512 VNNI (VPDPBUSD: int32 accumulation, no saturation)"
    elif "avx_vnni" in have:
        int8 = "AVX-VNNI (256-bit VPDPBUSD: int32 accumulation, no saturation)"
    elif "avx2" in have:
        int8 = "AVX2 without VNNI (VPMADDUBSW: u8×s8 pair sums saturate at int16)"
    elif "i8mm" in have or "asimddp" in have:
        int8 = "ARM " + ("I8MM (SMMLA)" if "i8mm" in have else "dot-product (SDOT/UDOT)")
    elif "asimd" in have:
        int8 = "ARM NEON without dot-product (SMLAL/SADALP widening multiply-adds)"
    else:
        int8 = "no integer dot-product extension known to this tool"
    bf16 = "amx_bf16" in have or "avx512_bf16" in have or "bf16" in have
    return {"cpu": name or cpu_name(), "flags": sorted(have, key=INT8_BF16_FLAGS.index), "vnni": vnni, "int8_path": int8,
            "path": next(short for prefix, short in PATH_NAMES if int8.startswith(prefix)),
            "u8s8_saturates": int8.startswith("AVX2 without VNNI"),
            "bf16_native": bf16, "bf16_path": ("AMX-BF16" if "amx_bf16" in have else "AVX-512 BF16" if "avx512_bf16" in have
                                               else "ARM BF16 (BFMMLA)" if bf16
                                               else "none: BF16 is emulated (converted to FP32), slower than FP32")}


def profile_line(profile: dict | None = None) -> str:
    p = profile or cpu_profile()
    return f"CPU: {p['cpu']}; INT8 path: {p['int8_path']}; BF16: {p['bf16_path']}"


def describe() -> dict:
    import numpy
    import torch

    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "cpu_profile": cpu_profile(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
    }


def device_label(threads: int) -> str:
    return f"{cpu_name()}, {threads} thread{'s' if threads != 1 else ''}"
