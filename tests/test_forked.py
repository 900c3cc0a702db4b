"""A heavy step in a forked child: its files, its errors and its memory come back to the deploy."""
import os
import signal

import numpy as np
import pytest

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.pipeline.core.forked import in_child
from convnext_deploy.pipeline.measure.memory import MIB, stage_peak


def _write(path, text):
    path.write_text(text)


def _allocate_and_write(path, mib):
    block = np.ones(mib << 20, np.uint8)  # touched: resident in the child only
    path.write_text(str(int(block.sum()) >> 20))


def test_the_child_writes_and_its_memory_is_counted_in_the_tree_not_kept(tmp_path):
    rows: list[dict] = []
    with stage_peak("build", rows):
        in_child(_allocate_and_write, tmp_path / "out.txt", 300, what="test build")
    row = rows[0]
    assert (tmp_path / "out.txt").read_text() == "300"
    assert row["forked_peak_rss_mib"] >= row["start_rss_mib"] + 290  # the parent's pages at the fork + the child's
    assert row["tree_peak_rss_mib"] >= row["forked_peak_rss_mib"]
    if "exact" in row["method"]:  # the parent itself never held the child's 300 MiB
        assert row["peak_rss_mib"] < row["start_rss_mib"] + 100


def test_the_childs_error_is_raised_here_as_itself(tmp_path):
    def fails(_):
        raise UserError("bad input: fix it")

    with pytest.raises(UserError, match="bad input: fix it"):
        in_child(fails, tmp_path, what="test build")

    def bug(_):
        raise KeyError("missing")

    with pytest.raises(KeyError):
        in_child(bug, tmp_path, what="test build")


def test_a_child_the_kernel_kills_is_one_line_naming_the_step(tmp_path):
    def killed(_):
        os.kill(os.getpid(), signal.SIGKILL)  # what the OOM killer does

    with pytest.raises(UserError, match="ConvNeXt-XL INT8 build: killed by the kernel, most likely out of memory"):
        in_child(killed, tmp_path, what="ConvNeXt-XL INT8 build")
    in_child(_write, tmp_path / "after.txt", "ok", what="next")  # the parent goes on
    assert (tmp_path / "after.txt").read_text() == "ok"
    assert MIB == 1 << 20
