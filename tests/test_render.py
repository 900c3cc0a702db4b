"""Reports: the JSON/Markdown/HTML rendering of one real deploy's report, and of the cases it did not hit."""
import copy
import json

from convnext_deploy.reports.html_page import render_html
from convnext_deploy.reports.markdown_page import render_markdown
from convnext_deploy.reports.plots import plot_png
from convnext_deploy.reports.tables import peak_sentence


def _report(deployed) -> dict:
    return json.loads((deployed[0] / "report.json").read_text())


def test_markdown_says_what_measured_every_figure(deployed):
    r = _report(deployed)
    md = render_markdown(r)
    assert md.startswith("# convnext-deploy report: ConvNeXt-Atto on onnxruntime")
    for a in ("fp32", "int8"):
        entry = r["accuracy"][a]
        assert entry["runtime"] in md and f"{entry['top1'] * 100:.2f}" in md
    assert r["machine"]["cpu"] in md and "**32 px**" in md and "**224 px**" in md
    for e in r["latency"]:
        if e["batch"] == 1 and e["input_size"] == 224:
            assert f"{e['p50_ms']:.2f}" in md
    for v in r["gates"]["verdicts"]:
        assert v["gate"] in md


def test_html_is_self_contained_and_escapes_what_it_shows(deployed):
    r = _report(deployed)
    r["notes"] = ["a note with <script>alert(1)</script>"]
    html = render_html(r, plot_png(r))
    assert "data:image/png;base64," in html and "<script>" not in html and "&lt;script&gt;" in html


def test_a_proxy_report_says_proxy_and_shows_no_latency(deployed):
    r = copy.deepcopy(_report(deployed))
    for a in r["accuracy"].values():
        if a["precision_requested"] == "int8":
            a.update(kind="proxy", proxy="TensorRT proxy (fake-quantized)")
    r["latency"], r["int8_recipes"] = [], []
    r["notes"] = ["engine not built: no CUDA device"]
    md = render_markdown(r)
    assert "TensorRT proxy (fake-quantized)" in md and "Latency: **not measured**" in md
    assert "engine not built: no CUDA device" in md


def test_a_fallback_is_reported_round_by_round(deployed):
    r = copy.deepcopy(_report(deployed))
    r["fallback"].update(triggered=True, message="fallback met the bound", method="layers back to float by measured sensitivity",
                         float_layers=["stages.2.blocks.0.mlp.fc1"],
                         rounds=[{"float_layers": 0, "control_drop_pp": 0.9, "control_agreement": 0.97, "seconds": 0.0},
                                 {"float_layers": 1, "control_drop_pp": 0.1, "control_agreement": 0.995, "seconds": 4.2}],
                         evaluation={"plain_top1_drop_pp": 0.8, "final_top1_drop_pp": 0.05, "plain_agreement": 0.97,
                                     "final_agreement": 0.996, "n": 1000},
                         latency={"plain_p50_ms": 10.0, "final_p50_ms": 11.0, "cost": 1.1, "input_size": 224, "batch": 1})
    md = render_markdown(r)
    assert "stages.2.blocks.0.mlp.fc1" in md and "| 1 | +0.10 pp |" in md and "**1.10×**" in md and "**+0.05 pp**" in md


def test_markdown_puts_the_verdict_and_the_artifact_first(deployed):
    r = _report(deployed)
    md = render_markdown(r)
    verdict, deployed_at, details = md.index("**Gates: PASSED"), md.index("- Deployed: "), md.index("## Accuracy")
    assert verdict < deployed_at < details
    assert f"why: {r['recommended_precision']['line']}" in md


def test_a_rate_above_the_runtimes_peak_is_a_bad_peak_in_the_report():
    """The latency caption's distance to the peak: a share where the rate is within its peak, the flag where it is
    above (a peak a model beats is no peak: never a share above 100 %), the reason where no form ran in INT8."""
    peak = "a 2048×2048×2048 product as a GEMM and as a 1×1 convolution, 2 threads"
    rate = {"macs": 4_455_000_000, "peak": peak, "of": "fp32", "gmacs": 68.1, "peak_gmacs": 102.0,
            "peak_form": "1×1 convolution", "fraction": 0.668}
    report = {"latency": [
        {"precision": "fp32", "input_size": 224, "mac_rate": rate},
        {"precision": "int8", "input_size": 224, "mac_rate": {**rate, "of": "int8", "gmacs": 121.7, "peak_gmacs": 89.1,
                                                              "peak_form": "GEMM", "fraction": None, "bad_peak": True}},
        {"precision": "int8 (a result from before the flag)", "input_size": 224,
         "mac_rate": {**rate, "of": "int8", "gmacs": 121.7, "peak_gmacs": 89.1, "fraction": 1.365}},
        {"precision": "int8 (no INT8 peak)", "input_size": 224,
         "mac_rate": {**rate, "of": "int8", "peak_gmacs": None, "fraction": None,
                      "no_peak": "no form executed in INT8: the GEMM executed in fp32"}}]}
    text = peak_sentence(report)
    assert "fp32 68 G/s = 67 % of the FP32 peak (102 G/s, 1×1 convolution)" in text
    assert text.count("int8 122 G/s, above the measured INT8 peak of 89 G/s: the peak is wrong (bad peak)") == 1
    assert "before the flag) 122 G/s, above the measured INT8 peak of 89 G/s: the peak is wrong (bad peak)" in text
    assert "no INT8 peak (no form executed in INT8: the GEMM executed in fp32)" in text and "137 %" not in text
