"""Peak resident memory per deploy stage, from the kernel's own high-water mark.

Linux keeps the peak RSS of a process (VmHWM in /proc/self/status) and resets it when "5" is written to
/proc/self/clear_refs, so each stage's peak is exact, not sampled. Where that reset is not offered (macOS, an old
kernel), getrusage's ru_maxrss is the peak since the process started: still an upper bound, and labelled so.
The toolchains (ONNX Runtime, OpenVINO, torch) run in this process, so their memory is counted. A child process
(an emulated device's run under qemu) has its own high-water mark, which the kernel hands to the parent when the
child is waited for (getrusage RUSAGE_CHILDREN: the largest child's): a stage's process-tree peak adds the largest
child that ran during it to the process's own peak, an upper bound (the parent waits, so the two rarely coincide).
"""
from __future__ import annotations

import resource
from functools import lru_cache
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


def reset_peak() -> bool:
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


_FORKED: list[int] = []  # the tree's peak while each forked child (pipeline.core.forked) ran, in this stage


def forked_child_ran(parent_rss: int, added: int) -> None:
    """A forked child ran: the parent held `parent_rss` when it forked, and the child added `added` bytes (its peak
    less the pages it shared with the parent). Process-wide like the kernel's own peak, which it completes."""
    _FORKED.append(parent_rss + added)


def children_peak_bytes() -> int:
    """The high-water mark of the largest child process waited for so far (0: none)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024


def release_free_heap() -> None:
    """Hand the heap's free pages back to the kernel (glibc's malloc_trim). A stage's freed sessions and arenas
    otherwise stay resident in the allocator's arenas, one per thread that used them, and the next stage's peak
    starts on top of them. Elsewhere (musl, macOS) nothing to do."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim from the process's own symbols. Not ctypes.util.find_library: it runs ldconfig in a
    child process, whose high-water mark the kernel records with the parent's pages it started with, so the
    process tree would seem to double."""
    import ctypes

    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def rss_bytes() -> int | None:
    now = _status_kib("VmRSS")
    return None if now is None else now * 1024


@contextmanager
def stage_peak(name: str, rows: list, log=None):
    """Append {stage, peak_rss_mib, start_rss_mib, seconds, method, children_peak_rss_mib, forked_peak_rss_mib,
    tree_peak_rss_mib} for the body to `rows`: the process's own peak, the largest child's that ran in it (None: no
    larger child than before, whose peak is not this stage's), the tree's while a forked child ran, and the process
    tree's peak."""
    release_free_heap()
    start, t0, children = rss_bytes(), time.monotonic(), children_peak_bytes()
    exact = reset_peak()
    _FORKED.clear()
    try:
        yield
    finally:
        row = {"stage": name, "peak_rss_mib": round(peak_rss_bytes() / MIB, 1),
               "start_rss_mib": None if start is None else round(start / MIB, 1),
               "seconds": round(time.monotonic() - t0, 1),
               "method": "VmHWM reset at the stage's start (exact)" if exact
               else "ru_maxrss: peak since the process started (upper bound)"}
        child, forked = children_peak_bytes(), max(_FORKED, default=0)
        # a forked child's kernel peak counts the parent's pages it shared: its own figure replaces it (the stages
        # that fork run no other child)
        row["children_peak_rss_mib"] = round(child / MIB, 1) if child > children and not forked else None
        row["forked_peak_rss_mib"] = round(forked / MIB, 1) if forked else None
        row["tree_peak_rss_mib"] = round(max(row["peak_rss_mib"] + (row["children_peak_rss_mib"] or 0.0),
                                             forked / MIB), 1)
        rows.append(row)
        if log is not None:
            log(f"stage {name}: {row['seconds']:.0f} s, peak RSS {row['peak_rss_mib']:.0f} MiB"
                + (f" (process tree {row['tree_peak_rss_mib']:.0f} MiB)"
                   if row["tree_peak_rss_mib"] > row["peak_rss_mib"] else ""))
