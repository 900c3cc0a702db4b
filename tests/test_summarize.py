"""`convnext-deploy summarize` and `make matrix`: real reports (the session's ONNX Runtime deploy and a TensorRT
deploy, a proxy here) merged into one table whose every figure is the report's own."""
import html
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_cli


@pytest.fixture(scope="module")
def trt_report(tensorrt_deployed) -> Path:
    """TensorRT atto: no GPU here, so the Q/DQ ONNX proxy's accuracy, no latency, exit 3 (the session's deploy under
    gates that refuse proxy figures)."""
    return tensorrt_deployed["strict"][0] / "report.json"


@pytest.fixture(scope="module")
def reports(deployed, trt_report) -> list[Path]:
    return [deployed[0] / "report.json", trt_report]


@pytest.fixture(scope="module")
def summary(reports, cli_env, tmp_path_factory):
    out = tmp_path_factory.mktemp("summary") / "matrix"
    p = run_cli(["summarize", *map(str, reports), "--out", str(out)], cli_env, code=0)
    return out, p


def md_rows(md: str) -> tuple[list[str], list[list[str]]]:
    """(head, rows) of the Markdown table (cells split on unescaped pipes)."""
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    cells = [[c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in lines]
    return cells[0], cells[1:]


def notes_of(md: str) -> dict[str, str]:
    return dict(re.findall(r"^(\[\d+\]) (.*?)\s*$", md, re.M))


def p50_of(report: dict, precision: str):
    size = report["data"]["latency_resolution"]
    return next((e for e in report["latency"] if e["precision"] == precision and e["batch"] == 1
                 and e["input_size"] == size), None)


def test_every_row_and_figure_is_the_reports_own(summary, reports):
    out, p = summary
    md = (out / "summary.md").read_text()
    assert md in p.stdout  # printed as written
    head, rows = md_rows(md)
    col = {name: i for i, name in enumerate(head)}
    notes = notes_of(md)
    by_key = {(r[0], r[1], r[2]): r for r in rows}
    expected_rows = 0
    for path in reports:
        report = json.loads(path.read_text())
        variant, target, ref = report["model"]["variant"], report["target"]["name"], report["target"]["reference"]
        for precision in report["target"]["precisions"]:
            expected_rows += 1
            row = by_key[(variant, target, precision)]
            acc = report["accuracy"][precision]

            def cell(name):
                return row[col[name]]

            def why(name):  # a missing figure: "— [n]" and note n
                m = re.fullmatch(r"— (\[\d+\])", cell(name))
                assert m, f"{target} {precision} {name}: {cell(name)!r} is not a missing figure"
                return notes[m.group(1)]

            assert cell("top-1") == f"{acc['top1'] * 100:.2f}%"
            assert cell("device") == acc["device"] and cell("runtime") == acc["runtime"]
            assert cell("real/proxy") == (f"proxy: {acc['proxy']}" if acc["kind"] == "proxy" else "real")
            if precision == ref:
                assert "reference" in why("top-1 drop vs reference (pp)") and "reference" in why("speed-up vs reference")
            else:
                assert cell("top-1 drop vs reference (pp)") == f"{acc['top1_drop_pp']:+.2f}"
                assert cell("agreement vs reference") == f"{acc['agreement'] * 100:.2f}%"
            lat = p50_of(report, precision)
            if lat:
                assert cell("p50 ms (batch 1)") == f"{lat['p50_ms']:.2f} @ {lat['input_size']} px"
            else:  # the report's own reason, e.g. "engine not built: tensorrt is not installed ..."
                assert why("p50 ms (batch 1)") == "not measured: " + report["notes"][0]
            if precision == "int8":
                speedup = report["gates"]["figures"]["int8_speedup"]
                if speedup is None:
                    assert why("speed-up vs reference").startswith("not measured: ")
                else:
                    assert cell("speed-up vs reference") == f"{speedup:.2f}×"
                failed = [v for v in report["gates"]["verdicts"] if v["status"] != "pass"]
                if report["gates"]["passed"]:
                    assert cell("gates").startswith("pass")
                else:
                    assert cell("gates").startswith("FAIL: ")
                    assert all(f"{v['gate']} {v['status']}" in cell("gates") for v in failed)
            else:
                assert "INT8" in why("gates")
    assert len(rows) == expected_rows  # no torch_fp32 row, nothing invented


def test_json_holds_the_reports_exact_values(summary, reports):
    out, _ = summary
    rows = json.loads((out / "summary.json").read_text())
    ort = json.loads(reports[0].read_text())
    int8 = next(r for r in rows if r["target"] == "onnxruntime" and r["precision"] == "int8")
    assert int8["top1"] == ort["accuracy"]["int8"]["top1"]
    assert int8["top1_drop_pp"] == ort["accuracy"]["int8"]["top1_drop_pp"]
    assert int8["agreement"] == ort["accuracy"]["int8"]["agreement"]
    assert int8["p50_ms"] == p50_of(ort, "int8")["p50_ms"]
    assert int8["speedup"] == ort["gates"]["figures"]["int8_speedup"]
    trt = [r for r in rows if r["target"] == "tensorrt"]
    assert trt and all(r["p50_ms"] is None and r["kind"].startswith("proxy: ") for r in trt)


def test_html_is_the_same_table(summary):
    out, _ = summary
    md, page = (out / "summary.md").read_text(), (out / "summary.html").read_text()
    head, rows = md_rows(md)
    for name in head:
        assert f"<th>{html.escape(name)}</th>" in page
    for row in rows:
        assert "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" in page
    for ref, text in notes_of(md).items():
        assert f"{ref} {html.escape(text)}" in page


def test_one_device_is_said_and_reports_from_two_devices_say_so(summary, reports, cli_env, tmp_path):
    out, _ = summary
    device = json.loads(reports[0].read_text())["accuracy"]["int8"]["device"]
    assert f"Every figure was measured on one device: {device}." in (out / "summary.md").read_text()
    # The same ONNX Runtime report relabelled as if run on another machine (every device field changed): the table
    # must then tell the two devices apart, row by row and in its caption.
    other = json.loads(reports[0].read_text())
    for entry in [*other["accuracy"].values(), *other["latency"]]:
        entry["device"] = "Apple M2, 4 threads"
    moved = tmp_path / "other" / "report.json"
    moved.parent.mkdir()
    moved.write_text(json.dumps(other))
    p = run_cli(["summarize", str(reports[0]), str(moved), "--out", str(tmp_path / "two")], cli_env, code=0)
    md = (tmp_path / "two" / "summary.md").read_text()
    assert "These reports come from 2 different devices" in md and p.returncode == 0
    head, rows = md_rows(md)
    devices = {r[head.index("device")] for r in rows}
    assert devices == {device, "Apple M2, 4 threads"}


def _bad_inputs(deployed_dir: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    truncated = tmp / "truncated.json"
    text = (deployed_dir / "report.json").read_text()
    truncated.write_text(text[: len(text) // 2])
    return {"missing": (tmp / "nope" / "report.json", "no report at"),
            "manifest": (deployed_dir / "manifest.json", "is not a convnext-deploy report"),
            "markdown": (deployed_dir / "report.md", "is not JSON"),
            "truncated": (truncated, "is not JSON"),
            "a model": (next((deployed_dir / "artifacts").glob("*.onnx")), "is not JSON")}


@pytest.mark.parametrize("case", ["missing", "manifest", "markdown", "truncated", "a model"])
def test_a_bad_file_is_one_line_exit_2_and_nothing_written(case, deployed, cli_env, tmp_path):
    bad, words = _bad_inputs(deployed[0], tmp_path)[case]
    out = tmp_path / "out"
    p = run_cli(["summarize", str(deployed[0] / "report.json"), str(bad), "--out", str(out)], cli_env, code=2)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convnext-deploy: error: "), p.stderr
    assert words in lines[0] and str(bad) in lines[0] and "Traceback" not in p.stdout + p.stderr
    assert not out.exists()


def test_an_out_path_that_is_a_file_is_one_line_exit_2(deployed, cli_env, tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    p = run_cli(["summarize", str(deployed[0]), "--out", str(tmp_path / "taken")], cli_env, code=2)
    assert p.stderr.count("\n") == 1 and "a file stands on that path" in p.stderr
    assert (tmp_path / "taken").read_text() == "not a directory"


def test_make_matrix_merges_runs(reports, cli_env, tmp_path):
    """`make matrix` in a directory whose runs/ holds the reports (as the CI's summarize job lays them out)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    cli = f"{sys.executable} -m pipeline.cli"
    empty = subprocess.run([make, "-s", "-f", str(REPO / "Makefile"), "matrix", f"CLI={cli}"], cwd=tmp_path,
                           env=cli_env, capture_output=True, text=True, timeout=120)
    assert empty.returncode != 0 and "no report at runs/*/report.json" in empty.stderr
    for path in reports:
        dest = tmp_path / "runs" / f"report-{path.parent.name}" / "report.json"
        dest.parent.mkdir(parents=True)
        shutil.copy(path, dest)
    p = subprocess.run([make, "-s", "-f", str(REPO / "Makefile"), "matrix", f"CLI={cli}"], cwd=tmp_path, env=cli_env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    head, rows = md_rows((tmp_path / "runs" / "matrix" / "summary.md").read_text())
    assert {r[1] for r in rows} == {"onnxruntime", "tensorrt"}
    assert (tmp_path / "runs" / "matrix" / "summary.html").is_file()
