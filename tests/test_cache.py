"""The stage cache cannot lie: code is part of its keys, entries are checked against their published hashes,
and neither a failed build, a killed one nor two at once leaves an entry that is not whole."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from convnext_deploy.pipeline.core.cache import (
    cache_root,
    cached_dir,
    code_digest,
    entry_problem,
    module_files,
    publish_file,
)

from conftest import REPO

PACKAGES = ("pipeline", "targets", "calibration", "reports")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _tiny_build(tmp):
    (tmp / "model.bin").write_bytes(b"\x01" * 1000)
    (tmp / "pkg.mlpackage" / "Data").mkdir(parents=True)  # entries may hold directories (Core ML)
    (tmp / "pkg.mlpackage" / "Data" / "weights.bin").write_bytes(b"\x02" * 1000)


# ---------------------------------------------------------------- code_digest

def test_code_digest_follows_imports_and_only_them(tmp_path):
    root = tmp_path / "src"
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    before = code_digest("convnext_deploy.targets.ort_cpu", root=root)
    assert before == code_digest("convnext_deploy.targets.ort_cpu", root=root)
    used = {f.relative_to(root).as_posix() for f in module_files("convnext_deploy.targets.ort_cpu", root=root)}
    # qdq and model are imported inside functions only, model two steps away (ort_cpu → qdq → model)
    assert {"targets/ort_cpu.py", "targets/qdq.py", "pipeline/models/convnext.py"} <= used
    assert "targets/openvino_cpu.py" not in used and "pipeline/core/gate_file.py" not in used

    for helper in ("targets/qdq.py", "pipeline/models/convnext.py"):
        with open(root / helper, "a") as f:
            f.write("\n# changed\n")
        after = code_digest("convnext_deploy.targets.ort_cpu", root=root)
        assert after != before, helper
        before = after
    for unrelated in ("targets/openvino_cpu.py", "pipeline/core/gate_file.py"):
        with open(root / unrelated, "a") as f:
            f.write("\n# changed\n")
        assert code_digest("convnext_deploy.targets.ort_cpu", root=root) == before, unrelated
    with pytest.raises(ValueError, match="convnext_deploy.targets.nonesuch"):
        code_digest("convnext_deploy.targets.nonesuch", root=root)


def test_code_digest_import_forms(tmp_path):
    """Relative and `from package import submodule` imports are followed; a package `__init__` only when a
    name is taken from it."""
    pkg = tmp_path / "pipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from convnext_deploy.pipeline import table  # the package's own table\n")
    (pkg / "table.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    from .c import g\n")
    (pkg / "b.py").write_text("")
    (pkg / "c.py").write_text("import convnext_deploy.pipeline.d\ng = 1\n")
    (pkg / "d.py").write_text("import numpy\n")
    (pkg / "e.py").write_text("from convnext_deploy.pipeline import table, something\n")
    names = lambda m: [f.name for f in module_files(m, root=tmp_path)]  # noqa: E731
    assert names("convnext_deploy.pipeline.a") == ["a.py", "b.py", "c.py", "d.py"]
    assert names("convnext_deploy.pipeline.e") == ["__init__.py", "e.py", "table.py"]  # `something` comes from __init__


# ---------------------------------------------------------------- verification on reuse

def test_corrupted_entry_is_rebuilt_and_named(cache):
    first, cached = cached_dir("stage", "k1", _tiny_build)
    assert not cached and entry_problem(first, "k1") is None
    manifest = json.loads((first / ".complete").read_text())
    assert manifest["key"] == "k1" and set(manifest["files"]) == {"model.bin", "pkg.mlpackage/Data/weights.bin"}
    assert cached_dir("stage", "k1", _tiny_build, log=pytest.fail) == (first, True)

    victim = first / "pkg.mlpackage" / "Data" / "weights.bin"
    data = bytearray(victim.read_bytes())
    data[10] ^= 0xFF
    victim.write_bytes(bytes(data))
    logs = []
    path, cached = cached_dir("stage", "k1", _tiny_build, log=logs.append)
    assert not cached and entry_problem(path, "k1") is None
    assert victim.read_bytes() == b"\x02" * 1000
    assert logs == [f"cache: {first} is corrupted (pkg.mlpackage/Data/weights.bin: sha256 differs from when "
                    "it was published); rebuilding"]


def test_missing_file_and_old_format_are_rebuilt(cache):
    path, _ = cached_dir("stage", "k2", _tiny_build)
    (path / "model.bin").unlink()
    logs = []
    assert cached_dir("stage", "k2", _tiny_build, log=logs.append) == (path, False)
    assert len(logs) == 1 and "(model.bin: missing" in logs[0]

    (path / ".complete").write_text("k2\n")  # what older versions wrote: the key only
    logs = []
    assert cached_dir("stage", "k2", _tiny_build, log=logs.append) == (path, False)
    assert len(logs) == 1 and "no file hashes" in logs[0] and "rebuilding" in logs[0]
    assert cached_dir("stage", "k2", _tiny_build) == (path, True)


def test_failed_build_leaves_nothing(cache):
    def boom(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 100)
        raise RuntimeError("build failed")

    with pytest.raises(RuntimeError, match="build failed"):
        cached_dir("stage", "k3", boom)
    left = [p.name for p in (cache / "stage").iterdir()]
    assert left == [".k3.lock"]  # no entry, no temporary directory
    assert cached_dir("stage", "k3", _tiny_build)[1] is False


def test_publish_file_is_atomic(tmp_path):
    target = tmp_path / "d" / "w.bin"
    publish_file(target, lambda p: p.write_bytes(b"old"))

    def half(p):
        p.write_bytes(b"ne")
        raise OSError("interrupted")

    with pytest.raises(OSError, match="interrupted"):
        publish_file(target, half)
    assert target.read_bytes() == b"old" and [p.name for p in target.parent.iterdir()] == ["w.bin"]


# ---------------------------------------------------------------- other processes

BUILDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from convnext_deploy.pipeline.core.cache import cached_dir

    def build(tmp):
        (tmp / "part1.bin").write_bytes(b"a" * 1000)
        print("building", flush=True)
        time.sleep(float(sys.argv[1]))
        with open(sys.argv[2], "a") as f:
            f.write("built\\n")
        (tmp / "part2.bin").write_bytes(b"b" * 1000)

    path, cached = cached_dir("stage", "shared", build, log=lambda m: print(m, flush=True))
    print("cached" if cached else "built", path, flush=True)
""")


def _builder(cache, sleep, marker):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CONVNEXT_DEPLOY_CACHE_DIR": str(cache)}
    return subprocess.Popen([sys.executable, "-c", BUILDER, str(sleep), str(marker)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_killed_build_leaves_no_entry_and_rerun_builds(cache, tmp_path):
    p = _builder(cache, 60, tmp_path / "marker")
    try:
        assert p.stdout.readline().strip() == "building", p.stderr.read()
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        p.kill()
    assert p.returncode == -signal.SIGKILL
    final = cache / "stage" / "shared"
    assert not final.exists()
    assert any(n.name.endswith(".tmp") for n in final.parent.iterdir())  # the killed build's leftovers

    path, cached = cached_dir("stage", "shared", _tiny_build)
    assert path == final and not cached and entry_problem(final, "shared") is None
    assert not any(n.name.endswith(".tmp") for n in final.parent.iterdir())  # cleaned by the re-run


def test_two_processes_building_one_key(cache, tmp_path):
    marker = tmp_path / "marker"
    procs = [_builder(cache, 1.0, marker)]
    time.sleep(0.2)  # nothing hinges on it: both orders must work, this makes the overlap likely
    procs.append(_builder(cache, 1.0, marker))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    final = cache_root() / "stage" / "shared"
    assert entry_problem(final, "shared") is None
    assert marker.read_text() == "built\n"  # built once; the other waited and reused it
    results = sorted(out.splitlines()[-1].split()[0] for out, _ in outs)
    assert results == ["built", "cached"]
