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
