"""What machine and software a figure was measured on."""
from __future__ import annotations

import os
import platform
import sys


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# The ISA extensions that decide INT8/BF16 kernel choice (x86 flags; on ARM the `Features` names).
INT8_BF16_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
                   "asimddp", "i8mm", "bf16")


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


def cpu_profile(flags: set[str] | None = None) -> dict:
    """The paths INT8 and BF16 take on this CPU, from its flags: the same model's INT8 speed and even its INT8
    numerics differ by path (without VNNI, u8×s8 pair sums in VPMADDUBSW saturate at int16)."""
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
    else:
        int8 = "no integer dot-product extension known to this tool"
    bf16 = "amx_bf16" in have or "avx512_bf16" in have or "bf16" in have
    return {"cpu": cpu_name(), "flags": sorted(have, key=INT8_BF16_FLAGS.index), "vnni": vnni, "int8_path": int8,
            "bf16_native": bf16, "bf16_path": ("AMX-BF16" if "amx_bf16" in have else "AVX-512 BF16" if bf16
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
