"""What a reader must see first: the verdict, the artifact to ship with its speed and accuracy, and the machine
that measured them. Plain text facts; the Markdown and HTML renderings only dress them."""
from __future__ import annotations

import re

from convnext_deploy.reports.cells import pct, pp, verdict_passed, wilson
from convnext_deploy.reports.device_section import device_fact
from convnext_deploy.reports.tables import gate_rows

CPU_VENDORS = ("Intel", "AMD")  # x86 CPU classes only: "Apple" or "NVIDIA" name the target, not the host


def hardware_class(report: dict) -> str:
    """The target's generic hardware class, without a CPU vendor the measured CPU contradicts. The rows name no
    vendor now (the measured machine does), but report files written before said "x86 CPU (Intel)" for OpenVINO,
    and an AMD EPYC run read back by `summarize` must not read as measured on Intel."""
    text, cpu = report["target"]["hardware"], report["machine"].get("cpu", "").lower()
    for vendor in CPU_VENDORS:
        if vendor in text and vendor.lower() not in cpu:
            text = re.sub(rf"\s*\({vendor}\)|\b{vendor}\s*", "", text).strip()
    return text or "CPU"


def machine_text(report: dict) -> str:
    mach = report["machine"]
    prof = mach.get("cpu_profile")
    return (f"{mach['cpu']} ({mach['cpu_count']} cores; {', '.join(mach['cpu_flags'])}), {mach['os']}"
            + (f"; INT8 path: {prof['int8_path']}; BF16: {prof['bf16_path']}" if prof else ""))


def verdict(report: dict) -> tuple[bool, str, list[str]]:
    """(passed, headline, one line per gate not passed with what was measured, what was allowed and why)."""
    g = report["gates"]
    verdicts = g["verdicts"]
    if g["passed"]:
        unmeasured = [v["gate"] for v in verdicts if v["status"] != "pass"]  # passing unmeasured: allow_emulated
        return True, (f"Gates: PASSED ({g['file']}): all {len(verdicts)} met" if verdicts and not unmeasured else
                      f"Gates: PASSED ({g['file']}): {len(verdicts) - len(unmeasured)} met, {', '.join(unmeasured)} "
                      "not measured on the emulated device (allowed by the gate file)" if verdicts else
                      f"Gates: PASSED ({g['file']}): none applied (the gate file sets none)"), []
    failing = [row for row, v in zip(gate_rows(report), verdicts) if not verdict_passed(v)]
    lines = [f"{gate} ({what}): measured {measured}, allowed {allowed}; {status}"
             for gate, what, measured, allowed, status in failing]
    return False, f"Gates: FAILED ({g['file']}): {len(failing)} of {len(verdicts)} not met", lines


def _deployment_entry(report: dict, precision: str) -> dict | None:
    size = report["data"]["latency_resolution"]
    return next((e for e in report["latency"] if e["precision"] == precision and e["batch"] == 1
                 and e["input_size"] == size), None)


def _speed(report: dict, precision: str) -> str | None:
    e, ref = _deployment_entry(report, precision), report["target"]["reference"]
    q = (e or {}).get("speedup_vs_reference")
    r = _deployment_entry(report, ref)
    if not q or not r:
        return None
    word = "faster" if q["value"] >= 1 else "slower"
    return (f"{precision.upper()} vs {ref.upper()}: {q['value']:.2f}× {word} [95 % CI {q['ci95'][0]:.2f}–"
            f"{q['ci95'][1]:.2f}×] (p50 {e['p50_ms']:.2f} vs {r['p50_ms']:.2f} ms; {e['input_size']} px, batch 1, "
            f"{e['threads']} threads; {e['kind']})")


def _accuracy(report: dict, precision: str) -> str | None:
    a = report["accuracy"].get(precision)
    if not a:
        return None
    correct = a.get("correct", round(a["top1"] * a["n"]))
    lo, hi = wilson(correct, a["n"])
    ref = report["target"]["reference"]
    vs = "" if precision == ref else f"; drop vs {ref.upper()} {pp(a.get('top1_drop_pp'))}"
    return (f"{precision.upper()} top-1 {pct(a['top1'])} [95 % Wilson {pct(lo)}–{pct(hi)}]{vs} ({a['n']:,} images at "
            f"{a.get('input_size', report['data']['accuracy_resolution'])} px; "
            + (a["kind"] + (f": {a['proxy']}" if a.get("proxy") else "")) + ")")


def key_facts(report: dict) -> list[tuple[str, str]]:
    """(label, text) rows under the verdict: the artifact to ship, its speed against the reference, its accuracy,
    the machine. A figure the report does not hold is said to be missing, never filled in."""
    rec = report.get("recommended_precision")
    label = "Deployed" if report["gates"]["passed"] else "Not deployed"
    if rec:
        p = rec["precision"]
        files = next((a["files"] for a in report["artifacts"] if a["precision"] == p), [])
        recipe = (report.get("recipe_choice") or {}).get("chosen") if p == "int8" else None
        rows = [(label, f"{p}" + (f" ({', '.join(files)})" if files else "")
                 + (f", INT8 recipe “{recipe}”" if recipe else "") + f"; why: {rec['line']}"
                 + ("" if report["gates"]["passed"] else "; the gates failed, so no bundle was written"))]
    else:
        why = "no precision meets the accuracy gates" if report["latency"] else "latency not measured (see the notes)"
        rows = [(label, f"no recommendation: {why}")]
        p = None
    ref = report["target"]["reference"]
    for q in dict.fromkeys(x for x in (p, "int8") if x and x != ref and x in report["accuracy"]):
        rows.append(("Speed", _speed(report, q) or f"{q.upper()} vs {ref.upper()}: not measured (see the notes)"))
    for q in dict.fromkeys(x for x in (p, "int8", ref) if x):
        text = _accuracy(report, q)
        if text:
            rows.append(("Accuracy", text))
    measured = _deployment_entry(report, p or ref) or report["accuracy"].get(p or ref) or {}
    if measured.get("runtime"):
        rows.append(("Measured with", f"{measured['runtime']} on {measured.get('device', '?')}"))
    rows.append(("Target", f"{report['target']['name']} ({hardware_class(report)})"))
    rows.append(("Machine", machine_text(report)))
    if device_fact(report):
        rows.append(("Device", device_fact(report)))
    return rows
