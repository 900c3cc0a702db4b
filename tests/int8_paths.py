"""INT8 arithmetic as each CPU path does it, and a way to run tests on a path this machine does not have.

- `pair_saturated_matmul`: u8 × s8 as x86 without VNNI computes it (VPMADDUBSW adds each pair of neighbouring
  products along K into an int16 with saturation; VPMADDWD then sums the pairs in int32); VNNI, AMX and ARM's
  dot-product instructions accumulate the exact products in int32.
- `run_emulated`: a command under `qemu-x86_64-static -cpu Haswell-v4`, AVX2 and FMA without AVX-512 or VNNI,
  which runs ONNX Runtime's U8S8 kernels to the same saturated result as a real AMD EPYC Zen 3, bit for bit
  (measured on one; ../shared/FIELD-NOTES.md). qemu-user hands the guest the host's /proc/cpuinfo, so the run
  is told the emulated CPU's description (`machine.CPUINFO_ENV`). Numerics only: speed under emulation is
  meaningless.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np

from convnext_deploy.pipeline.device.profiles import PROFILES, emulated_cpuinfo
from convnext_deploy.pipeline.measure.machine import CPUINFO_ENV

QEMU = "qemu-x86_64-static"
HASWELL = PROFILES["x86-avx2"].qemu_cpu  # the device profile x86-avx2 (`deploy --device x86-avx2`) emulates it too
# What the emulated CPU would print as /proc/cpuinfo (the flags the tool reads: AVX2, FMA, no AVX-512 or VNNI)
HASWELL_CPUINFO = emulated_cpuinfo(PROFILES["x86-avx2"])


def pair_saturated_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a [M, K] uint8 × b [K, N] int8 with each pair of neighbouring products (k = 2j, 2j+1) summed in int16 with
    saturation, the pairs summed in int32 (K odd: the last product pairs with a zero)."""
    a, b = a.astype(np.int32), b.astype(np.int32)
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(axis=1)


def emulation_missing() -> str | None:
    """Why a command cannot run under the AVX2 emulator here, or None."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (Debian's qemu-user-static; `make setup` installs it)"
    return None


def run_emulated(args: list[str], tmp: Path, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """`args` (a command of this machine, e.g. the venv's python) under `qemu-x86_64 -cpu Haswell-v4`."""
    cpuinfo = tmp / "haswell-cpuinfo.txt"
    cpuinfo.write_text(HASWELL_CPUINFO)
    run_env = {**os.environ, **(env or {}), CPUINFO_ENV: str(cpuinfo)}
    return subprocess.run([QEMU, "-cpu", HASWELL, *args], capture_output=True, text=True, timeout=timeout,
                          env=run_env, check=False)
