"""Content-keyed stage cache: a stage's output lives under a key of its inputs and is published atomically.

A directory is built under a temporary name and renamed into place only when complete, so an
interrupted run leaves nothing that a re-run would mistake for a finished stage.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def cache_root() -> Path:
    return Path(os.environ.get("CONVNEXT_DEPLOY_CACHE_DIR", ".cache"))


def key_of(*parts) -> str:
    """A short stable hash of JSON-able inputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def source_digest(*modules) -> str:
    """Hash of the source files of the given modules: code that shapes a cached output is part of its key."""
    h = hashlib.sha256()
    for m in modules:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()[:16]


def publish_dir(final: Path, build: Callable[[Path], None]) -> Path:
    """Run `build(tmp_dir)`, then rename tmp_dir to `final`. Returns `final`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        build(tmp)
        if final.exists():  # a concurrent or earlier run finished the same stage
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def cached_dir(stage: str, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """The stage's directory for `key`, built if absent. Returns (path, was_cached)."""
    final = cache_root() / stage / key
    if (final / ".complete").exists():
        return final, True

    def _build(tmp: Path) -> None:
        build(tmp)
        (tmp / ".complete").write_text(key + "\n")

    return publish_dir(final, _build), False
