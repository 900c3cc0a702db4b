"""Faults of the machine are not gate failures: a full disk or a read-only directory is one line and exit 2,
a bug is a traceback and exit 4, and exit 1 stays "a gate missed"."""
import errno
import os
import shutil
import subprocess
from contextlib import contextmanager

import pytest

from convnext_deploy.pipeline import cli
from convnext_deploy.pipeline.models import zoo_commands
from convnext_deploy.pipeline.core.cache import cached_dir
from convnext_deploy.pipeline.core.errors import MachineError

from conftest import PINNED_RECIPE, REPO, run_cli, session_export


def _error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("convnext-deploy: error:")]


@contextmanager
def tmpfs(where, size="3m"):
    """A small tmpfs at `where` (we run as root); skipped where mounting is not permitted."""
    where.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill (needs root or CAP_SYS_ADMIN): {p.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_oserror_from_a_command_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    target = tmp_path / "cache" / "model.onnx"

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(zoo_commands, "variants", full)
    assert cli.main(["variants"]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and str(target) in lines[0] and "space" in lines[0], err
    assert "free there" in lines[0]
    assert "Traceback" not in err


def test_a_bug_is_a_traceback_and_exit_4(monkeypatch, capsys):
    def bug(args):
        raise RuntimeError("unexpected state")

    monkeypatch.setattr(zoo_commands, "variants", bug)
    assert cli.main(["variants"]) == 4
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: unexpected state" in err
    assert err.splitlines()[-1] == ("convnext-deploy: internal error (a bug, not your input): RuntimeError: "
                                    "unexpected state; please report it with the traceback above")
    assert not _error_lines(err)


def test_full_disk_in_a_stage_build_is_a_machine_error(tmp_path, monkeypatch):
    """The mechanism: ENOSPC, and an errno-less error on a full disk (OpenVINO's iostream error), both name the path."""
    with tmpfs(tmp_path / "small") as small:
        monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", str(small / "cache"))

        def five_mb(tmp):
            (tmp / "model.bin").write_bytes(b"\0" * (5 << 20))

        with pytest.raises(MachineError, match=r"out of space at .*small/cache/stage/k.*free there") as e:
            cached_dir("stage", "k", five_mb)
        assert isinstance(e.value.__cause__, OSError) and e.value.__cause__.errno == errno.ENOSPC

        def like_openvino(tmp):
            try:
                five_mb(tmp)
            except OSError:
                raise RuntimeError("basic_ios::clear: iostream error\nmore detail") from None

        with pytest.raises(MachineError, match=r"small/cache/stage/k2.*\(RuntimeError: basic_ios::clear: "
                                               r"iostream error\)$"):
            cached_dir("stage", "k2", like_openvino)
        assert [p.name for p in (small / "cache" / "stage").iterdir() if not p.name.endswith(".lock")] == []


def test_read_only_cache_is_exit_2(tmp_path, monkeypatch, capsys):
    # chmod means nothing to root, so a read-only mount it is
    with tmpfs(tmp_path / "ro") as ro:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", str(ro / "cache"))

        def stage(args):
            cached_dir("export", "k", lambda tmp: (tmp / "model.onnx").write_bytes(b"x"))
            return 0

        monkeypatch.setattr(zoo_commands, "variants", stage)
        assert cli.main(["variants"]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and "read-only file system" in lines[0] and str(ro / "cache") in lines[0], err
    assert "Traceback" not in err


@pytest.mark.parametrize("room, runs_out_in", [("export", "export"), ("openvino", "artifacts/openvino")])
def test_deploy_on_a_full_disk_is_exit_2_not_a_gate(atto_reference, cli_env, tmp_path, room, runs_out_in):
    """3 MiB: the ONNX export runs out (ENOSPC). Room for the export (about the checkpoint's size; --no-smoothing: one
    export, not two) but not the IR: ov.save_model runs out and says only "basic_ios::clear: iostream error". There
    the session's export of OpenVINO's graph form is put in the small cache first, as the deploy would have made it."""
    size = 3 << 20 if room == "export" else atto_reference.stat().st_size + (4 << 20)
    gates = tmp_path / "gates.toml"
    gates.write_text("[defaults]\nmax_top1_drop_pp = 5\n")
    out = tmp_path / "report"
    with tmpfs(tmp_path / "small", size=str(size)) as small:
        if room == "openvino":
            export = session_export(atto_reference, cli_env, "channels_first").parent
            shutil.copytree(export, small / export.relative_to(cli_env["CONVNEXT_DEPLOY_CACHE_DIR"]))
        env = {**os.environ, "CONVNEXT_DEPLOY_CACHE_DIR": str(small), "PYTHONPATH": str(REPO)}
        p = run_cli(["deploy", "--target", "openvino", "--variant", "atto", "--calib", "50", "--eval", "200", "--runs",
                     "3", *PINNED_RECIPE, "--no-smoothing", "--gates", str(gates), "--out", str(out)], env, timeout=600)
    assert p.returncode == 2, p.stdout + p.stderr
    lines = _error_lines(p.stderr)
    assert len(lines) == 1 and str(small / runs_out_in) in lines[0], p.stderr
    assert "out of space" in lines[0]
    assert "Traceback" not in p.stderr
    assert not out.exists()
    if room == "openvino":  # the IR ran out, not a second export
        assert "export (channels_first)" in p.stdout and "(cached)" in p.stdout, p.stdout
