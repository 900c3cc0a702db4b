"""Content-keyed stage cache that cannot lie: a stage's output lives under a key of its inputs (code included),
is published atomically, and is checked against the hashes it was published with every time it is reused.

A directory is built under a temporary name and renamed into place only when complete, so an interrupted
run leaves nothing that a re-run would mistake for a finished stage. A file changed or truncated after
publication (a power cut before the data reached the disk, a stray edit) is found by its hash and rebuilt.
"""
from __future__ import annotations

import ast
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from convnext_deploy.pipeline.core.errors import machine_faults

PACKAGE = "convnext_deploy"
# The folder holding the rooms: the checkout's root, or the installed package's folder in a wheel.
REPO = Path(__file__).resolve().parents[2]
PROJECT_PACKAGES = ("pipeline", "targets", "calibration", "reports")
MANIFEST = ".complete"


def cache_root() -> Path:
    return Path(os.environ.get("CONVNEXT_DEPLOY_CACHE_DIR", ".cache"))


def key_of(*parts) -> str:
    """A short stable hash of JSON-able inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------- code as part of a key

def _module_file(name: str, root: Path) -> Path | None:
    parts = name.split(".")
    if parts[0] != PACKAGE or len(parts) < 2 or parts[1] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*parts[1:])
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


def _imported_modules(name: str, file: Path, root: Path) -> set[str]:
    """Project modules `file` imports anywhere (top level or inside functions), as absolute dotted names."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_bytes(), str(file))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from ..x import y`
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names if _module_file(f"{base}.{a.name}", root)}
            found |= subs
            if len(subs) < len(node.names):  # some name is defined in `base` itself
                found.add(base)
    return {m for m in found if _module_file(m, root)}


def module_files(*module_names: str, root: Path | None = None) -> list[Path]:
    """The source files of the named project modules and of every project module they import, transitively.

    A package's `__init__` is followed only where it is imported by name: importing `targets.ort_cpu` runs
    `targets/__init__.py`, but that is the table of all targets, and following it would tie every target's
    cache key to every other target's code.
    """
    root = Path(root or REPO).resolve()
    todo, seen = [], {}
    for name in module_names:
        f = _module_file(name, root)
        if f is None:
            raise ValueError(f"{name} is not a module of {PACKAGE} ({', '.join(PROJECT_PACKAGES)}) under {root}")
        todo.append((name, f))
    while todo:
        name, f = todo.pop()
        if f in seen:
            continue
        seen[f] = name
        for imported in _imported_modules(name, f, root):
            g = _module_file(imported, root)
            if g is not None and g not in seen:
                todo.append((imported, g))
    return sorted(seen, key=lambda f: f.relative_to(root).as_posix())


def code_digest(*module_names: str, root: Path | None = None) -> str:
    """Hash of the source of the named project modules and every project module they import (read, not imported)."""
    root = Path(root or REPO).resolve()
    h = hashlib.sha256()
    for f in module_files(*module_names, root=root):
        data = f.read_bytes()
        h.update(f"{f.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- atomic publication

def _bytes_under(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        files = path.rglob("*") if path.is_dir() else [path]
        return sum(f.stat().st_size for f in files if f.is_file())
    except OSError:  # a best-effort figure for an error message
        return 0


def _swap_in(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`, moving whatever is at `final` aside first (a rename cannot replace a full dir)."""
    aside = []
    try:
        for _ in range(8):  # another process may publish the same path between our two renames
            try:
                os.replace(tmp, final)
                return
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR):
                    raise
            old = final.with_name(f".{final.name}.old-{secrets.token_hex(6)}")
            with contextlib.suppress(FileNotFoundError):
                os.replace(final, old)
                aside.append(old)
        os.replace(tmp, final)
    finally:
        for old in aside:
            shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def publish_dir(final: Path, build: Callable[[Path], None], need_bytes: int = 0) -> Path:
    """Run `build(tmp_dir)`, then swap tmp_dir in as `final` (replacing it whole). Returns `final`.

    On failure nothing is published and the temporary directory is removed; faults of the machine
    (no space, no permission) come out as MachineError.
    """
    final = Path(final)
    tmp = None
    try:
        # judged before the finally below frees tmp's space
        with machine_faults(final, need_bytes, written=lambda: _bytes_under(tmp)):
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
            tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes it private; a published directory is an ordinary one
            build(tmp)
            _swap_in(tmp, final)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def publish_file(final: Path, write: Callable[[Path], None], need_bytes: int = 0) -> Path:
    """Run `write(tmp_file)` on a temporary name beside `final`, then rename it to `final`. Returns `final`."""
    final = Path(final)
    tmp = None
    try:
        with machine_faults(final, need_bytes, written=lambda: _bytes_under(tmp)):
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp")
            os.close(fd)
            tmp = Path(name)
            tmp.chmod(0o666 & ~_UMASK)  # mkstemp makes it private; a published file is an ordinary one
            write(tmp)
            os.replace(tmp, final)
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return final


# ---------------------------------------------------------------- the stage cache

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _entry_files(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of every file in an entry (recursing: a Core ML .mlpackage is a directory)."""
    return {p.relative_to(directory).as_posix(): sha256_file(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.relative_to(directory).as_posix() != MANIFEST}


def entry_problem(directory: Path, key: str) -> str | None:
    """Why the entry at `directory` cannot be trusted ("absent" when there is none), or None when it verifies."""
    try:
        text = (directory / MANIFEST).read_text()
    except FileNotFoundError:
        return "absent"
    try:
        manifest = json.loads(text)
        listed = manifest["files"]
        ok = manifest["key"] == key and isinstance(listed, dict)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        return f"has no file hashes to check ({MANIFEST} from an older version)"
    there = _entry_files(directory)
    for rel, digest in listed.items():
        if rel not in there:
            return f"is corrupted ({rel}: missing, it was there when it was published)"
        if there[rel] != digest:
            return f"is corrupted ({rel}: sha256 differs from when it was published)"
    extra = sorted(there.keys() - listed.keys())
    if extra:
        return f"is corrupted ({extra[0]}: not there when it was published)"
    return None


@contextlib.contextmanager
def _key_lock(final: Path, log: Callable[[str], None]):
    """One builder per key across processes (the kernel drops the lock of a killed process)."""
    lock = final.with_name(f".{final.name}.lock")
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"cache: waiting for another process building {final}")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def cached_dir(stage: str, key: str, build: Callable[[Path], None], log: Callable[[str], None] = print,
               need_bytes: int = 0) -> tuple[Path, bool]:
    """The stage's directory for `key`, built if absent or if it fails its hashes. Returns (path, was_cached)."""
    final = cache_root() / stage / key
    if entry_problem(final, key) is None:
        return final, True

    def _build(tmp: Path) -> None:
        build(tmp)
        # written last: its presence means complete, its hashes are what a reuse checks
        (tmp / MANIFEST).write_text(json.dumps({"key": key, "files": _entry_files(tmp)}, indent=1) + "\n")

    with machine_faults(final, need_bytes):
        final.parent.mkdir(parents=True, exist_ok=True)
        with _key_lock(final, log):
            problem = entry_problem(final, key)  # again: it may have been built while we waited
            if problem is None:
                return final, True
            if problem != "absent":
                log(f"cache: {final} {problem}; rebuilding")
            for stale in [*final.parent.glob(f".{key}.*.tmp"), *final.parent.glob(f".{key}.old-*")]:
                shutil.rmtree(stale, ignore_errors=True)  # left by a killed build of this key; we hold its lock
            publish_dir(final, _build, need_bytes)
    return final, False
