"""`make bench`: its rows and ratios, on a real one-target run (slow) and on the printing of a row; its bounded
default mode against `--full`, the time shared among rows, the progress line per row and the result file."""
import json
import time

import pytest

from convnext_deploy.pipeline import bench
from convnext_deploy.pipeline.measure import bench_rows
from convnext_deploy.pipeline.measure.bench_rows import BOUNDED, FULL, Clock
from convnext_deploy.pipeline.measure.machine import cpu_identity


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


def test_a_rate_above_its_runtimes_peak_prints_as_a_bad_peak_never_above_100_percent(capsys):
    """A result from before the peak's forms (Zen 3: one GEMM, which OpenVINO ran in a slow u8 kernel) prints its
    rates above that peak as a bad peak; a rate within its peak prints its share."""
    row = {"target": "openvino", "variant": "t", "input_size": 224, "device": "cpu, 2 threads", "runtime": "openvino",
           "weights": "w",
           "p50_ms": {"fp32": 65.4, "int8 ours (default)": 36.6}, "ratios": {}, "macs": 4_455_000_000,
           "peak": {"threads": 2, "gemm": "a 2048×2048×2048 GEMM, 2 threads", "fp32": {"gmacs": 86.6, "ms": 99.2},
                    "int8": {"gmacs": 89.1, "ms": 96.43}},
           "mac_rate": {"fp32": {"gmacs": 68.1, "of": "fp32", "peak_gmacs": 86.6, "fraction": 0.786},
                        "int8 ours (default)": {"gmacs": 121.7, "of": "int8", "peak_gmacs": 89.1, "fraction": 1.365}}}
    bench.print_rows([row])
    out = capsys.readouterr().out
    assert "fp32: 68 G/s = 79 % of the FP32 peak" in out and "137 %" not in out
    assert ("int8 ours (default): 122 G/s, above the measured INT8 peak of 89 G/s: the peak is wrong (bad peak)"
            in out)


@pytest.mark.slow
def test_one_bench_run_times_every_row_in_one_measurement(atto_reference, cli_env, monkeypatch):
    monkeypatch.setenv("CONVNEXT_DEPLOY_CACHE_DIR", cli_env["CONVNEXT_DEPLOY_CACHE_DIR"])
    row = bench.bench("onnxruntime", "atto", size=64, threads=2, runs=10, n_eval=300, budget_s=5,
                      log=lambda m: None)
    from convnext_deploy.targets import get_target

    from convnext_deploy.targets.ort_peer import PATHS

    declared = {f"int8 {r.name}" for r in get_target("onnxruntime").int8_recipes}
    peers = {label for label, _ in PATHS}  # the users' own paths, and FP32 in the other graph form a recipe uses
    assert set(row["p50_ms"]) == ({"fp32", "fp32 channels_first", "int8 ours (default)",
                                   "int8 ours without outlier smoothing"} | declared | peers)
    assert all(ms > 0 for ms in row["p50_ms"].values()) and row["cpu_profile"]["int8_path"]
    for name, ratio in row["ratios"].items():  # A vs B = p50(B) / p50(A), from the same run
        a, b = name.split(" vs ")  # every candidate against the reference, ours against the peers
        if b.startswith("the fastest "):  # "the fastest fp32 form (LABEL)"
            b = b.split(" form (", 1)[1][:-1]
        assert ratio["value"] == pytest.approx(row["p50_ms"][b] / row["p50_ms"][a])
        assert ratio["ci95"][0] <= ratio["value"] <= ratio["ci95"][1]
    fastest = min(("fp32", "fp32 channels_first"), key=row["p50_ms"].get)
    assert f"int8 ours (default) vs the fastest fp32 form ({fastest})" in row["ratios"]
    for label, rate in row["mac_rate"].items():  # MACs over p50, against the runtime's peak of that precision
        assert rate["gmacs"] == pytest.approx(row["macs"] / (row["p50_ms"][label] / 1e3) / 1e9, rel=1e-2, abs=0.1)
        if rate.get("bad_peak"):  # above the peak: no share, the flag (tests/test_peak.py)
            assert rate["gmacs"] > rate["peak_gmacs"] and rate["fraction"] is None
        else:
            share = rate["gmacs"] / row["peak"][rate["of"]]["gmacs"]
            assert rate["fraction"] == pytest.approx(share, rel=1e-2, abs=1e-3)
    assert {rate["of"] for rate in row["mac_rate"].values()} == {"fp32", "int8"}
    assert set(row["throughput"]) == {f"{k} · {way}" for k in ("fp32", "int8 ours (default)")
                                      for way in ("batch 8", "parallel 1-thread sessions")}
    assert all(t["images_per_s"] > 0 for t in row["throughput"].values())
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


def a_row(target: str, variant: str) -> dict:
    return {"target": target, "variant": variant, "weights": "w", "input_size": 224, "threads": 2, "batch": 1,
            "device": "cpu, 2 threads", "runtime": "onnxruntime 1.32.0", "kind": "real",
            "p50_ms": {"fp32": 10.0, "int8 ours (default)": 5.0}, "p50_ci_ms": {"fp32": [9.9, 10.1], "int8 ours (default)": [4.9, 5.1]},
            "executed": {}, "rounds": 12, "instances": 4, "disturbed_rounds": 0, "skipped": [],
            "ratios": {"int8 ours (default) vs fp32": {"value": 2.0, "ci95": [1.9, 2.1], "rounds": 12, "resolved": True,
                                                       "verdict": "faster"}},
            "timing": {"budget_s": 1.0, "seconds": 0.5}}


def test_the_default_is_bounded_and_full_is_the_whole_grid():
    from convnext_deploy.targets import TARGETS, get_target

    assert BOUNDED["minutes"] > 0 and BOUNDED["minutes"] <= 10 and FULL["minutes"] == 0  # a deadline; full: none
    assert set(BOUNDED["targets"].split(",")) == {"onnxruntime", "openvino"}
    assert all(not get_target(t).available().proxy for t in BOUNDED["targets"].split(","))  # real timings only
    assert "+outliers" not in BOUNDED["variants"] and "atto+outliers" in FULL["variants"].split(",")
    assert FULL["targets"] is None  # every target of the table, the proxies for accuracy
    assert set(TARGETS) >= set(BOUNDED["targets"].split(","))
    assert BOUNDED["runs"] < FULL["runs"] and BOUNDED["budget"] < FULL["budget"] and BOUNDED["eval"] is not None


def test_the_rows_share_what_is_left_to_the_deadline():
    clock = Clock(rows=4, minutes=8, budget=120)
    assert clock.share(0, ["t", "atto", "t"]) <= min(120, 8 * 60 / 4)  # no row takes more than its part
    clock.fixed = {"atto": 60.0, "t": 100.0}  # what rows spent building, loading and evaluating
    clock.start = time.monotonic() - 5 * 60  # five minutes gone
    left = 3 * 60 - 60 - 100  # three left, less what the two rows to come spend outside their timing
    assert clock.share(1, ["atto", "t"]) == pytest.approx(left / 3, abs=1)
    clock.start = time.monotonic() - 9 * 60  # past the deadline: no more timing than the minimum rounds
    assert clock.share(2, ["t"]) == 0.0
    assert Clock(rows=9, minutes=0, budget=240).share(3, ["t"] * 5) == 240  # --full: the budget per row, no deadline
    assert "8 minutes" in Clock(4, 8, 120).estimate() and "minutes or more" in Clock(9, 0, 240).estimate()


def stub_bench(monkeypatch, budgets: list, slower: float = 1.0) -> None:
    """The rows stubbed, and the deadline's probe answering `slower` × the reference CPU's time."""
    from convnext_deploy.pipeline.measure import bench_deadline

    def fake_bench(target, variant, size, threads, runs, n_eval, budget_s, log=print):
        budgets.append(budget_s())
        return a_row(target, variant)

    def fake_probe(target, threads):
        return {"gemm": "a 2048×2048×2048 FP32 GEMM, 2 threads", "target": target.name, "runtime": target.name,
                "threads": threads, "ms": slower * bench_deadline.REFERENCE["ms"][target.name]}

    monkeypatch.setattr(bench, "bench", fake_bench)
    monkeypatch.setattr(bench_deadline, "gemm_probe", fake_probe)


def test_a_progress_line_is_printed_and_flushed_as_each_row_ends(monkeypatch, tmp_path):
    """Rows run through main() with the measuring stubbed on a CPU twice as slow as the deadline's reference: a plan
    line up front with the deadline scaled and why, a start and an end line per row, each flushed, then the result
    file with the machine, versions, date and the deadline's probe."""
    printed, budgets = [], []
    stub_bench(monkeypatch, budgets, slower=2.0)
    monkeypatch.setattr(bench, "print", lambda *a, **k: printed.append((" ".join(map(str, a)), k.get("flush"))),
                        raising=False)
    monkeypatch.setattr(bench_rows, "print", lambda *a, **k: printed.append((" ".join(map(str, a)), k.get("flush"))),
                        raising=False)
    out = tmp_path / "b" / "bench.json"
    assert bench.main(["--targets", "onnxruntime", "--variants", "atto,t", "--out", str(out)]) == 0
    lines = [line for line, _ in printed]
    plan = next(i for i, line in enumerate(lines) if line.startswith("plan: 2 rows"))
    ends = [i for i, line in enumerate(lines) if line.startswith(("[1/2] onnxruntime · atto: 2 runners",
                                                                  "[2/2] onnxruntime · t: 2 runners"))]
    assert len(ends) == 2 and plan < ends[0] and all(printed[i][1] for i in [plan, *ends])
    assert "int8 ours (default) vs fp32 2.00× [1.90, 2.10]" in lines[ends[0]]
    assert f"of ~{2 * BOUNDED['minutes']:g} min" in lines[ends[0]]  # the deadline scaled to this (stubbed) CPU
    assert f"within about {2 * BOUNDED['minutes']:g} minutes" in lines[plan] and "× 2.00, this CPU against" in lines[plan]
    assert ends[1] < next(i for i, line in enumerate(lines) if line.startswith("\nonnxruntime · atto"))  # before the tables
    assert all(0 <= b <= BOUNDED["budget"] for b in budgets)
    result = json.loads(out.read_text())
    assert result["mode"] == "default with --targets, --variants" and result["settings"]["runs"] == BOUNDED["runs"]
    settings = result["settings"]
    assert settings["minutes"] == 2 * BOUNDED["minutes"] and settings["deadline"]["default_minutes"] == BOUNDED["minutes"]
    assert settings["deadline"]["scale"] == 2.0 and settings["deadline"]["probe"]["target"] == "onnxruntime"
    assert result["machine"]["int8_path"] and "cpu_family" in result["machine"] and result["versions"]["onnxruntime"]
    assert len(result["date"]) == 10 and [r["variant"] for r in result["rows"]] == ["atto", "t"]


def test_full_mode_takes_the_whole_grid_unless_told_otherwise(monkeypatch, tmp_path, capsys):
    budgets = []
    stub_bench(monkeypatch, budgets)
    out = tmp_path / "full.json"
    assert bench.main(["--full", "--targets", "onnxruntime", "--variants", "atto", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["mode"] == "full with --targets, --variants" and budgets == [FULL["budget"]]
    assert {k: result["settings"][k] for k in ("runs", "eval", "minutes")} == {"runs": FULL["runs"], "eval": None,
                                                                                "minutes": 0}
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    assert "--full" in capsys.readouterr().out


CPUINFO = """vendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9R14 96-Core Processor
stepping\t: 1\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16\n"""


def test_the_result_goes_to_a_folder_per_cpu_and_date():
    ident = cpu_identity(CPUINFO)
    assert ident == {"vendor": "AuthenticAMD", "cpu_family": 25, "cpu_model": 17, "stepping": 1, "generation": "Zen 4"}
    machine = {"cpu": "AMD EPYC 9R14 96-Core Processor", **ident}
    assert bench_rows.default_out(machine, "2026-12-02", False) == "benchmarks/amd-epyc-9r14-zen4-2026-12-02/bench.json"
    intel = {"cpu": "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz", "cpu_family": 6, "cpu_model": 106}
    assert bench_rows.default_out(intel, "2026-12-02", True) == \
        "benchmarks/intel-xeon-platinum-8375c-f6m106-2026-12-02/bench-full.json"
