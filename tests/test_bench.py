"""`make bench`: its rows and ratios, on a real one-target run (slow) and on the printing of a row."""
import pytest

from convnext_deploy.pipeline import bench


def test_a_row_prints_every_timing_and_ratio(capsys):
    row = {"target": "onnxruntime", "variant": "atto", "weights": "w", "input_size": 224, "threads": 2, "batch": 1,
           "device": "cpu, 2 threads", "runtime": "onnxruntime 1.32.0", "kind": "real",
           "p50_ms": {"fp32": 10.0, "int8 plain": 8.0, "int8 ours": 5.0, "int8 quantize_static defaults": None},
           "executed": {}, "peak_rss_mib": 612.0,
           "ratios": {"int8 ours vs fp32": {"value": 2.0, "ci95": [1.9, 2.1], "rounds": 10, "resolved": True,
                                            "verdict": "faster"},
                      "int8 plain vs fp32": {"value": 1.01, "ci95": [0.95, 1.08], "rounds": 40, "resolved": False,
                                             "verdict": "no clear difference (the interval spans 1×)"}}}
    bench.print_rows([row])
    out = capsys.readouterr().out
    assert "   10.00" in out and "    5.00" in out and "proxy" in out and "speed-up int8 ours vs fp32: 2.00× [1.90, 2.10] (faster)" in out
    assert "1.01× [0.95, 1.08] (no clear difference (the interval spans 1×), unresolved" in out and "612 MiB" in out
    assert "top-1 not measured: weights w" in out


@pytest.mark.slow
def test_one_bench_run_times_every_row_in_one_measurement(atto_reference, cli_env, monkeypatch):
    monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", cli_env["CONVNEXT_DEPLOY_CACHE_DIR"])
    row = bench.bench("onnxruntime", "atto", size=64, threads=2, runs=10, n_eval=300, budget_s=5,
                      log=lambda m: None)
    from convnext_deploy.targets import get_target

    declared = {f"int8 {r.name}" for r in get_target("onnxruntime").int8_recipes}
    assert set(row["p50_ms"]) == {"fp32", "int8 ours (default)", "int8 ours without outlier smoothing"} | declared
    assert all(ms > 0 for ms in row["p50_ms"].values()) and row["cpu_profile"]["int8_path"]
    for name, ratio in row["ratios"].items():  # A vs B = p50(B) / p50(A), from the same run
        a, b = name.split(" vs ")  # every candidate against the reference, and ours against the peer
        assert ratio["value"] == pytest.approx(row["p50_ms"][b] / row["p50_ms"][a])
        assert ratio["ci95"][0] <= ratio["value"] <= ratio["ci95"][1]
    assert row["eval"]["n"] == 300 and row["drop_pp"]["fp32"] == 0.0 and 0.8 < row["top1"]["fp32"] <= 1.0
    assert row["instances"] >= 4 and row["rounds"] >= 2  # spread over fresh loads of every artifact


@pytest.mark.slow
def test_the_interleaving_study_times_four_ways_in_turns(atto_reference, cli_env, monkeypatch):
    monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", cli_env["CONVNEXT_DEPLOY_CACHE_DIR"])
    lines = []
    rows = bench.interleave_study("onnxruntime", "atto", size=64, threads=2, cycles=3, calls=10, log=lines.append)
    assert [r["interleaving"] for r in rows] == [label for label, _, _ in bench.STUDY]
    for r in rows:
        assert r["speedup"] == pytest.approx(r["p50_ms"]["fp32"] / r["p50_ms"]["int8"])
        assert 2 <= r["cycles"] <= 3
    assert any("cycles of 10 timed calls" in line for line in lines)
