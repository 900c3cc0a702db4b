"""pipeline/device/emulator.py and emulation_setup.py: finding an emulation, its command line, and one real run of
ONNX Runtime's aarch64 wheel on an emulated Neoverse V1 (qemu-aarch64 ≥ 8.2, the build of `make setup-emulation`)."""
import json
import subprocess
import sys
from importlib.metadata import version as installed
from pathlib import Path

import pytest

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.device import emulator

from conftest import REPO

RUN_TIMEOUT_S = 180  # the run below took about 6 s here (imports under TCG); a slow CI runner gets room


def fake_build(base: Path, **manifest) -> Path:
    """A folder shaped like a finished aarch64 build (files empty: only their presence is read)."""
    want = emulator.wanted()
    d = base / emulator.build_name("10.0.2", want)
    (d / "root" / "usr" / "bin").mkdir(parents=True)
    (d / "root" / "usr" / "bin" / "python3.11").touch()
    (d / "qemu-aarch64").touch()
    (d / "manifest.json").write_text(json.dumps({"layout": emulator.LAYOUT, "arch": "aarch64", "qemu": "10.0.2",
                                                 "python": "3.11.2", "wheels": dict(want), **manifest}))
    return d


def test_aarch64_not_set_up_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(emulator.ENV_DIR, str(tmp_path))
    with pytest.raises(UserError) as e:
        emulator.find("aarch64")
    msg = str(e.value)
    assert "\n" not in msg and "make setup-emulation" in msg and str(tmp_path) in msg
    assert "onnxruntime " + emulator.wanted()["onnxruntime"] in msg


def test_only_a_finished_build_of_the_wanted_versions_is_used(tmp_path, monkeypatch):
    monkeypatch.setenv(emulator.ENV_DIR, str(tmp_path))
    d = fake_build(tmp_path, wheels={**emulator.wanted(), "onnxruntime": "0.0.1"})
    with pytest.raises(UserError, match="not set up"):
        emulator.find("aarch64")
    (d / "manifest.json").unlink()  # a build that did not finish
    with pytest.raises(UserError, match="not set up"):
        emulator.find("aarch64")
    d.rename(tmp_path / "unfinished")
    good = fake_build(tmp_path)
    em = emulator.find("aarch64")
    assert (em.qemu, em.root, em.site, em.python) == (good / "qemu-aarch64", good / "root", good / "site",
                                                      good / "root" / "usr" / "bin" / "python3.11")


SETUP = [sys.executable, "-m", "convnext_deploy.pipeline.device.emulation_setup"]


def test_setup_reports_a_finished_build_as_cached_in_one_line(tmp_path):
    d = fake_build(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), emulator.ENV_DIR: str(tmp_path)}
    done = subprocess.run(SETUP, env=env, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"aarch64 emulation ready: {d} (cached)\n", "")


def test_setup_failure_is_one_line_with_exit_2(tmp_path):
    """No apt-get on PATH (a machine that cannot build it): one line naming it and the fix, no traceback."""
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path), emulator.ENV_DIR: str(tmp_path / "emulation")}
    done = subprocess.run(SETUP, env=env, capture_output=True, text=True, timeout=60, cwd=REPO, check=False)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert done.stderr.startswith("setup-emulation: error: ") and "apt-get is not on this machine" in done.stderr
    assert not list((tmp_path / "emulation").glob("aarch64-*")) and not list((tmp_path / "emulation").glob(".build-*"))


def test_command_line_of_each_architecture():
    arm = emulator.Emulation("aarch64", Path("/e/qemu-aarch64"), Path("/e/root"), Path("/e/site"),
                             Path("/e/root/usr/bin/python3.11"), {})
    assert emulator.command(arm, "neoverse-v1", ["-c", "pass"], {"OMP_NUM_THREADS": "1", "PYTHONPATH": "/mine"}) == [
        "/e/qemu-aarch64", "-cpu", "neoverse-v1", "-L", "/e/root", "-E", "OMP_NUM_THREADS=1",
        "-E", "PYTHONPATH=/e/site:/mine", "-E", "PYTHONNOUSERSITE=1", "/e/root/usr/bin/python3.11", "-c", "pass"]
    x86 = emulator.Emulation("x86_64", Path("/usr/bin/qemu-x86_64-static"), Path("/"), None, Path(sys.executable), {})
    assert emulator.command(x86, "Haswell-v4", ["script.py"]) == [
        "/usr/bin/qemu-x86_64-static", "-cpu", "Haswell-v4", sys.executable, "script.py"]
    assert emulator.command(x86, "Haswell-v4", ["s.py"], {"A": "1"})[3:5] == ["-E", "A=1"]


def test_x86_64_is_the_systems_qemu_running_this_python(monkeypatch):
    import shutil

    qemu = shutil.which(emulator.X86_QEMU)
    if qemu is None:
        with pytest.raises(UserError, match="make setup"):
            emulator.find("x86_64")
        return
    em = emulator.find("x86_64")
    assert (em.qemu, em.root, em.site, em.python) == (Path(qemu), Path("/"), None, Path(sys.executable))
    with pytest.raises(UserError, match="no emulation of 'riscv64'"):
        emulator.find("riscv64")


def test_onnxruntime_runs_on_an_emulated_neoverse_v1_that_says_it_has_i8mm(tmp_path, monkeypatch):
    """The guest's /proc/cpuinfo is the emulated core's (i8mm: ONNX Runtime's MLAS picks its SMMLA/UMMLA kernels
    from HWCAP), and the guest imports the aarch64 ONNX Runtime of the host's version. The host's PYTHONPATH does
    not reach the guest (it names x86 packages); what `env` names does."""
    try:
        em = emulator.find("aarch64")
    except UserError as e:
        pytest.skip(f"aarch64 emulation is not set up here: {e}")
    monkeypatch.setenv("PYTHONPATH", str(REPO / "x86-only"))
    probe = ("import os, sys, platform, onnxruntime; print(platform.machine()); "
             "print([l for l in open('/proc/cpuinfo') if l.startswith('Features')][0].split(':', 1)[1].strip()); "
             "print(onnxruntime.__version__); print(os.environ['PROBE'], os.environ['PYTHONPATH'])")
    done = emulator.run(em, "neoverse-v1", ["-c", probe], timeout=RUN_TIMEOUT_S, env={"PROBE": "on"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    machine, features, ort_version, env_line = done.stdout.splitlines()[-4:]
    assert machine == "aarch64"
    assert {"asimddp", "i8mm", "bf16", "sve"} <= set(features.split()), features
    assert ort_version == installed("onnxruntime")
    assert env_line == f"on {em.site}"


def test_a_run_past_its_timeout_is_one_line(tmp_path):
    slow = tmp_path / "slow-qemu"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    em = emulator.Emulation("aarch64", slow, tmp_path, tmp_path, tmp_path / "python3.11", {})
    with pytest.raises(UserError) as e:
        emulator.run(em, "neoverse-n1", ["-c", "pass"], timeout=0.5)
    assert str(e.value) == "the emulated neoverse-n1 run took longer than 0.5 s: -c pass"
