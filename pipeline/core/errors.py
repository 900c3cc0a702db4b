"""The errors the CLI reports as one line, never a traceback: the user's input, or the machine.

A gate that is missed is not an error (exit 1, reported); a bug is neither of these (exit 4, with traceback).
"""
from __future__ import annotations

import errno
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


class UserError(Exception):
    """A problem with the user's input (file, option, data) that they can fix; never a traceback."""

    exit_code = 2


class MachineError(UserError):
    """The machine, not the input nor a gate: out of space, permission denied, a read-only file system."""


# errno → what the user is told; these are faults of where we write, not of what we compute.
MACHINE_ERRNOS = {
    errno.ENOSPC: "out of space",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}
# Below this much free space, any failure while writing is taken for a full disk: some writers (OpenVINO's
# ov.save_model: "basic_ios::clear: iostream error") lose the errno on the way up.
MIN_FREE_BYTES = 64 << 20


def free_bytes(path: Path) -> int | None:
    """Free space on the file system holding `path` (or its nearest existing ancestor)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _out_of_space(what: str, where, need_bytes: int = 0, written: int = 0) -> str:
    if need_bytes:
        need = f"about {_size(need_bytes)} needed"
    elif written:
        need = f"more than {_size(written)} needed (it ran out after writing that much)"
    else:
        need = "how much more is needed is not known"
    return f"{what} at {where}: {_size(free_bytes(Path(where)))} free there, {need}"


def machine_error(e: OSError, path: Path | None = None, need_bytes: int = 0,
                  written: int = 0) -> MachineError | None:
    """The MachineError for an OSError that is the machine's fault, naming `path` (else the OSError's file);
    None for any other OSError."""
    what = MACHINE_ERRNOS.get(e.errno)
    if what is None:
        return None
    where = path if path is not None else e.filename
    if where is None:  # e.g. a write() on an open file: the OSError names no file
        return MachineError(f"{what} ({e})")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return MachineError(_out_of_space(what, where, need_bytes, written))
    return MachineError(f"{what}: {where}")


@contextmanager
def machine_faults(path: Path, need_bytes: int = 0, written: Callable[[], int] | None = None):
    """Report a fault of the machine while writing under `path` as a MachineError (one line, exit 2).

    OSErrors with a machine errno are converted; so is any other exception raised while `path`'s file system
    has less than max(need_bytes, 64 MiB) free, since a full disk is then the likely cause. `written`, if
    given, says how many bytes the failed write had put down: a lower bound on what was needed.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        done = written() if written else 0
        err = machine_error(e, path, need_bytes, done) if isinstance(e, OSError) else None
        if err is None:
            free = free_bytes(path)
            if free is None or free >= max(need_bytes, MIN_FREE_BYTES):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:200]  # one line: some toolchains raise pages
            err = MachineError(f"{_out_of_space('out of space', path, need_bytes, done)} ({type(e).__name__}: {first})")
        raise err from e
