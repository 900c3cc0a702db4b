"""A larger variant end to end (`make test-all`): ConvNeXt-S exported, quantized, built and timed at 224 px on this
CPU, within bounded memory. Latency and memory only: there is no S reference checkpoint (weights as initialised;
their values do not change the cost)."""
import numpy as np
import pytest

from convnext_deploy.pipeline.measure.bench_rows import bench_checkpoint
from convnext_deploy.pipeline.measure.latency import measure, ratio
from convnext_deploy.pipeline.measure.memory import stage_peak
from convnext_deploy.pipeline.stages.build import build
from convnext_deploy.pipeline.stages.context import DeployConfig
from convnext_deploy.pipeline.stages.export import export
from convnext_deploy.pipeline.stages.prepare import prepare

PEAK_RSS_LIMIT_MIB = 6 * 1024  # issue 15: a T deploy with its fallback ran under 6 GiB; S has 2× T's blocks


@pytest.mark.slow
def test_convnext_s_builds_and_runs_at_224_px_in_bounded_memory(cli_env, monkeypatch, capsys):
    monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", cli_env["CONVNEXT_DEPLOY_CACHE_DIR"])
    ck, weights, _ = bench_checkpoint("s")
    cfg = DeployConfig(target="onnxruntime", variant="s", n_calib=64, n_eval=200, image_size=224, alternatives=False,
                       fallback=False)
    memory: list[dict] = []
    with stage_peak("convnext-s", memory):
        ctx = prepare(cfg, lambda m: None, checkpoint=ck, decisions=False)
        built = build(ctx, export(ctx))
        lat = measure(built.runners, batch=1, input_size=224, runs=20, warmup=2, rounds=5)
    x = np.random.default_rng(0).standard_normal((2, 3, 224, 224)).astype(np.float32)
    outs = {p: r.run(x) for p, r in built.runners.items()}
    speedup = ratio(lat["fp32"], lat["int8"])
    with capsys.disabled():
        print(f"\nConvNeXt-S ({weights}) at 224 px, batch 1, 2 threads: FP32 p50 {lat['fp32'].p50_ms:.1f} ms, INT8 "
              f"{lat['int8'].p50_ms:.1f} ms ({speedup.text()}); peak RSS {memory[0]['peak_rss_mib']:.0f} MiB")
    assert set(built.runners) == {"fp32", "int8"} and ck.variant.name == "s"
    assert all(o.shape == (2, 10) and np.isfinite(o).all() for o in outs.values())
    assert all(v.p50_ms > 0 and v.rounds == 5 for v in lat.values())
    assert memory[0]["peak_rss_mib"] < PEAK_RSS_LIMIT_MIB


@pytest.mark.slow
def test_convnext_b_from_an_official_checkpoint_deploys_within_its_memory_bound(cli_env, tmp_path):
    """Issue 38: ConvNeXt-B as a team deploys it (official .pth layout, 1,000 classes, ImageNet-style folders,
    --calib 100 --eval 200, defaults otherwise) reaches a report with exit 0 or 1, every stage's process-tree peak
    within 3 GiB + 4 × the FP32 weight bytes, its figures at 224 px."""
    import json

    from conftest import run_cli
    from convnext_deploy.calibration.user_tree import write_tree
    from convnext_deploy.pipeline.bench_scale import _checkpoint, goal_bytes
    from convnext_deploy.pipeline.models.variants import get_variant

    evals, calib = write_tree(tmp_path / "data", 1200, 200)
    ck = _checkpoint("b", tmp_path)
    out = tmp_path / "run"
    p = run_cli(["deploy", "--target", "onnxruntime", "--variant", "b", "--checkpoint", str(ck), "--calib", "100",
                 "--eval", "200", "--calib-data", str(calib), "--eval-data", str(evals), "--out", str(out)],
                {**cli_env, "CONVNEXT_DEPLOY_TIMING_BUDGET_S": "60", "CONVNEXT_DEPLOY_LOADS": "3"}, code=None, timeout=3000)
    assert p.returncode in (0, 1), p.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    goal_mib = goal_bytes(4 * get_variant("b").params_1k) / (1 << 20)
    peaks = {r["stage"]: r["tree_peak_rss_mib"] for r in report["memory"]["stages"]}
    assert max(peaks.values()) <= goal_mib, peaks
    assert report["recipe_screen"]["candidates"] and report["model"]["variant"] == "b"
    assert {r["input_size"] for r in report["latency"] if r["role"] == "deployment"} == {224}
