"""How one figure is written in a table cell, and the tables themselves, shared by every rendering of a report."""
from __future__ import annotations

# a verdict's statuses that pass: "pass", and a speed gate an emulated device cannot measure where the gate file
# allows it (pipeline/core/gate_file.py: EMULATED_ALLOWED)
PASSING = ("pass", "not measured (emulated), allowed")


def verdict_passed(v: dict) -> bool:
    return v["status"] in PASSING

import html
import math
from collections import Counter


def pct(x):
    return "—" if x is None else f"{x * 100:.2f}%"


def pp(x):
    return "—" if x is None else f"{x:+.2f} pp"


def ms(x):
    return "—" if x is None else f"{x:.2f}"


def interval(value: str, ci) -> str:
    return value if not ci else f"{value} [{ci[0]:.2f}, {ci[1]:.2f}]"


def md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(out)


def html_table(head, rows, caption: str = "") -> str:
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{cap}<thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson interval of a proportion: stays inside [0, 1] and is honest near 100 %, unlike the normal one."""
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def measured_by(entries: dict[str, dict]) -> str:
    """Runtime and device named once for a whole table (the strings run to ~60 characters: repeated per row they
    drown the figures): the value most rows share, then the rows that differ, by name."""
    parts = []
    for key, label in (("runtime", "Runtime"), ("device", "device")):
        values = {name: e[key] for name, e in entries.items() if e.get(key)}
        if not values:
            continue
        main = Counter(values.values()).most_common(1)[0][0]
        others = [f"{name}: {v}" for name, v in values.items() if v != main]
        parts.append(f"{label}: {main}" + (f" ({'; '.join(others)})" if others else ""))
    return "; ".join(parts) + "." if parts else ""


def count_pp(r: dict) -> str:
    """A control-split drop as images lost of n, beside its percentage points."""
    if r.get("control_n") is None:
        return pp(r.get("control_drop_pp"))
    return f"{r['control_drop_images']} of {r['control_n']:,} ({pp(r['control_drop_pp'])})"


def count_pct(r: dict) -> str:
    if r.get("control_n") is None:
        return pct(r.get("control_agreement"))
    return f"{r['control_n'] - r['control_disagreements']:,} of {r['control_n']:,} ({pct(r['control_agreement'])})"


def counts(r: dict) -> str:
    if r.get("control_n") is None:
        return "not judged"
    return (f"top-1 drop {count_pp(r)} [95 % {pp(r['control_drop_low_pp'])}, {pp(r['control_drop_high_pp'])}], "
            f"agreement {count_pct(r)} [95 % {pct(r['control_agreement_low'])}, {pct(r['control_agreement_high'])}]")


def rate_vs_peak(v: dict, named: bool = False) -> str:
    """A model's MAC rate against its runtime's measured peak of that precision (pipeline.measure.peak.fraction): a
    share of it, or, where the rate is above it, the flag that the peak is wrong: a peak a model beats is no peak,
    so no share above 100 % is ever written (a result file from before the flag is read the same way). `named`:
    the peak's figure and form follow the share, and a missing peak's reason (a table of rows states it once)."""
    of, gmacs = v["of"].upper(), v["gmacs"]
    if v.get("peak_gmacs") is None:
        return f"{gmacs:.0f} G/s, no {of} peak" + (f" ({v.get('no_peak', 'not measured')})" if named else "")
    if v.get("bad_peak") or (v.get("fraction") or 0) > 1 or gmacs > v["peak_gmacs"]:
        return (f"{gmacs:.0f} G/s, above the measured {of} peak of {v['peak_gmacs']:.0f} G/s: the peak is wrong "
                "(bad peak)")
    form = f", {v['peak_form']}" if v.get("peak_form") else ""
    return f"{gmacs:.0f} G/s = {v['fraction'] * 100:.0f} % of the {of} peak" + (
        f" ({v['peak_gmacs']:.0f} G/s{form})" if named else "")


def peak_figures(peak: dict) -> str:
    """A runtime's measured peaks (pipeline.measure.peak), each with the form it came from and the other forms'
    rates: those that ran in another precision than their graph's say what ran them and are not the peak; a
    precision with no peak says why."""
    parts = []
    for p in ("fp32", "int8"):
        forms = peak.get("forms", {}).get(p, {}).values()
        if p in peak.get("absent", {}):
            parts.append(f"no {p.upper()} peak ({peak['absent'][p]})")
        elif p in peak:
            top = peak[p]
            others = [f"{f['form']} {f['gmacs']:.0f} G/s" if not f.get("reason") else
                      f"the {f['form']} {f['reason']}, {f['gmacs']:.0f} G/s, not taken"
                      for f in forms if f["form"] != top.get("form")]
            parts.append(f"{p.upper()} {top['gmacs']:.0f} G/s"
                         + (f" ({'; '.join([top['form'], *others])})" if top.get("form") else ""))
    return ", ".join(parts)
