"""What machine and software a figure was measured on."""
from __future__ import annotations

import os
import platform
import sys


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = cpuinfo_fields(f.read())[0]
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine()


# ARM kernels name a core only by its implementer's part number (Arm Ltd, implementer 0x41)
ARM_PARTS = {"0xd03": "Cortex-A53", "0xd05": "Cortex-A55", "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76",
             "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2"}


def cpuinfo_fields(text: str) -> tuple[str, set[str]]:
    """(model name, flags) of a /proc/cpuinfo text. x86 has "model name"; ARM boards a "Model" line, ARM servers
    only the core's part number."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    part = fields.get("CPU part", "").lower()
    arm = (f"ARM {ARM_PARTS.get(part, 'core ' + part)}" if fields.get("CPU implementer", "").lower() == "0x41"
           and part else "")
    name = fields.get("model name") or (f"{fields['Model']} ({arm})" if fields.get("Model") and arm else
                                        fields.get("Model")) or arm or fields.get("Hardware", "")
    return name, set((fields.get("flags") or fields.get("Features") or "").split())


# The ISA extensions that decide INT8/BF16 kernel choice (x86 flags; on ARM the `Features` names).
INT8_BF16_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
                   "asimd", "asimddp", "i8mm", "bf16")


def _all_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_flags(flags: set[str] | None = None) -> list[str]:
    have = _all_flags() if flags is None else flags
    return [w for w in INT8_BF16_FLAGS if w in have]


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
