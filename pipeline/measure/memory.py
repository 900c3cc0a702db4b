"""Peak resident memory per deploy stage, from the kernel's own high-water mark.

Linux keeps the peak RSS of a process (VmHWM in /proc/self/status) and resets it when "5" is written to
/proc/self/clear_refs, so each stage's peak is exact, not sampled. Where that reset is not offered (macOS, an old
kernel), getrusage's ru_maxrss is the peak since the process started: still an upper bound, and labelled so.
The toolchains (ONNX Runtime, OpenVINO, torch) run in this process, so their memory is counted.
"""
from __future__ import annotations

import resource
import sys
import time
from contextlib import contextmanager
from pathlib import Path

MIB = 1 << 20


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The peak RSS since the last reset (Linux) or since the process started."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024  # bytes on macOS, KiB on Linux


def rss_bytes() -> int | None:
    now = _status_kib("VmRSS")
    return None if now is None else now * 1024


@contextmanager
def stage_peak(name: str, rows: list, log=None):
    """Append {stage, peak_rss_mib, start_rss_mib, seconds, method} for the body to `rows`."""
    start, t0 = rss_bytes(), time.monotonic()
    exact = _reset_peak()
    try:
        yield
    finally:
        row = {"stage": name, "peak_rss_mib": round(peak_rss_bytes() / MIB, 1),
               "start_rss_mib": None if start is None else round(start / MIB, 1),
               "seconds": round(time.monotonic() - t0, 1),
               "method": "VmHWM reset at the stage's start (exact)" if exact
               else "ru_maxrss: peak since the process started (upper bound)"}
        rows.append(row)
        if log is not None:
            log(f"stage {name}: {row['seconds']:.0f} s, peak RSS {row['peak_rss_mib']:.0f} MiB")
