"""Peak memory per stage: the kernel's high-water mark, reset at each stage's start."""
import numpy as np

from convnext_deploy.pipeline.measure.memory import peak_rss_bytes, stage_peak


def test_each_stage_reports_its_own_peak():
    rows: list[dict] = []
    with stage_peak("big", rows):
        block = np.ones(300 << 20, np.uint8)  # 300 MiB, touched
        del block
    with stage_peak("small", rows):
        np.ones(1 << 20, np.uint8)
    big, small = rows
    assert big["stage"] == "big" and small["stage"] == "small"
    assert big["peak_rss_mib"] >= big["start_rss_mib"] + 290
    if "exact" in small["method"]:  # Linux: the peak was reset, so the small stage does not inherit the big one's
        assert small["peak_rss_mib"] < big["peak_rss_mib"] - 250
    assert peak_rss_bytes() > 0


def test_a_child_process_counts_in_the_stage_it_ran_in():
    import subprocess
    import sys

    from convnext_deploy.pipeline.measure.memory import MIB, children_peak_bytes

    mib = children_peak_bytes() // MIB + 300  # more than any child this session waited for before
    rows: list[dict] = []
    with stage_peak("child", rows):
        subprocess.run([sys.executable, "-c", f"import numpy; b = numpy.ones({mib} << 20, numpy.uint8); b.sum()"],
                       check=True)
    with stage_peak("none", rows):
        pass
    child, none = rows
    assert child["children_peak_rss_mib"] >= mib
    assert child["tree_peak_rss_mib"] == round(child["peak_rss_mib"] + child["children_peak_rss_mib"], 1)
    assert none["children_peak_rss_mib"] is None and none["tree_peak_rss_mib"] == none["peak_rss_mib"]
