"""report.html as a user sees it: rendered by headless Chromium at a 1,400 px window, it reads verdict first,
names the CPU that measured it, and needs no sideways scroll."""
import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from convnext_deploy.reports.html_page import render_html
from convnext_deploy.reports.plots import plot_png

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists() and not shutil.which("chromium"),
                                    reason="chromium not installed: make setup installs it")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# writes the page's own measure of its width into the DOM, for --dump-dom to carry out
MEASURE = ("<script>window.addEventListener('load',()=>{const p=document.createElement('pre');p.id='measured';"
           "p.textContent='scrollWidth='+document.documentElement.scrollWidth+' innerWidth='+window.innerWidth;"
           "document.body.appendChild(p);});</script>")


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    exe = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    profile = tmp_path / "profile"
    return subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args], check=False, capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)


@pytest.fixture(scope="module")
def page(deployed) -> tuple[dict, str]:
    out = deployed[0]
    return json.loads((out / "report.json").read_text()), (out / "report.html").read_text()


def test_the_verdict_and_the_artifact_come_before_the_details(page):
    report, html = page
    verdict, facts, details = html.index('id="verdict"'), html.index('id="key-facts"'), html.index('id="details"')
    assert verdict < facts < details
    head = html[verdict:details]
    assert ("verdict pass" in head) == report["gates"]["passed"] and "Gates: PASSED" in head
    rec = report["recommended_precision"]
    assert f"p50 {rec['p50_ms']:.2f} ms" in head  # the artifact to ship, with its measured speed
    int8 = next(e for e in report["latency"] if e["precision"] == "int8" and e["batch"] == 1
                and e["input_size"] == report["data"]["latency_resolution"])
    q = int8["speedup_vs_reference"]
    assert f"{q['value']:.2f}× " in head and f"{q['ci95'][0]:.2f}–{q['ci95'][1]:.2f}×" in head
    assert report["machine"]["cpu"] in head


def test_a_failing_verdict_is_red_and_says_why(page):
    report = copy.deepcopy(page[0])
    report["gates"]["passed"] = False
    report["gates"]["verdicts"][0].update(status="fail", reason="INT8 loses images in the stem")
    html = render_html(report, None)
    head = html[html.index('id="verdict"'):html.index('id="details"')]
    assert "verdict fail" in head and "Gates: FAILED" in head and "INT8 loses images in the stem" in head


def test_the_hardware_named_is_the_measured_cpu_not_a_vendor_guess(page):
    # an AMD run of a target whose row says Intel: the measured CPU's name replaced wherever the report carries it
    # (machine, runners' devices), so the page is what that machine would have written
    measured = page[0]["machine"]["cpu"]
    report = json.loads(json.dumps(page[0]).replace(json.dumps(measured)[1:-1], "AMD EPYC 9R14 96-Core Processor"))
    report["target"]["hardware"] = "x86 CPU (Intel)"
    html = render_html(report, None)
    assert "AMD EPYC 9R14 96-Core Processor" in html and "Intel" not in html
    report["machine"]["cpu"] = "Intel(R) Xeon(R) Platinum 8480+"
    assert "x86 CPU (Intel)" in render_html(report, None)


def test_runtime_and_device_are_named_once_per_table(page):
    report, html = page
    runtime = report["latency"][0]["runtime"]
    latency = html[html.index("<h2>Latency</h2>"):html.index("<h2>Run</h2>")]
    assert latency.count(runtime) == 1 and latency.count(report["latency"][0]["device"]) == 1


@needs_chromium
def test_the_page_renders_in_chromium_without_sideways_scroll(page, tmp_path):
    report, html = page
    (tmp_path / "report.html").write_text(html)
    shot = tmp_path / "glance.png"
    p = _chromium(tmp_path, "--hide-scrollbars", "--window-size=1400,1800", f"--screenshot={shot}",
                  (tmp_path / "report.html").as_uri())
    assert shot.exists(), p.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    (tmp_path / "measured.html").write_text(html.replace("</body>", MEASURE + "</body>"))
    p = _chromium(tmp_path, "--window-size=1400,1000", "--virtual-time-budget=5000", "--dump-dom",
                  (tmp_path / "measured.html").as_uri())
    m = re.search(r"scrollWidth=(\d+) innerWidth=(\d+)", p.stdout)
    assert m, p.stderr[-2000:]
    scroll, inner = int(m[1]), int(m[2])
    assert inner <= 1400 and scroll <= 1400, f"page is {scroll} px wide in a {inner} px window"
    assert p.stdout.index('id="verdict"') < p.stdout.index('id="details"')
    assert report["machine"]["cpu"] in p.stdout


def test_the_plot_spans_the_gate_and_draws_intervals(page):
    report = page[0]
    assert plot_png(report)[:8] == b"\x89PNG\r\n\x1a\n"
