"""The bounded bench's deadline on this CPU (issue 37): calibrated on a CPU whose committed result holds every figure
it uses, scaled by a probe of this CPU's speed, and never silent about which CPU it is calibrated on."""
import json

import pytest

from convnext_deploy.pipeline.measure import bench_deadline
from convnext_deploy.pipeline.measure.bench_deadline import REFERENCE, deadline
from convnext_deploy.pipeline.measure.bench_rows import BOUNDED

from conftest import REPO

ZEN3 = "benchmarks/amd-epyc-zen3-2026-12-07/bench.json"  # printed "~6.5 min", took 15.0 on the unscaled deadline


def result(path: str) -> dict:
    return json.loads((REPO / path).read_text())


def probing(monkeypatch, ms: dict) -> list:
    """The probe answers `ms[target]` instead of timing; returns the targets it was asked to probe."""
    asked = []

    def fake(target, threads):
        asked.append(target.name)
        return {"gemm": f"a 2048×2048×2048 FP32 GEMM, {threads} threads", "target": target.name,
                "runtime": f"{target.name} x.y", "threads": threads, "ms": ms[target.name]}

    monkeypatch.setattr(bench_deadline, "gemm_probe", fake)
    return asked


def test_the_reference_is_a_committed_result_with_the_default_deadline():
    ref = result(REFERENCE["result"])
    assert (ref["machine"]["cpu"], ref["machine"]["cpu_family"], ref["machine"]["cpu_model"]) == ("AMD EPYC", 26, 2)
    assert ref["machine"]["generation"] in REFERENCE["cpu"] and "family 26, model 2" in REFERENCE["cpu"]
    assert ref["mode"] == "default" and ref["settings"]["minutes"] == REFERENCE["minutes"] == BOUNDED["minutes"]
    assert ref["minutes"] == REFERENCE["took_minutes"]
    assert (ref["settings"]["threads"], ref["settings"]["image_size"]) == (REFERENCE["threads"],
                                                                           REFERENCE["image_size"])
    for row in ref["rows"]:  # the probe's graph, timed there as the runtime's FP32 peak
        assert row["peak"]["fp32"]["ms"] == REFERENCE["ms"][row["target"]]
        assert row["peak"]["gemm"].startswith(f"a {bench_deadline.N}×{bench_deadline.N}×{bench_deadline.N} GEMM")


def test_a_slower_cpu_gets_the_deadline_scaled_and_an_estimate_that_holds(monkeypatch):
    """Fed the Zen 3's own figure for the probe's graph, the estimate covers the 15.0 minutes that CPU took (with
    the unscaled deadline, which printed 6.5); the plan line names the CPU it is calibrated on and both times."""
    zen3 = result(ZEN3)
    ms = {r["target"]: r["peak"]["fp32"]["ms"] for r in zen3["rows"]}
    asked = probing(monkeypatch, ms)
    bound = deadline(BOUNDED["minutes"], [], ["onnxruntime", "openvino"], 2, 224)
    assert asked == ["onnxruntime"] and bound["probe"]["ms"] == ms["onnxruntime"] == 101.61
    assert bound["scale"] == 2.6 and bound["minutes"] == 16.9 and bound["expected_minutes"] == 23.7
    assert bound["minutes"] > BOUNDED["minutes"] and bound["expected_minutes"] >= zen3["minutes"] == 15.0
    for s in ("× 2.60", REFERENCE["cpu"], REFERENCE["result"], "101.6 ms here", "39.1 ms there",
              "took 9.1 minutes there", "expect about 23.7 here"):
        assert s in bound["note"], (s, bound["note"])


def test_the_reference_cpu_keeps_the_default_and_another_plan_has_no_expected_length(monkeypatch):
    probing(monkeypatch, dict(REFERENCE["ms"]))
    same = deadline(BOUNDED["minutes"], [], ["openvino"], 2, 224)
    assert (same["minutes"], same["scale"], same["expected_minutes"]) == (BOUNDED["minutes"], 1.0, 9.1)
    assert same["probe"]["target"] == "openvino"
    other = deadline(BOUNDED["minutes"], ["variants"], ["onnxruntime"], 2, 224)
    assert other["minutes"] == BOUNDED["minutes"] and other["expected_minutes"] is None
    assert "expect" not in other["note"]
    assert deadline(BOUNDED["minutes"], [], ["onnxruntime"], 4, 224)["expected_minutes"] is None


@pytest.mark.parametrize("minutes,given,targets,says", [
    (10.0, ["minutes"], ["onnxruntime"], "--minutes 10 given, not scaled"),  # the user's deadline is theirs
    (6.5, [], ["tensorrt", "coreml"], "no runtime to probe this CPU, not scaled"),  # proxies only: nothing to time
    (0.0, [], ["onnxruntime"], "not calibrated on any CPU"),  # --full: no deadline
])
def test_a_deadline_that_is_not_scaled_says_why_and_where_it_is_calibrated(monkeypatch, minutes, given, targets, says):
    probing(monkeypatch, {"onnxruntime": 2 * REFERENCE["ms"]["onnxruntime"]})
    bound = deadline(minutes, given, targets, 2, 224)
    assert bound["minutes"] == minutes and bound["expected_minutes"] is None and says in bound["note"]
    assert minutes == 0 or REFERENCE["cpu"] in bound["note"]


def test_the_probe_times_the_peaks_gemm_through_the_runtime_in_about_a_second():
    import time

    from convnext_deploy.targets import get_target

    t0 = time.monotonic()
    probe = bench_deadline.gemm_probe(get_target("onnxruntime"), 2)
    assert probe["ms"] > 0 and probe["runtime"].startswith("onnxruntime") and probe["threads"] == 2
    assert probe["gemm"] == "a 2048×2048×2048 FP32 GEMM, 2 threads"
    assert time.monotonic() - t0 < 10  # ~1 s idle; a shared 2-core machine under load takes a few
