"""Several deploys' report.json files → one table (Markdown, HTML, JSON): a row per variant × target × precision.

Every figure is read from a report as it stands; none is computed here. A figure a report lacks shows "—" and a
numbered note saying why (read from the report's own notes where it gives one). Reports from different devices
say so: each row names its device, and the caption counts them.
"""
from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from convnext_deploy.pipeline.core.errors import UserError
from convnext_deploy.reports.cells import html_table as _html_table
from convnext_deploy.reports.cells import md_table as _md_table
from convnext_deploy.reports.cells import verdict_passed

HEAD = ["variant", "target", "precision", "top-1", "top-1 drop vs reference (pp)", "agreement vs reference",
        "p50 ms (batch 1)", "speed-up vs reference", "device", "runtime", "real/proxy", "gates"]
# the keys a report must have for a row to be read from it (each path is walked in the report dict)
REQUIRED = ("model.variant", "target.name", "target.precisions", "target.reference", "accuracy", "latency",
            "data.latency_resolution", "gates.verdicts", "gates.figures", "gates.passed")
REFERENCE_NOTE = "the target's reference precision: drops, agreements and speed-ups are measured against it"
INT8_ONLY_SPEEDUP = "the report gives a speed-up for INT8 only (reference p50 / INT8 p50, gates.figures.int8_speedup)"
INT8_ONLY_GATES = "the gates judge the INT8 artifact"
HINT = "pass the report.json a deploy wrote (runs/<target>-<variant>/report.json) or its directory"


@dataclass
class Row:
    """One table row: the raw figures as the report holds them (None where it has none) and the cells shown."""

    report: str
    variant: str
    target: str
    precision: str
    top1: float | None = None
    top1_drop_pp: float | None = None
    agreement: float | None = None
    p50_ms: float | None = None
    latency_input_size: int | None = None
    speedup: float | None = None
    device: str | None = None
    runtime: str | None = None
    kind: str | None = None
    gates: str | None = None
    missing: dict = field(default_factory=dict)  # figure → why the report has none


# ---------------------------------------------------------------- reading

def _walk(report: dict, dotted: str):
    node = report
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None, key
        node = node[key]
    return node, None


def load_report(path: Path) -> tuple[Path, dict]:
    """(file, report) of a deploy's report.json or the report directory holding it; anything else is one
    UserError line."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"no report at {file}: {HINT}")
    try:
        report = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file} is not JSON ({e}); {HINT}") from None
    if not isinstance(report, dict):
        raise UserError(f"{file} is not a convnext-deploy report (a JSON {type(report).__name__}, not an object); {HINT}")
    for dotted in REQUIRED:
        if _walk(report, dotted)[0] is None:
            raise UserError(f"{file} is not a convnext-deploy report (it has no '{dotted}'); {HINT}")
    return file, report


# ---------------------------------------------------------------- rows

def _latency_reason(report: dict, precision: str) -> str:
    """Why the report has no p50 for `precision`, in the report's own words where it gives them: first why the
    target's runtime did not run here (its first note, e.g. "engine not built: ..."), else the latency note."""
    if report.get("engine_built") is False and report.get("notes"):
        return "not measured: " + report["notes"][0]
    for note in report.get("notes", []):
        if note.startswith("latency not measured for ") and precision in note.split(":", 1)[0]:
            return "not measured: " + note[len("latency not measured for "):]
    size = report["data"]["latency_resolution"]
    return f"not measured: the report has no batch-1 latency of {precision} at {size} px"


def _not_built_reason(report: dict, precision: str) -> str:
    for note in report.get("notes", []):
        if note.startswith(f"{precision} not built"):
            return note
    return f"{precision} is not in the report's accuracy figures (not built in this deploy)"


def _p50(report: dict, precision: str) -> tuple[float | None, dict | None]:
    """The batch-1 p50 at the deployment size, as the gates read it (pipeline.stages.validate.p50)."""
    size = report["data"]["latency_resolution"]
    entry = next((e for e in report["latency"] if e["precision"] == precision and e["batch"] == 1
                  and e["input_size"] == size), None)
    return (entry["p50_ms"], entry) if entry else (None, None)


def _verdict(report: dict) -> str:
    gates = report["gates"]
    if gates["passed"]:
        n = len(gates["verdicts"])
        return f"pass ({n} gate{'s' if n != 1 else ''})" if n else "pass (no gate applied)"
    return "FAIL: " + "; ".join(f"{v['gate']} {v['status']}" + (f" ({v['reason']})" if v.get("reason") else "")
                                for v in gates["verdicts"] if not verdict_passed(v))


def _device(acc: dict | None, lat: dict | None) -> str | None:
    devices = list(dict.fromkeys(d for d in ((acc or {}).get("device"), (lat or {}).get("device")) if d))
    if len(devices) == 2:
        return f"{devices[0]} (accuracy); {devices[1]} (latency)"
    return devices[0] if devices else None


def _row(report: dict, name: str, precision: str) -> Row:
    target, reference = report["target"]["name"], report["target"]["reference"]
    row = Row(name, report["model"]["variant"], target, precision)
    acc = report["accuracy"].get(precision)
    row.p50_ms, lat = _p50(report, precision)
    if lat is not None:
        row.latency_input_size = lat["input_size"]
    else:
        row.missing["p50_ms"] = _latency_reason(report, precision)
    if acc is not None:
        row.top1, row.runtime = acc["top1"], acc["runtime"]
        row.kind = acc["kind"] + (f": {acc['proxy']}" if acc.get("proxy") else "")
        if precision == reference:
            row.missing["top1_drop_pp"] = row.missing["agreement"] = REFERENCE_NOTE
        else:
            row.top1_drop_pp, row.agreement = acc.get("top1_drop_pp"), acc.get("agreement")
    else:
        why = (_not_built_reason(report, precision) if precision in report["target"]["precisions"] else
               "the report measured only latency for this entry (accuracy is measured once per precision)")
        row.missing.update({key: why for key in ("top1", "top1_drop_pp", "agreement", "device", "runtime", "kind")})
        if lat is not None:
            row.runtime, row.kind = lat["runtime"], lat["kind"] + (f": {lat['proxy']}" if lat.get("proxy") else "")
    row.device = _device(acc, lat)
    if precision == "int8":
        row.speedup = report["gates"]["figures"].get("int8_speedup")
        if row.speedup is None:
            row.missing["speedup"] = _latency_reason(report, precision)
        row.gates = _verdict(report)
    else:
        row.missing["speedup"] = REFERENCE_NOTE if precision == reference else INT8_ONLY_SPEEDUP
        row.missing["gates"] = INT8_ONLY_GATES
    for key in ("top1_drop_pp", "agreement"):  # a figure the report holds as null: say so, never guess it
        if getattr(row, key) is None and key not in row.missing:
            row.missing[key] = f"the report holds no {key} for {precision}"
    return row


def summary_rows(reports: list[tuple[str, dict]]) -> list[Row]:
    """Rows of (name, report) pairs, sorted by variant and target, precisions in each target's declared order,
    then any latency-only entries (Core ML's CPU_ONLY runner, the all-INT8 artifact before a fallback)."""
    rows = []
    for name, report in sorted(reports, key=lambda nr: (nr[1]["model"]["variant"], nr[1]["target"]["name"], nr[0])):
        try:
            precisions = list(dict.fromkeys([*report["target"]["precisions"],
                                             *(p for p in report["accuracy"] if p != "torch_fp32")]))
            precisions += [e["precision"] for e in report["latency"] if e["precision"] not in precisions
                           and _p50(report, e["precision"])[1] is e]
            rows += [_row(report, name, p) for p in precisions]
        except (KeyError, TypeError, AttributeError) as e:
            raise UserError(f"{name} is not a report this version of convnext-deploy reads ({type(e).__name__}: {e}); "
                            f"re-run its deploy with this version") from None
    return rows


# ---------------------------------------------------------------- rendering

def _fmt(row: Row, key: str) -> str | None:
    v = getattr(row, key)
    if v is None:
        return None
    return {"top1": lambda: f"{v * 100:.2f}%", "top1_drop_pp": lambda: f"{v:+.2f}",
            "agreement": lambda: f"{v * 100:.2f}%", "p50_ms": lambda: f"{v:.2f} @ {row.latency_input_size} px",
            "speedup": lambda: f"{v:.2f}×"}.get(key, lambda: str(v))()


CELL_KEYS = ("top1", "top1_drop_pp", "agreement", "p50_ms", "speedup", "device", "runtime", "kind", "gates")


def table(rows: list[Row]) -> tuple[list[list[str]], list[str]]:
    """(cells, notes): a missing figure is "— [n]", note n its reason; equal reasons share one number."""
    notes: list[str] = []
    cells = []
    for row in rows:
        line = [row.variant, row.target, row.precision]
        for key in CELL_KEYS:
            text = _fmt(row, key)
            if text is None:
                why = row.missing.get(key, "not in the report")
                if why not in notes:
                    notes.append(why)
                text = f"— [{notes.index(why) + 1}]"
            line.append(text)
        cells.append(line)
    return cells, notes


def caption(rows: list[Row], reports: list[tuple[str, dict]]) -> list[str]:
    devices = list(dict.fromkeys(r.device for r in rows if r.device))
    lines = [f"{len(reports)} report(s), {len(rows)} rows. Each figure is the report's own: accuracy on its evaluation "
             "split at the checkpoint's resolution, p50 at its deployment resolution, batch 1; drops, agreements and "
             "speed-ups against the same target's reference precision."]
    if len(devices) > 1:
        lines.append(f"**These reports come from {len(devices)} different devices** ({'; '.join(devices)}): compare "
                     "latency only between rows of the same device.")
    elif devices:
        lines.append(f"Every figure was measured on one device: {devices[0]}.")
    return lines


def sources(reports: list[tuple[str, dict]]) -> list[str]:
    out = []
    for name, r in sorted(reports, key=lambda nr: (nr[1]["model"]["variant"], nr[1]["target"]["name"], nr[0])):
        d, m = r.get("data", {}), r.get("machine", {})
        ev = d.get("evaluation", {})
        out.append(f"{r['model']['variant']} on {r['target']['name']}: `{name}` ({r.get('tool', '?')}, {r.get('created', '?')}); "
                   f"accuracy on {ev.get('n', '?')} images of {ev.get('source', '?')} at {d.get('accuracy_resolution', '?')} px; "
                   f"latency at {d['latency_resolution']} px; machine {m.get('cpu', '?')} ({m.get('os', '?')}); "
                   f"gates {r['gates'].get('file', '?')}")
    return out


def render_summary_markdown(rows: list[Row], reports: list[tuple[str, dict]]) -> str:
    cells, notes = table(rows)
    return "\n".join(["# convnext-deploy matrix", "", *caption(rows, reports), "", _md_table(HEAD, cells), "",
                      *(f"[{i}] {n}  " for i, n in enumerate(notes, 1)), "", "Reports:", "",
                      *(f"- {s}" for s in sources(reports)), ""])


def render_summary_html(rows: list[Row], reports: list[tuple[str, dict]]) -> str:
    cells, notes = table(rows)
    title = "convnext-deploy matrix"
    cap = "".join(f"<p>{html.escape(line).replace('**', '')}</p>" for line in caption(rows, reports))
    note_html = "".join(f"<li>[{i}] {html.escape(n)}</li>" for i, n in enumerate(notes, 1))
    src = "".join(f"<li>{html.escape(s).replace('`', '')}</li>" for s in sources(reports))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse;margin:1em 0;font-size:14px}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
th{{background:#f3f3f3}}ul.notes{{list-style:none;padding:0}}</style></head><body>
<h1>{title}</h1>{cap}
{_html_table(HEAD, cells)}
<ul class="notes">{note_html}</ul>
<h2>Reports</h2><ul>{src}</ul>
</body></html>
"""


def summarize(paths: list[Path], out: Path) -> tuple[list[Row], dict[str, Path]]:
    """Read every report first (one bad file: one UserError, nothing written), then publish the table as
    summary.md, summary.html and summary.json (the rows' raw figures) under `out`, each file atomically."""
    from convnext_deploy.pipeline.core.cache import publish_file

    reports = [(str(file), report) for file, report in map(load_report, paths)]
    if not reports:
        raise UserError(f"no report given; {HINT}")
    out = Path(out)
    if any(d.exists() and not d.is_dir() for d in (out, *out.parents)):
        raise UserError(f"--out {out}: a file stands on that path; name a directory (default runs/summary)")
    rows = summary_rows(reports)
    texts = {"summary.md": render_summary_markdown(rows, reports), "summary.html": render_summary_html(rows, reports),
             "summary.json": json.dumps([asdict(r) for r in rows], indent=1)}
    written = {}
    for fname, text in texts.items():
        written[fname] = publish_file(out / fname, lambda tmp, t=text: tmp.write_text(t))
    return rows, written
