"""The built wheel installs one name, convnext_deploy, beside the package index's own `pipeline` and `reports`.

The wheel is built from a copy of the checkout and installed into a fresh venv that already holds those two
index packages; torch and the other dependencies come from this test run's environment through a path line
(added after the venv's own site-packages, so the venv's packages win), which keeps the test to seconds.
"""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

ROOMS = ("convnext_deploy", "pipeline", "targets", "calibration", "reports")
INDEX_PACKAGES = ("pipeline==0.1", "reports==0.4.1")  # real, unrelated packages on PyPI with our rooms' names


def _pip(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for room in ROOMS:
        shutil.copytree(REPO / room, src / room, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("dist")
    p = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src))
    assert p.returncode == 0, p.stderr
    (whl,) = out.glob("convnext_deploy-*.whl")
    return whl


def test_the_wheel_holds_one_top_level_name(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"convnext_deploy"}
    for must in ("convnext_deploy/pipeline/cli.py", "convnext_deploy/pipeline/ship/bundle_files/predict.py",
                 "convnext_deploy/calibration/imagenet1k_classes.tsv", "convnext_deploy/targets/base.py"):
        assert must in names, must


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    index = _pip("--python", str(python), "install", "--no-deps", *INDEX_PACKAGES)
    if index.returncode != 0:
        pytest.skip(f"the package index is unreachable, so its `pipeline` and `reports` cannot be installed: "
                    f"{index.stderr.strip().splitlines()[-1] if index.stderr.strip() else index.returncode}")
    p = _pip("--python", str(python), "install", "--no-deps", str(wheel))
    assert p.returncode == 0, p.stderr
    site = next((env / "lib").glob("python3*/site-packages"))
    ours = next(Path(p) for p in sys.path if p.endswith("site-packages") and (Path(p) / "torch").is_dir())
    (site / "zz_dependencies.pth").write_text(f"{ours}\n")  # torch, numpy, onnxruntime… after the venv's own
    return env


def _run(venv: Path, args: list[str], cwd: Path):
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(cwd)})


def test_the_command_works_beside_the_index_packages(venv, tmp_path):
    p = _run(venv, [str(venv / "bin" / "convnext-deploy"), "variants"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "ConvNeXt-T" in p.stdout and "atto" in p.stdout
    p = _run(venv, [str(venv / "bin" / "python"), "-m", "convnext_deploy", "variants"], tmp_path)
    assert p.returncode == 0 and "ConvNeXt-T" in p.stdout, p.stderr


def test_a_users_import_pipeline_gets_the_index_package(venv, tmp_path):
    # index `reports` 0.4.1 imports pkg_resources, which current setuptools no longer has: locate it, don't run it
    code = ("import importlib.util, pipeline, convnext_deploy.pipeline.cli as cli, convnext_deploy.reports as ours; "
            "print(pipeline.__file__); print(importlib.util.find_spec('reports').origin); "
            "print(cli.__file__); print(ours.__file__)")
    p = _run(venv, [str(venv / "bin" / "python"), "-c", code], tmp_path)
    assert p.returncode == 0, p.stderr
    index_pipeline, index_reports, cli, ours = (Path(x) for x in p.stdout.split())
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert index_pipeline.parent == site / "pipeline" and index_reports.parent == site / "reports"
    assert cli == site / "convnext_deploy" / "pipeline" / "cli.py" and ours.parent == site / "convnext_deploy" / "reports"


def test_a_repository_with_its_own_pipeline_folder_keeps_it(venv, tmp_path):
    """Run from an ML repository that has a `pipeline/` of its own: both that folder and this tool work."""
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "pipeline" / "__init__.py").write_text("MINE = True\n")
    p = _run(venv, [str(venv / "bin" / "python"), "-c",
                    "import pipeline, convnext_deploy.pipeline.models.variants as v; "
                    "assert pipeline.MINE; print(sorted(v.VARIANTS))"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "'t'" in p.stdout
    p = _run(venv, [str(venv / "bin" / "python"), "-m", "convnext_deploy", "variants"], tmp_path)
    assert p.returncode == 0 and "ConvNeXt-T" in p.stdout, p.stderr
