"""The deploy's estimate of its memory and time (pipeline/measure/footprint.py, pipeline/stages/plan.py), against
what deploys measured: the session's atto deploy here, and the committed `make bench-scale` rows (T…XL) re-estimated
from the inputs each recorded with the coefficients as they are now."""
import json
import re
from pathlib import Path

import pytest

from conftest import run_cli
from convnext_deploy.pipeline.measure import footprint
from convnext_deploy.reports import scale_table

REPO = Path(__file__).resolve().parents[1]
PEAK_UNDER = 1.25  # a stage's measured peak may exceed its estimate by at most this factor (the estimate is an upper fit)
PEAK_OVER = 3.0  # nor be under a third of it: an estimate that is always far above is no estimate
TIME_FACTOR = 3.0  # the whole deploy's seconds within 3× either way (timing budgets are upper bounds)
HEAVY = ("export", "build", "decide", "validate")


def _check(plan_stages: dict, measured: dict, seconds: tuple[float, float], what: str) -> None:
    for stage in HEAVY:
        est, got = plan_stages[stage]["peak_mib"], measured[stage]
        assert got <= est * PEAK_UNDER, f"{what} {stage}: measured {got:.0f} MiB over the estimate {est:.0f} MiB"
        assert est <= got * PEAK_OVER, f"{what} {stage}: estimate {est:.0f} MiB, far above the measured {got:.0f} MiB"
    est_s, got_s = seconds
    assert got_s / TIME_FACTOR <= est_s <= got_s * TIME_FACTOR, f"{what}: estimated {est_s:.0f} s, took {got_s:.0f} s"


def test_the_plan_of_the_atto_deploy_holds_its_measured_stages(deployed):
    out, p, _ = deployed
    report = json.loads((out / "report.json").read_text())
    plan = report["plan"]
    assert "plan: peak memory ~" in p.stdout and plan["work"]["weight_bytes"] > 0
    assert plan["work"]["int8_runner_w"] == 0.25  # the target's own figure, recorded with the plan
    for stage in HEAVY:  # each heavy stage starts by saying its estimate and when the deploy should end
        line = next(x for x in p.stdout.splitlines() if x.startswith(f"stage {stage}: started"))
        said = float(re.search(r"~(\d+) s estimated", line).group(1))
        assert abs(said - plan["stages"][stage]["seconds"]) <= 0.55 and "until about" in line  # the record rounds to 0.1
    measured = {r["stage"]: r["tree_peak_rss_mib"] for r in report["memory"]["stages"]}
    _check(plan["stages"], measured, (plan["seconds"], report["memory"]["seconds"]), "atto")
    assert {s: plan["stages"][s].get("measured_peak_mib") for s in HEAVY} == {s: measured[s] for s in HEAVY}


TARGET_FIGURES = ("fp32_runner_w", "int8_runner_w")  # the runtime's, not the deploy's: today's where not recorded


def _scale_rows():
    return [(path, result["target"], row) for path, result in scale_table.load(REPO) for row in result["rows"]
            if "stages" in row]


@pytest.mark.parametrize("path, target, row", _scale_rows(), ids=lambda v: v if isinstance(v, str) else v["variant"])
def test_the_plan_re_estimated_holds_each_committed_variant_row(path, target, row):
    """T…XL as measured (committed rows): today's coefficients on the inputs each deploy recorded."""
    from convnext_deploy.targets import get_target

    figures = {k: getattr(get_target(target), k) for k in TARGET_FIGURES}
    work = footprint.Work(**{**figures, **row["plan"]["work"], "dims": tuple(row["plan"]["work"]["dims"])})
    plan = footprint.estimate(work, 1 << 40).to_dict()
    measured = {s["stage"]: s["peak_mib"] for s in row["stages"]}
    _check(plan["stages"], measured, (plan["seconds"], row["seconds"]), f"{path} {row['variant']}")


def test_the_committed_rows_cover_t_and_a_large_variant():
    variants = {row["variant"] for _, _, row in _scale_rows()}
    assert "t" in variants and variants & {"s", "b", "l", "xl"}, "run `make bench-scale` and commit its result"


def test_a_deploy_over_the_memory_here_stops_in_one_line_before_writing(atto_reference, cli_env, tmp_path):
    out = tmp_path / "never"
    p = run_cli(["deploy", "--target", "onnxruntime", "--variant", "atto", "--out", str(out)],
                {**cli_env, "CONVNEXT_DEPLOY_AVAILABLE_MIB": "64"}, code=2)
    line = p.stderr.strip().splitlines()[-1]
    assert "needs ~" in line and "more than the 0.1 GiB available here" in line and "Traceback" not in p.stderr
    assert not out.exists()


def test_the_options_that_fit_are_the_fewest_changes():
    w = footprint.Work(weight_bytes=1 << 30, dims=(192, 384, 768, 1536), calib_size=224, deploy_size=224, n_calib=100,
                       n_eval=200, n_control=20, max_batch=8, candidates=8, timed_at_once=9, smoothing=True, loads=3,
                       timing_budget_s=60, precisions=2, base_rss=1 << 30, forward_s=0.5)
    full = footprint.estimate(w, 1 << 40)
    lean = footprint.estimate(footprint.Work(**{**full.work, "candidates": 1, "timed_at_once": 2}), 1 << 40)
    between = (full.stages["decide"]["peak_bytes"] + lean.stages["decide"]["peak_bytes"]) // 2
    if max(lean.peak_bytes, lean.stages["decide"]["peak_bytes"]) <= between:
        assert footprint.fitting_options(w, between) == ["--no-alternatives"]
    assert footprint.fitting_options(w, 1 << 20) == []  # nothing fits a mebibyte
    assert not footprint.estimate(w, 1 << 20).fits() and full.fits()


def test_an_int8_runner_that_holds_float_weights_is_counted_so():
    """TensorRT without a GPU validates its Q/DQ graph in float on ONNX Runtime: its INT8 runner holds the FP32
    weights (ConvNeXt-B's validation: 3.5 GiB, 0.9 GiB over an estimate that counted a quarter). The plan takes
    the target's figure; a row recorded before the field re-estimates with the target's figure of today."""
    from convnext_deploy.targets import get_target

    w = footprint.Work(weight_bytes=1 << 30, dims=(192, 384, 768, 1536), calib_size=224, deploy_size=224, n_calib=100,
                       n_eval=200, n_control=20, max_batch=8, candidates=1, timed_at_once=2, smoothing=True, loads=3,
                       timing_budget_s=60, precisions=2, base_rss=1 << 30, forward_s=0.5)
    quarter, whole = (footprint.estimate(footprint.Work(**{**footprint.estimate(w, 1).work, "int8_runner_w": f}), 1)
                      for f in (0.25, 1.0))
    session = w.fp32_runner_w * w.weight_bytes
    grew = whole.stages["validate"]["peak_bytes"] - quarter.stages["validate"]["peak_bytes"]
    assert grew == pytest.approx(2 * 0.75 * session) and w.int8_runner_w == 0.25
    assert get_target("tensorrt").int8_runner_w == 1.0 and get_target("onnxruntime").int8_runner_w == 0.25


def test_a_runtime_whose_fp32_runner_holds_more_is_planned_so():
    """OpenVINO's compiled FP32 model keeps the IR's mapped weights beside its packed copies (ConvNeXt-B: 2.7 W,
    ONNX Runtime 1.7): its decide and validate, which hold FP32 runners, are planned larger, its export is not."""
    from dataclasses import replace

    from convnext_deploy.targets import get_target

    w = footprint.Work(weight_bytes=1 << 30, dims=(128, 256, 512, 1024), calib_size=224, deploy_size=224, n_calib=100,
                       n_eval=200, n_control=20, max_batch=8, candidates=3, timed_at_once=4, smoothing=True, loads=3,
                       timing_budget_s=60, precisions=2, base_rss=1 << 30, forward_s=0.5)
    ort, ov = (footprint.estimate(replace(w, fp32_runner_w=get_target(t).fp32_runner_w), 1).stages
               for t in ("onnxruntime", "openvino"))
    extra = (get_target("openvino").fp32_runner_w - 2.0) * w.weight_bytes
    # decide: two FP32 runners (the reference and a timed instance of it) and three INT8 ones (a quarter of one each)
    assert ov["decide"]["peak_bytes"] - ort["decide"]["peak_bytes"] == pytest.approx(extra * (2 + 3 * 0.25))
    assert ov["validate"]["peak_bytes"] - ort["validate"]["peak_bytes"] == pytest.approx(extra * 1.5)
    assert ov["export"]["peak_bytes"] == ort["export"]["peak_bytes"]
