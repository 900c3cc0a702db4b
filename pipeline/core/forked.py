"""One memory-heavy step (an export, an artifact's build) in a forked child process that writes its files and exits.

Why a child: a build holds the model several times over (the graph, the calibration session, the quantized copy)
and the allocator keeps much of what it frees, so builds run one after another in one process grow it by the
model's size each time (ConvNeXt-B's eight INT8 candidates took the deploy to 7.7 GiB, 22 × the FP32 weights).
A child gives all of it back to the kernel when it exits: the deploy holds at most one build at a time, and its
peak is one build's. The child is forked, so it starts with everything the deploy has loaded (no re-import, no
pickling of the model), and its pages stay shared with the parent until written.

Memory: the child's own high-water mark includes the pages it shares with the parent, which cost nothing more.
What it adds is its peak less the resident size it started with; `pipeline.measure.memory` counts the process
tree as the parent's resident size at the fork plus that.
"""
from __future__ import annotations

import os
import pickle
import signal
import sys
import traceback
from typing import Callable, TypeVar

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.measure.memory import (forked_child_ran, peak_rss_bytes, release_free_heap, reset_peak,
                                                     rss_bytes)

OK, FAILED = 0, 1
T = TypeVar("T")


def in_child(fn: Callable[..., T], *args, what: str) -> T:
    """`fn(*args)` run in a forked child, waited for: its return value (pickled back: keep it small) or its
    exception, raised here; a child the kernel killed (out of memory) becomes one line naming `what`. Where fork is
    not offered (Windows), it runs here."""
    if not hasattr(os, "fork"):
        return fn(*args)
    sys.stdout.flush()
    sys.stderr.flush()
    release_free_heap()  # fewer pages for the child to share
    parent_rss = rss_bytes() or 0
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the parent's code
        os.close(read)
        _run_child(fn, args, write)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = ("killed by the kernel, most likely out of memory: see the deploy's memory estimate and its options "
               "that fit" if sig == signal.SIGKILL else f"killed by signal {signal.Signals(sig).name}")
        raise UserError(f"{what}: {why}")
    result = pickle.loads(payload) if payload else {"error": RuntimeError(f"{what}: the child process exited "
                                                                          f"with status {os.WEXITSTATUS(status)}")}
    forked_child_ran(parent_rss, result.get("added_bytes", 0))
    if result.get("error") is not None:
        raise result["error"]
    return result.get("value")


def _one_openmp_thread() -> None:
    """GNU OpenMP's thread team does not survive a fork: the child's first parallel region waits forever on a
    barrier of threads it does not have. With one thread torch never opens a region (its own runtimes' pools, ONNX
    Runtime's and OpenVINO's, start afresh in the child), and an export or a build's torch part is serial anyway."""
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def _run_child(fn, args, write: int) -> None:
    code, result, start = OK, {}, rss_bytes() or 0
    try:
        _one_openmp_thread()
        reset_peak()
        result["value"] = fn(*args)
        result["added_bytes"] = max(0, peak_rss_bytes() - start)
    except BaseException as e:  # noqa: BLE001 - every failure goes to the parent, which raises it
        code = FAILED
        result["error"] = e
        result["added_bytes"] = max(0, peak_rss_bytes() - start)
    try:
        data = pickle.dumps(result)
    except Exception:  # an exception that does not pickle: its text, with the child's traceback
        data = pickle.dumps({"error": RuntimeError("".join(traceback.format_exception(result["error"]))),
                             "added_bytes": result.get("added_bytes", 0)})
    try:
        with os.fdopen(write, "wb") as pipe:
            pipe.write(data)
    finally:
        os._exit(code)  # no atexit, no buffers flushed twice, no cleanup of the parent's objects
