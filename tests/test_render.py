"""Reports: the JSON/Markdown/HTML rendering of one real deploy's report, and of the cases it did not hit."""
import copy
import json

from convnext_deploy.reports.html_page import render_html
from convnext_deploy.reports.markdown_page import render_markdown
from convnext_deploy.reports.plots import plot_png


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
