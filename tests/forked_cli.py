"""The command line run as a child of a server that has imported the heavy modules once (multiprocessing's
forkserver). Each call is still a process of its own, with its own exit code, stdout, stderr, environment and
working directory, as `python -m convnext_deploy` would be; it skips the second or more a fresh interpreter spends
importing torch, ONNX and ONNX Runtime, which the suite's few dozen commands paid each time. The server is started
from a process that has imported but never run them, so no thread pool is forked in use. `tests/test_reference.py`
and `tests/test_packaging.py` still run the real entry points."""
from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PRELOAD = ["torch", "torch.onnx", "numpy", "onnx", "onnxruntime", "onnxruntime.quantization", "matplotlib.pyplot",
           "convnext_deploy.pipeline.cli", "convnext_deploy.pipeline.deploy", "convnext_deploy.targets.ort_cpu",
           "convnext_deploy.pipeline.models.onnx_export"]

_context = None


def _forkserver():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload([__name__, *PRELOAD])
    return _context


def _child(args: list[str], env: dict, cwd: str, out: str, err: str) -> None:
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(f, fd)
        os.close(f)
    sys.stdout = open(1, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", encoding="utf-8", buffering=1, closefd=False)  # noqa: SIM115
    from convnext_deploy.pipeline.cli import main

    code = main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def run(args: list[str], env: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`convnext-deploy ARGS` in a forked child: what subprocess.run(..., capture_output=True, text=True) returns.
    On macOS (where a child forked from a process that loaded system frameworks may crash) a fresh interpreter."""
    if sys.platform == "darwin" or "forkserver" not in multiprocessing.get_all_start_methods():
        return subprocess.run([sys.executable, "-m", "convnext_deploy", *map(str, args)], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout, check=False)
    command = ["convnext-deploy", *map(str, args)]
    with tempfile.TemporaryDirectory(prefix="cli-") as d:
        out, err = Path(d) / "stdout", Path(d) / "stderr"
        p = _forkserver().Process(target=_child, args=(command[1:], dict(env), str(cwd), str(out), str(err)))
        p.start()
        p.join(timeout)
        if p.exitcode is None:
            p.kill()
            p.join()
            raise subprocess.TimeoutExpired(command, timeout)
        return subprocess.CompletedProcess(command, p.exitcode, out.read_text(encoding="utf-8"),
                                           err.read_text(encoding="utf-8"))
