"""report.html: one self-contained page that reads at a glance: the verdict (coloured, with the reason for a
failing one), the artifact to ship with its speed and accuracy, then the details. It fits a 1,400 px window:
tables wrap, images shrink, long names break."""
from __future__ import annotations

import base64
import html
import re

from convnext_deploy.reports.cells import html_table, verdict_passed
from convnext_deploy.reports.device_section import DEVICE_HEAD, device_caption, device_rows
from convnext_deploy.reports.glance import key_facts, verdict
from convnext_deploy.reports.markdown_page import sensitivity_caption
from convnext_deploy.reports.plots import sensitivity_png
from convnext_deploy.reports.prose import (
    choice_caption,
    memory_caption,
    method_lines,
    mixed_lines,
    recipe_caption,
    screen_caption,
    summary_lines,
    time_lines,
)
from convnext_deploy.reports.tables import (
    ARTIFACT_HEAD,
    CHOICE_HEAD,
    FALLBACK_HEAD,
    GATE_HEAD,
    LAT_HEAD,
    LAYER_HEAD,
    MEMORY_HEAD,
    RECIPE_HEAD,
    SCREEN_HEAD,
    SENS_HEAD,
    acc_head,
    accuracy_caption,
    accuracy_rows,
    artifact_rows,
    choice_rows,
    fallback_rows,
    gate_rows,
    gates_caption,
    latency_caption,
    latency_rows,
    layer_tables,
    memory_rows,
    recipe_rows,
    screen_rows,
    sensitivity_rows,
)

CSS = """*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;max-width:1240px;margin:1.5em auto;padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em;margin:.2em 0}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
.meta{color:#666;margin:0 0 .8em}
.verdict{border:2px solid;border-radius:6px;padding:.7em 1.1em;margin:.8em 0}
.verdict.pass{background:#e7f5e8;border-color:#2e7d32;color:#1b5e20}
.verdict.fail{background:#fdecea;border-color:#c62828;color:#8e0000}
.verdict .headline{font-size:1.6em;font-weight:700;margin:0}.verdict ul{margin:.4em 0 0}
table{border-collapse:collapse;margin:.4em 0 1.4em;font-size:13px;max-width:100%}
td,th{border:1px solid #ccc;padding:4px 7px;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#f3f3f3}caption{caption-side:top;text-align:left;color:#444;padding:.3em 0}
table.facts{width:100%;font-size:15px}table.facts th{width:9em}
td.pass{color:#1b5e20;font-weight:600}td.fail{color:#8e0000;font-weight:600}
img{max-width:100%;height:auto}pre,code{white-space:pre-wrap;overflow-wrap:anywhere}
li,p{overflow-wrap:anywhere}"""


def _inline(text: str) -> str:
    """The Markdown the sentences use (**bold**, `code`), as HTML, after escaping."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", text)


def _png_img(png: bytes | None, alt: str) -> str:
    return f'<img alt="{alt}" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png else ""


def glance_html(report: dict) -> str:
    passed, headline, reasons = verdict(report)
    state = "pass" if passed else "fail"
    why = "<ul>" + "".join(f"<li>{html.escape(r)}</li>" for r in reasons) + "</ul>" if reasons else ""
    facts = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in key_facts(report))
    return (f'<section id="verdict" class="verdict {state}"><p class="headline">{html.escape(headline)}</p>{why}</section>'
            f'<table class="facts" id="key-facts"><tbody>{facts}</tbody></table>')


def _gates_html(report: dict) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in GATE_HEAD)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row[:-1])
                   + f'<td class="{"pass" if verdict_passed(v) else "fail"}">{html.escape(row[-1])}</td></tr>'
                   for row, v in zip(gate_rows(report), report["gates"]["verdicts"]))
    caption = f"<caption>{html.escape(gates_caption(report))}</caption>"
    return f"<table>{caption}<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>" if body else \
        "<p>No gate was applied (the gate file sets none).</p>"


def _device_html(report: dict) -> str:
    caption = device_caption(report)
    if device_rows(report):
        return html_table(DEVICE_HEAD, device_rows(report), caption)
    return f"<p>{html.escape(caption)}</p>" if caption else ""


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>{body}" if body else ""


def _lines_html(lines: list[str]) -> str:
    return "<ul>" + "".join(f"<li>{_inline(line.strip()[2:] if line.startswith('- ') else line.strip())}</li>"
                            for line in lines) + "</ul>"


def _pre(lines: list[str]) -> str:
    return "<pre>" + html.escape("\n".join(lines)) + "</pre>" if lines else ""


def _sensitivity_html(report: dict) -> str:
    result = report.get("sensitivity")
    if not result:
        return ""
    return _section("Per-layer sensitivity (INT8)", f"<p>{html.escape(sensitivity_caption(result))}</p>"
                    + _png_img(sensitivity_png(result), "per-layer SQNR")
                    + html_table(SENS_HEAD, sensitivity_rows(result)))


def render_html(report: dict, png: bytes | None) -> str:
    m = report["model"]
    title = f"convnext-deploy report: {m['name']} on {report['target']['name']}"
    plot = _png_img(png, "accuracy vs latency") or "<p>(no plot: matplotlib is not installed or no latency was measured)</p>"
    choice = choice_rows(report)
    details = "".join([
        _section("Accuracy vs latency", plot),
        _section("Gates", _gates_html(report)),
        _section("Accuracy", html_table(acc_head(report, runtime=False), accuracy_rows(report, runtime=False),
                                        accuracy_caption(report))),
        _section("On the device", _device_html(report)),
        _section("Latency", html_table(LAT_HEAD, latency_rows(report), latency_caption(report)) if report["latency"]
                 else "<p>Not measured (see the notes).</p>"),
        _section("Run", _lines_html(summary_lines(report))),
        _section("INT8 methods", _lines_html(method_lines(report))
                 + (html_table(FALLBACK_HEAD, fallback_rows(report)) if fallback_rows(report) else "")),
        _section("Where the time goes", _pre(time_lines(report))),
        _section("INT8 candidates screened", html_table(SCREEN_HEAD, screen_rows(report), screen_caption(report))
                 if report.get("recipe_screen") else ""),
        _section("INT8 recipe chosen on this CPU", (f"<p>{_inline(choice_caption(report))}</p>"
                 + (html_table(CHOICE_HEAD, [[c.replace("**", "") for c in row] for row in choice]) if choice else ""))
                 if report.get("recipe_choice") else ""),
        _section("Latency-aware precision", _pre(mixed_lines(report))),
        _section("INT8 recipes compared", html_table(RECIPE_HEAD, recipe_rows(report), recipe_caption(report))
                 if report.get("int8_recipes") else ""),
        _section("Memory", html_table(MEMORY_HEAD, memory_rows(report), memory_caption(report)) if memory_rows(report)
                 else ""),
        _section("Artifacts", html_table(ARTIFACT_HEAD, artifact_rows(report))),
        _sensitivity_html(report),
        "".join(f"<h3>Per-layer precision: {html.escape(t)}</h3>" + (html_table(LAYER_HEAD, rows) if rows else "")
                for t, rows in layer_tables(report)),
    ])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1><p class="meta">Created {html.escape(report['created'])} by {html.escape(report['tool'])}.</p>
{glance_html(report)}
<div id="details">{details}</div>
</body></html>
"""
